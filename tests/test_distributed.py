"""Multi-process runs on this machine: 2 processes x 4 CPU devices through `launch.local`.

Real processes (gloo collectives between them), the tiny pretraining config, mesh (2, 2, 2).
Runs are shared between tests through module-scoped fixtures:
  single  1 process x 8 devices, 12 steps (the reference)
  multi   2 processes x 4 devices, 12 steps, checkpoints at 8 and 12
and the SIGTERM and SIGKILL tests start their own 2-process runs and reruns. The SIGKILL test is
`slow` (the whole module takes about 3 minutes on the 2-core machine under load, 2 without it).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY_FT, tiny_flags
from training import distributed
from training.errors import UserError
from training.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
STEPS, EVERY = 12, 4
TIMEOUT = 300
RUN_ENV = {}  # added to the environment of the runs: a compilation cache, below


def env(**more) -> dict[str, str]:
    """The runs' environment: this process's as it is now (a test's fixtures may have set
    some, e.g. a storage server's), with RUN_ENV and `more`."""
    return {**os.environ, **RUN_ENV, **more}

# Holds the commit (the final rename) of one checkpoint step, so that a SIGKILL lands in the
# middle of an asynchronous save; every array of the step is written by then.
HOLD_COMMIT = """
import asyncio, os
from orbax.checkpoint._src.path import atomicity
hold = os.environ["PRETRAX_TEST_HOLD_COMMIT"]
finalize = atomicity.AtomicRenameTemporaryPath.finalize
async def held(self):
    if self.get_final().name == hold:
        print(f"holding the commit of {self.get()}", flush=True)
        await asyncio.sleep(3600)
    await finalize(self)
atomicity.AtomicRenameTemporaryPath.finalize = held
from pretrain.__main__ import main
main()
"""


def flags(workdir, data_dir, **extra) -> list[str]:
    return ["--workdir", str(workdir), *tiny_flags(
        data_dir, train__steps=STEPS, checkpoint__every_steps=EVERY, mesh__data=2, mesh__fsdp=2,
        mesh__tensor=2, **extra)]


def one_process(workdir, data_dir) -> list[str]:
    return [sys.executable, "-m", "pretrain", "--cpu_devices", "8", *flags(workdir, data_dir)]


def two_processes(workdir, data_dir, program=("-m", "pretrain")) -> list[str]:
    return [sys.executable, "-m", "launch.local", "--num_processes", "2",
            "--devices_per_process", "4", "--", sys.executable, *program, *flags(workdir, data_dir)]


def run(cmd) -> str:
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT, env=env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def losses(workdir) -> dict[int, float]:
    return {m["step"]: m["train/loss"] for m in read_metrics(workdir) if "train/loss" in m}


def assert_close(got: dict, want: dict, steps, tol=1e-5):
    for s in steps:
        assert abs(got[s] - want[s]) <= tol, (s, got[s], want[s])


def steps_on_disk(workdir) -> list[int]:
    import orbax.checkpoint as ocp
    return sorted(ocp.utils.checkpoint_steps(Path(workdir, "checkpoints").absolute()))


def pids(log: Path, count: int = 2, deadline: float = 60) -> list[int]:
    end = time.time() + deadline
    while time.time() < end:
        found = [int(line.split()[-1]) for line in log.read_text().splitlines()
                 if line.startswith("[launch] process ") and ": pid " in line]
        if len(found) == count:
            return found
        time.sleep(0.05)
    raise AssertionError(log.read_text()[-3000:])


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").exists() and " Z " not in Path(f"/proc/{pid}/stat").read_text()


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """The runs compile the same programs: one persistent cache for all of them (a 1-process run
    takes 10 s instead of 25 s with it). Numerics are unchanged (checked bitwise)."""
    RUN_ENV.update(JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")


@pytest.fixture(scope="module")
def single(tmp_path_factory, data_dir):
    workdir = tmp_path_factory.mktemp("single")
    run(one_process(workdir, data_dir))  # also prepares the data for the runs below
    return workdir


@pytest.fixture(scope="module")
def multi(tmp_path_factory, data_dir, single):
    workdir = tmp_path_factory.mktemp("multi")
    return workdir, run(two_processes(workdir, data_dir))


# ---------------------------------------------------------------------------------------------
# (a) 2 processes x 4 devices train exactly like 1 process x 8 devices
# ---------------------------------------------------------------------------------------------

def test_two_processes_match_one_process(single, multi):
    workdir, out = multi
    assert sorted(losses(workdir)) == list(range(1, STEPS + 1))  # written once, by process 0
    assert_close(losses(workdir), losses(single), range(1, STEPS + 1))
    # Process 1 shows neither a progress bar nor eval lines.
    assert "[0] pretrain:" in out and "[1] pretrain:" not in out
    assert f"[0] step {STEPS}: eval/" in out and f"[1] step {STEPS}: eval/" not in out
    assert steps_on_disk(workdir) == [8, 12]


# ---------------------------------------------------------------------------------------------
# (b) a checkpoint of 2 processes restores in 1 process and goes on identically
# ---------------------------------------------------------------------------------------------

def test_two_process_checkpoint_resumes_in_one_process(tmp_path, data_dir, multi):
    workdir, _ = multi
    shutil.copytree(workdir, tmp_path / "w")
    shutil.rmtree(tmp_path / "w" / "checkpoints" / str(STEPS))  # resume from step 8
    run(one_process(tmp_path / "w", data_dir))
    assert_close(losses(tmp_path / "w"), losses(workdir), range(9, STEPS + 1))


# ---------------------------------------------------------------------------------------------
# (c) SIGTERM to one process: all save the same step, exit 0; the rerun continues exactly
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow  # long: the default run stays under CI's 15 minutes
def test_sigterm_to_one_process_stops_all_at_one_step(tmp_path, data_dir, multi):
    reference, _ = multi
    workdir, log = tmp_path / "w", tmp_path / "launch.log"
    with open(log, "w") as out:
        launcher = subprocess.Popen(two_processes(workdir, data_dir), cwd=REPO, stdout=out,
                                    stderr=subprocess.STDOUT, env=env())
    try:
        _, second = pids(log)
        deadline = time.time() + TIMEOUT
        while max(losses(workdir), default=0) < 3 and time.time() < deadline:
            assert launcher.poll() is None, log.read_text()[-3000:]
            time.sleep(0.05)
        os.kill(second, signal.SIGTERM)
        assert launcher.wait(timeout=TIMEOUT) == 0, log.read_text()[-3000:]
    finally:
        if launcher.poll() is None:
            launcher.kill()
    text = log.read_text()
    stopped_at = max(losses(workdir))
    assert 3 <= stopped_at < STEPS, "the run finished before it was stopped; nothing was tested"
    for i in (0, 1):
        assert (f"[{i}] SIGTERM: stopped at step {stopped_at}, checkpoint saved" in text), text[-3000:]
    assert stopped_at in steps_on_disk(workdir)

    run(two_processes(workdir, data_dir))
    assert sorted(losses(workdir)) == list(range(1, STEPS + 1))
    assert_close(losses(workdir), losses(reference), range(1, STEPS + 1), tol=0.0)


# ---------------------------------------------------------------------------------------------
# (d) SIGKILL in the middle of an asynchronous save: the rerun resumes from the last whole one
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_sigkill_during_async_save_resumes_from_last_complete(tmp_path, data_dir, multi):
    reference, _ = multi
    workdir, log = tmp_path / "w", tmp_path / "launch.log"
    run_env = env(PRETRAX_TEST_HOLD_COMMIT="8")
    with open(log, "w") as out:
        launcher = subprocess.Popen(two_processes(workdir, data_dir, ("-c", HOLD_COMMIT)), cwd=REPO,
                                    stdout=out, stderr=subprocess.STDOUT, env=run_env)
    children = pids(log)
    try:
        deadline = time.time() + TIMEOUT
        while "holding the commit" not in log.read_text() and time.time() < deadline:
            assert launcher.poll() is None, log.read_text()[-3000:]
            time.sleep(0.05)
        launcher.kill()  # SIGKILL; the launcher's children die with it
        launcher.wait()
        end = time.time() + 30
        while any(alive(p) for p in children) and time.time() < end:
            time.sleep(0.05)
        assert not any(alive(p) for p in children), "processes outlived their launcher"
    finally:
        for p in children:
            if alive(p):
                os.kill(p, signal.SIGKILL)
    folders = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    assert "8.orbax-checkpoint-tmp" in folders and "8" not in folders, folders  # the partial save
    assert steps_on_disk(workdir) == [4]

    run(two_processes(workdir, data_dir))
    assert sorted(losses(workdir)) == list(range(1, STEPS + 1))
    assert_close(losses(workdir), losses(reference), range(5, STEPS + 1), tol=0.0)
    assert steps_on_disk(workdir) == [8, 12]
    assert not any("tmp" in p.name for p in (workdir / "checkpoints").iterdir())


# ---------------------------------------------------------------------------------------------
# Flags of training.distributed (no processes started)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (dict(coordinator="localhost:1234"), "missing --num_processes, --process_id"),
    (dict(num_processes=2, process_id=0), "missing --coordinator"),
    (dict(coordinator="localhost:1234", num_processes=2, process_id=2), "must be in 0..1"),
    (dict(coordinator="localhost:1234", num_processes=0, process_id=0), "at least 1"),
    (dict(coordinator="localhost", num_processes=2, process_id=0), "must be HOST:PORT"),
    (dict(cpu_devices=0), "--cpu_devices=0 must be at least 1"),
])
def test_inconsistent_flags_are_one_line_errors(flags, message):
    with pytest.raises(UserError, match=message) as e:
        distributed.initialize(**flags)
    assert "\n" not in str(e.value)


def test_single_process_never_initializes(monkeypatch):
    for var in [v for v in os.environ if v.startswith(("SLURM_", "TPU_", "MEGASCALE_"))]:
        monkeypatch.delenv(var)
    calls = []
    monkeypatch.setattr("jax.distributed.initialize", lambda **kw: calls.append(kw))
    assert distributed.initialize() is False and calls == []


def test_slurm_with_several_tasks_is_detected(monkeypatch):
    env = dict(SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="node[001-002]", SLURM_NTASKS="16",
               SLURM_PROCID="3", SLURM_LOCALID="3")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    calls = []
    monkeypatch.setattr("jax.distributed.initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr("jax.config.update", lambda *a: None)  # the backend is already up here
    monkeypatch.setattr(distributed, "_joined", False)  # restored after: no runtime was joined
    assert distributed.initialize() is True
    assert not distributed.joined()  # nothing started: an error here must not os._exit pytest
    assert calls == [dict(cluster_detection_method="slurm", heartbeat_timeout_seconds=30,
                          shutdown_timeout_seconds=60)]
    monkeypatch.setenv("SLURM_NTASKS", "1")  # one task: a plain run
    assert distributed.initialize() is False and len(calls) == 1


# ---------------------------------------------------------------------------------------------
# (e) fine-tuning: 2 processes x 4 devices train and score exactly like 1 process x 8 devices
# ---------------------------------------------------------------------------------------------

FT_FLAGS = {**TINY_FT, "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}


def finetune(workdir, data_dir, init, processes: int) -> list[str]:
    program = [sys.executable, "-m", "finetune", "--config", "configs/finetune_rt_polarity.py",
               "--init", str(init), "--workdir", str(workdir),
               *[f"--config.{k}={v}" for k, v in {**FT_FLAGS, "data.data_dir": data_dir}.items()]]
    if processes == 1:
        return [*program, "--cpu_devices", "8"]
    return [sys.executable, "-m", "launch.local", "--num_processes", str(processes),
            "--devices_per_process", str(8 // processes), "--", *program]


@pytest.mark.slow  # long: the default run stays under CI's 15 minutes
def test_finetune_two_processes_match_one_process(tmp_path, data_dir, single):
    run(finetune(tmp_path / "one", data_dir, single, 1))
    out = run(finetune(tmp_path / "two", data_dir, single, 2))
    assert_close(losses(tmp_path / "two"), losses(tmp_path / "one"), range(1, 7))
    one, two = (json.loads((tmp_path / w / "results.json").read_text()) for w in ("one", "two"))
    assert two["best_step"] == one["best_step"]
    for split in ("dev", "test"):
        for metric, value in one[split].items():
            assert two[split][metric] == pytest.approx(value, abs=1e-6), (split, metric)
    # Every prediction is written once, by process 0.
    assert (tmp_path / "two" / "predictions_dev.tsv").read_text() == \
        (tmp_path / "one" / "predictions_dev.tsv").read_text()
    assert "[1] finetune" not in out
