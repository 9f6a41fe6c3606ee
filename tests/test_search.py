"""Hyperparameter search (training/search.py): the space parser and its refusals, the study
with a stand-in trainer (pruning, a dead worker's trial retried in its own folder, results), two
worker processes sharing one study, and a real fine-tuning search killed mid-trial and rerun."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest

from configs import finetune_rt_polarity
from conftest import TINY_FT, cli_error
from finetune.__main__ import main
from finetune.sweep import ALIASES
from training import search
from training.errors import UserError
from training.lease import worker_record

REPO = Path(__file__).resolve().parents[1]
SPACE = "lr=float:1e-4:1e-2:log,optim.warmup_steps=int:0:4,model.pooling=choice:cls|mean"


def config_with(space: str):
    c = finetune_rt_polarity.get_config()
    c.search.space = space
    return c


# ---- the space -----------------------------------------------------------------------------

def test_space_parses_every_kind_and_short_names():
    lr, warmup, pooling = search.parse_space(config_with(SPACE), ALIASES)
    assert (lr.key, lr.kind, lr.low, lr.high, lr.log) == ("optim.lr", "float", 1e-4, 1e-2, True)
    assert (warmup.key, warmup.kind, warmup.low, warmup.high, warmup.log) == ("optim.warmup_steps", "int", 0, 4, False)
    assert (pooling.key, pooling.choices) == ("model.pooling", ("cls", "mean"))
    # Each kind draws in its range through optuna's own suggest_* calls.
    trial = optuna.create_study().ask()
    assert 1e-4 <= lr.suggest(trial) <= 1e-2 and warmup.suggest(trial) in range(5)
    assert pooling.suggest(trial) in ("cls", "mean")


@pytest.mark.parametrize("space, words", [
    ("optim.lrr=float:1e-4:1e-2", ["unknown config key 'optim.lrr'", "did you mean"]),
    ("lr=float:1e-2:1e-4", ["range [1e-2, 1e-4] is empty"]),
    ("lr=float:1e-3:1e-3", ["is empty"]),
    ("optim.warmup_steps=int:5:2", ["range [5, 2] is empty"]),
    ("lr=float:0:1e-2:log", ["log range needs LOW > 0"]),
    ("lr=float:-1:1", ["optim.lr=-1", "expected a finite number >= 0"]),
    ("model.pooling=choice:cls||mean", ["empty choice"]),
    ("model.pooling=choice:cls|max", ["unknown pooling 'max'"]),
    ("optim.warmup_steps=int:0:2.5", ["'2.5' is not an integer"]),
    ("lr=normal:0:1", ["expected KEY=float:LOW:HIGH"]),
    ("lr=float:1e-4:1e-2,optim.lr=float:1e-4:1e-3", ["names a field twice"]),
    ("", ["needs a search space"]),
])
def test_bad_spaces_are_refused_in_one_line(space, words):
    with pytest.raises(UserError) as e:
        search.parse_space(config_with(space), ALIASES)
    message = str(e.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_bad_cli_input_is_one_line_and_writes_nothing(capsys, tmp_path):
    workdir = tmp_path / "w"
    flags = ["--init", "none", "--workdir", str(workdir), "--search", "3"]
    err = cli_error(capsys, main, [*flags, "--config.search.space=optim.lrr=float:1e-4:1e-2"])
    assert "unknown config key 'optim.lrr'" in err
    err = cli_error(capsys, main, [*flags, "--config.search.space=lr=float:1e-2:1e-4"])
    assert "is empty" in err
    space = "--config.search.space=lr=float:1e-4:1e-2"
    err = cli_error(capsys, main, [*flags, space, "--search-storage", f"sqlite:///{tmp_path}/no/such/db.sqlite"])
    assert "cannot open the study storage" in err and "unable to open database file" in err
    # A database server that does not answer (nothing listens on port 1).
    err = cli_error(capsys, main, [*flags, space, "--search-storage", "postgresql://pretrax@127.0.0.1:1/study"])
    assert "cannot open the study storage" in err
    err = cli_error(capsys, main, [*flags, space, "--search-storage", f"journal:{tmp_path}/no/such/study.log"])
    assert "cannot open the study storage" in err
    assert "--search and --sweep" in cli_error(capsys, main, [*flags, space, "--sweep", "lr=1e-4,1e-3"])
    assert os.listdir(tmp_path) == []  # no workdir, no database, no journal


# ---- the study, with a stand-in trainer ----------------------------------------------------

class FakeTrainer:
    """Trains nothing: `dev` is a known function of the settings, reported at steps 1..4, and a
    run folder keeps the steps done, as a checkpoint would, so a rerun continues it."""

    def __init__(self):
        self.calls = []

    def dev(self, cfg) -> float:
        return 1.0 - abs(cfg.optim.lr - 3e-3) * 100 - 0.01 * cfg.optim.warmup_steps

    def train(self, cfg, run_dir, on_eval):
        run_dir.mkdir(parents=True, exist_ok=True)
        done = run_dir / "steps_done"
        start = int(done.read_text()) if done.exists() else 0
        self.calls.append((run_dir.name, start))
        for step in range(start + 1, 5):
            done.write_text(str(step))
            on_eval(step, {"dev/accuracy": self.dev(cfg) * step / 4})
        results = {"metric": "accuracy", "dev": {"accuracy": self.dev(cfg)}, "test": {"accuracy": 0.5}}
        (run_dir / "results.json").write_text(json.dumps(results))
        return results

    def trainer(self):
        return search.Trainer(train=self.train, metric="dev/accuracy", aliases=ALIASES,
                              score=lambda r: (r["dev"]["accuracy"], {"dev": r["dev"], "test": r["test"]}))


def test_study_runs_prunes_and_writes_results(tmp_path, capsys):
    fake = FakeTrainer()
    config = config_with("lr=float:1e-4:1e-2:log,optim.warmup_steps=int:0:4")
    summary = search.run_search(config, tmp_path, 8, None, fake.trainer())
    states = [t["state"] for t in summary["trials"]]
    assert len(states) == 8 and set(states) <= {"COMPLETE", "PRUNED"} and "COMPLETE" in states
    assert len(fake.calls) == 8 and all(start == 0 for _, start in fake.calls)
    complete = [t for t in summary["trials"] if t["state"] == "COMPLETE"]
    best = max(complete, key=lambda t: t["value"])
    assert summary["best"]["number"] == best["number"] and summary["best"]["value"] == best["value"]
    assert set(summary["best"]["overrides"]) == {"optim.lr", "optim.warmup_steps"}
    assert summary["best"]["metrics"]["test"] == {"accuracy": 0.5}
    assert (tmp_path / "search.db").is_file() and (tmp_path / "search.png").stat().st_size > 1000
    assert json.loads((tmp_path / "search.json").read_text())["best"] == summary["best"]
    out = capsys.readouterr().out
    assert f"best: trial {best['number']}, dev/accuracy={best['value']:.4f}" in out
    # Pruned trials stopped at the evaluation that pruned them, with no results.
    for t in summary["trials"]:
        run = tmp_path / "trials" / str(t["run"])
        assert (run / "results.json").exists() == (t["state"] == "COMPLETE")
    # Rerun with the same budget: the study is complete, nothing runs again.
    fake.calls.clear()
    assert search.run_search(config, tmp_path, 8, None, fake.trainer())["best"] == summary["best"]
    assert fake.calls == []
    with pytest.raises(UserError, match="searches 'lr=float"):
        search.run_search(config_with("lr=float:1e-4:1e-3"), tmp_path, 8, None, fake.trainer())


def test_dead_workers_trial_is_retried_once_in_its_folder(tmp_path):
    """A RUNNING trial whose worker process is gone: failed, retried with the same parameters in
    the same folder (continuing from its steps); a retry that dies too is replaced by a new trial."""
    fake = FakeTrainer()
    config = config_with("lr=float:1e-4:1e-2:log")
    storage = f"sqlite:///{tmp_path}/study.db"
    study = optuna.create_study(storage=storage, study_name=tmp_path.name, direction="maximize")
    study.set_user_attr("space", config.search.space)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    record = {**worker_record(), "pid": int(dead.stdout), "pid_start": None}
    cut = study.ask({"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)})
    cut.set_user_attr("worker", record)
    (tmp_path / "trials" / "0").mkdir(parents=True)
    (tmp_path / "trials" / "0" / "steps_done").write_text("2")  # cut off after step 2

    summary = search.run_search(config, tmp_path, 2, storage, fake.trainer())
    trials = {t["number"]: t for t in summary["trials"]}
    assert trials[0]["state"] == "FAIL" and trials[0]["note"] == "worker died"
    assert trials[1]["resumes"] == 0 and trials[1]["run"] == 0 and trials[1]["params"] == trials[0]["params"]
    assert trials[1]["state"] in ("COMPLETE", "PRUNED")
    assert fake.calls[0] == ("0", 2)  # resumed after its last step, not from the start
    assert [t["number"] for t in trials.values() if t["state"] in ("COMPLETE", "PRUNED")] == [1, 2]
    assert trials[2]["run"] == 2 and fake.calls[1] == ("2", 0) and not (tmp_path / "trials" / "1").exists()


# ---- two workers on one study --------------------------------------------------------------

WORKER = textwrap.dedent("""
    import json, os, sys, time
    sys.path.insert(0, {tests!r})
    from test_search import FakeTrainer, config_with
    from training import search

    class Slow(FakeTrainer):
        def train(self, cfg, run_dir, on_eval):
            (run_dir.parent.parent / "runs.log").open("a").write(f"{{run_dir.name}} {{os.getpid()}}\\n")
            time.sleep(float(sys.argv[3]))
            return super().train(cfg, run_dir, on_eval)

    search.POLL_S = 0.2
    config = config_with("lr=float:1e-4:1e-2:log,optim.warmup_steps=int:0:4")
    search.run_search(config, sys.argv[1], int(sys.argv[2]), None, Slow().trainer())
""")


def start_worker(tmp_path, n: int, seconds: float):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(REPO / "tests")))
    return subprocess.Popen([sys.executable, str(script), str(tmp_path / "study"), str(n), str(seconds)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})


def finished_trials(workdir) -> list[dict]:
    summary = json.loads((workdir / "search.json").read_text())
    return [t for t in summary["trials"] if t["state"] in ("COMPLETE", "PRUNED")]


@pytest.mark.slow
def test_two_workers_split_the_trials(tmp_path):
    workers = [start_worker(tmp_path, 6, 1.0) for _ in range(2)]
    outs = [w.communicate(timeout=300)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), outs
    started = [out.count("=== trial") for out in outs]
    assert all(started) and sum(started) == 6, outs  # both worked; none ran a trial twice
    runs = [line.split()[0] for line in (tmp_path / "study" / "runs.log").read_text().splitlines()]
    assert sorted(runs) == sorted(set(runs)) and len(runs) == 6
    assert len(finished_trials(tmp_path / "study")) == 6


@pytest.mark.slow
def test_a_killed_workers_trial_is_finished_by_the_other(tmp_path):
    survivor, victim = start_worker(tmp_path, 4, 4.0), start_worker(tmp_path, 4, 4.0)
    runs = tmp_path / "study" / "runs.log"
    deadline = time.monotonic() + 120
    while not (runs.exists() and f" {victim.pid}\n" in runs.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert f" {victim.pid}\n" in runs.read_text(), "the second worker never started a trial"
    victim.send_signal(signal.SIGKILL)  # in the middle of its first trial
    out = survivor.communicate(timeout=300)[0]
    victim.wait()
    assert survivor.returncode == 0, out
    assert "its worker is gone; retrying it once" in out
    summary = json.loads((tmp_path / "study" / "search.json").read_text())
    died = [t for t in summary["trials"] if t["note"] == "worker died"]
    assert len(died) == 1
    retry = next(t for t in summary["trials"] if t["resumes"] == died[0]["number"])
    assert retry["run"] == died[0]["run"] and retry["state"] in ("COMPLETE", "PRUNED")
    assert len(finished_trials(tmp_path / "study")) == 4


# ---- a real fine-tuning search, SIGKILLed in the middle of a trial ----------------------------

def search_cli(workdir, data_dir) -> list[str]:
    tiny = {**TINY_FT, "train.steps": 4, "eval.every_steps": 2, "data.data_dir": str(data_dir)}
    return [sys.executable, "-m", "finetune", "--init", "none", "--workdir", str(workdir), "--search", "2",
            "--config.search.space=lr=float:1e-4:1e-2:log", *(f"--config.{k}={v}" for k, v in tiny.items())]


@pytest.mark.slow
def test_search_killed_mid_trial_resumes_that_trial_from_its_checkpoint(tmp_path, data_dir):
    workdir = tmp_path / "search"
    proc = subprocess.Popen(search_cli(workdir, data_dir), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    saved = workdir / "trials" / "1" / "checkpoints" / "2"  # trial 1's checkpoint at its first evaluation
    deadline = time.monotonic() + 900
    while not saved.is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    first = proc.communicate()[0]
    assert saved.is_dir() and not (workdir / "trials" / "1" / "results.json").exists(), first[-3000:]
    finished = (workdir / "trials" / "0" / "results.json").read_text()
    mtime = (workdir / "trials" / "0" / "results.json").stat().st_mtime_ns

    again = subprocess.run(search_cli(workdir, data_dir), cwd=REPO, capture_output=True, text=True, timeout=900)
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-3000:]
    assert "trial 1: its worker is gone; retrying it once" in out
    assert "=== trial 0 " not in out and "=== trial 1 " not in out  # the finished trial is not rerun
    assert f"=== trial 2 ({workdir / 'trials' / '1'})" in out      # the cut-off one, in its folder
    # Resumed from step 2: the rerun neither trains step 1 nor evaluates step 2 again.
    assert "step 2 (epoch" not in out and "step 4 (epoch" in out and "| 1/4 [" not in out
    assert (workdir / "trials" / "0" / "results.json").read_text() == finished
    assert (workdir / "trials" / "0" / "results.json").stat().st_mtime_ns == mtime
    summary = json.loads((workdir / "search.json").read_text())
    states = {t["number"]: (t["state"], t["run"], t["resumes"]) for t in summary["trials"]}
    assert states == {0: ("COMPLETE", 0, None), 1: ("FAIL", 1, None), 2: ("COMPLETE", 1, 1)}
    assert summary["trials"][2]["params"] == summary["trials"][1]["params"]
    assert not (workdir / "trials" / "2").exists() and (workdir / "search.png").is_file()
    results = json.loads((workdir / "trials" / "1" / "results.json").read_text())
    assert summary["trials"][2]["value"] == results["dev"]["accuracy"]


@pytest.mark.slow
def test_pretraining_search_minimises_eval_loss(tmp_path, data_dir):
    from conftest import tiny_flags
    workdir = tmp_path / "search"
    proc = subprocess.run([sys.executable, "-m", "pretrain", "--workdir", str(workdir), "--search", "2",
                           "--config.search.space=optim.lr=float:1e-4:1e-2:log",
                           *tiny_flags(data_dir, train__steps=2, eval__every_steps=1)],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((workdir / "search.json").read_text())
    assert summary["direction"] == "minimize" and summary["metric"] == "eval/loss"
    assert [t["state"] for t in summary["trials"]] == ["COMPLETE", "COMPLETE"]
    for t in summary["trials"]:  # each trial's value: its run's last eval/loss, as logged
        rows = [json.loads(l) for l in (workdir / "trials" / str(t["run"]) / "metrics.jsonl").read_text().splitlines()]
        assert t["value"] == [r["eval/loss"] for r in rows if "eval/loss" in r][-1]
    assert summary["best"]["value"] == min(t["value"] for t in summary["trials"])
    assert set(summary["best"]["overrides"]) == {"optim.lr"}
