"""Hyperparameter search with optuna: a study over any config fields, shared by any number of
workers (processes or machines) through one storage, resumable, safe when a worker dies.

    python -m finetune --config C --init SRC --workdir DIR --search 20 \
        --config.search.space="optim.lr=float:1e-5:1e-3:log,optim.warmup_ratio=float:0:0.3"

`search.space` names config fields (or the trainer's short names, finetune/sweep.py ALIASES) and
their ranges: `float:LOW:HIGH[:log]`, `int:LOW:HIGH[:log]`, `choice:A|B|C`. Trials are sampled
by TPE and pruned by the median rule on the metric each evaluation reports (training/loop.py's
`on_eval`). The study lives in `--search-storage URL` (an optuna RDB URL, or `journal:PATH` for
a journal file on a shared file system), by default `sqlite:///DIR/search.db`.

Each trial is an ordinary run in `DIR/trials/<n>/` with its own checkpoints. A worker records
itself (host, pid) in the trial it runs; a RUNNING trial whose worker is gone (its pid dead on
this host; on another host, its run's lease, training/lease.py, not refreshed) is marked failed
and retried once with the same parameters in the same folder, so it resumes from its last
checkpoint. A worker stops when the study holds the trials asked for; it waits while others
run the last ones, so a worker that dies is replaced. At the end: `DIR/search.json`, a table,
and `DIR/search.png` (optimisation history, parameter importances).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from typing import Callable

from training.config import with_overrides
from training.errors import UserError
from training.validate import validate

# The flags of both trainers' CLIs (argparse kwargs), like training/distributed.py's.
SEARCH_ARGS = [
    ("--search", dict(type=int, default=0, metavar="N",
                      help="an optuna study of N trials over search.space (training/search.py)")),
    ("--search-storage", dict(default=None, metavar="URL",
                              help="the study's storage shared by every worker: an optuna RDB URL "
                                   "or journal:PATH (default: sqlite in the workdir)")),
]

POLL_S = 5.0      # how often a worker with nothing to run looks at the others' trials
STALE_S = 300.0   # a worker on another host is gone when its run's lease is this old


# ---- The search space ----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Param:
    name: str                 # as written in search.space
    key: str                  # the config field
    kind: str                 # float | int | choice
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    choices: tuple = ()

    def suggest(self, trial):
        if self.kind == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log)
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_categorical(self.name, list(self.choices))


def _number(text: str, kind: str, where: str) -> float:
    try:
        return int(text) if kind == "int" else float(text)
    except ValueError:
        raise UserError(f"{where}: {text!r} is not {'an integer' if kind == 'int' else 'a number'}") from None


def _parse_param(item: str, aliases: dict) -> Param:
    name, eq, spec = (part.strip() for part in item.partition("="))
    where = f"search.space {item.strip()!r}"
    kind, _, rest = spec.partition(":")
    if not eq or not name or kind not in ("float", "int", "choice") or not rest:
        raise UserError(f"{where}: expected KEY=float:LOW:HIGH[:log], KEY=int:LOW:HIGH[:log] "
                        f"or KEY=choice:A|B|C")
    key = aliases.get(name, name)
    if kind == "choice":
        choices = tuple(c.strip() for c in rest.split("|"))
        if not all(choices):
            raise UserError(f"{where}: an empty choice; list the values as choice:A|B|C")
        return Param(name, key, kind, choices=choices)
    parts = rest.split(":")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "log"):
        raise UserError(f"{where}: expected {kind}:LOW:HIGH or {kind}:LOW:HIGH:log")
    low, high = (_number(p, kind, where) for p in parts[:2])
    log = len(parts) == 3
    if not (math.isfinite(low) and math.isfinite(high)) or low > high or (kind == "float" and low == high):
        raise UserError(f"{where}: the range [{parts[0]}, {parts[1]}] is empty; give LOW < HIGH")
    if log and low <= 0:
        raise UserError(f"{where}: a log range needs LOW > 0")
    return Param(name, key, kind, low, high, log)


def parse_space(config, aliases: dict | None = None) -> list[Param]:
    """`config.search.space` as Params; every bound and choice is applied to the config and
    validated now, so a bad field or value is one line before anything runs."""
    text = config.get("search", {}).get("space", "")
    items = [item for item in text.split(",") if item.strip()]
    if not items:
        raise UserError("--search needs a search space: set search.space, e.g. "
                        "--config.search.space=optim.lr=float:1e-5:1e-3:log,optim.warmup_ratio=float:0:0.3")
    space = [_parse_param(item, aliases or {}) for item in items]
    names = [p.name for p in space]
    if len(set(names)) < len(names) or len({p.key for p in space}) < len(space):
        raise UserError(f"search.space names a field twice ({', '.join(names)})")
    for p in space:
        values = p.choices if p.kind == "choice" else (p.low, p.high)
        for value in values:
            try:
                validate(with_overrides(config, [(p.key, _text(value))]))
            except UserError as e:
                raise UserError(f"search.space {p.name}={value}: {e}") from None
    return space


def _text(value) -> str:
    return value if isinstance(value, str) else repr(value)


# ---- Storage -------------------------------------------------------------------------------

def open_storage(url: str | None, workdir):
    """The optuna storage of `--search-storage URL` (default: SQLite in the workdir); a URL
    that does not open or answer is one line."""
    import optuna
    from training import storage  # here and below: the CLIs import SEARCH_ARGS, --help stays instant
    if url is None:
        url = f"sqlite:///{storage.as_path(workdir) / 'search.db'}"
    try:
        if url.startswith("journal:"):
            from optuna.storages.journal import JournalFileBackend
            path = storage.as_path(url[len("journal:"):])
            if not path.parent.is_dir():
                raise FileNotFoundError(f"no folder {path.parent}")
            return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
        engine = {"connect_args": {"connect_timeout": 10}} if not url.startswith("sqlite") else {}
        return _rdb_storage(url, engine)
    except Exception as e:  # sqlalchemy, drivers and the file system each raise their own
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--search-storage {url}: cannot open the study storage ({reason}); check "
                        f"the URL, that the database answers, and for journal:PATH that its folder "
                        f"exists") from None


def _rdb_storage(url: str, engine: dict, tries: int = 5):
    """Workers that start together on a new database race to create its tables; a loser sees
    a unique-constraint or "table already exists" error and opens it again."""
    import optuna
    import sqlalchemy
    for attempt in range(tries):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError) as e:
            lost_race = isinstance(e, sqlalchemy.exc.IntegrityError) or "already exists" in str(e)
            if not lost_race or attempt == tries - 1:
                raise
            time.sleep(0.5)


# ---- The workers ---------------------------------------------------------------------------

@dataclasses.dataclass
class Trainer:
    """What a trainer gives the search: `train(config, run_dir, on_eval)` runs one trial (the
    results, or None when stopped by SIGTERM), `score(results)` is the objective value and the
    metrics to record, `metric` the key that `on_eval` sees at each evaluation."""
    train: Callable
    score: Callable[[dict], tuple[float, dict]]
    metric: str
    direction: str = "maximize"
    aliases: dict = dataclasses.field(default_factory=dict)


def run_search(config, workdir, n_trials: int, storage_url: str | None, trainer: Trainer) -> dict | None:
    """Work on the study until it holds `n_trials` finished trials; returns search.json's
    content, or None when this worker was stopped (SIGTERM): a rerun resumes its trial."""
    import jax
    import optuna
    from training import storage
    if n_trials < 1:
        raise UserError(f"--search {n_trials}: need at least 1 trial")
    if jax.process_count() > 1:
        raise UserError("--search runs each trial in one process; start one search worker per "
                        "host with the same --search-storage instead of a multi-process run")
    space = parse_space(config, trainer.aliases)
    if storage_url is None and storage.is_remote(workdir):
        raise UserError(f"--search with a bucket workdir ({workdir}) needs --search-storage URL: "
                        f"SQLite cannot live on a bucket")
    if storage_url is not None:
        study_storage = open_storage(storage_url, workdir)  # a bad URL: refused before any file
    workdir = storage.check_writable(workdir, "--workdir")
    if storage_url is None:
        study_storage = open_storage(None, workdir)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        storage=study_storage, study_name=workdir.name, direction=trainer.direction,
        load_if_exists=True,
        sampler=optuna.samplers.TPESampler(n_startup_trials=max(2, min(10, n_trials // 3))),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2))
    declared = study.user_attrs.get("space")
    if declared is None:
        study.set_user_attr("space", config.search.space)
    elif declared != config.search.space:
        raise UserError(f"the study {workdir.name!r} in that storage searches {declared!r}, not "
                        f"{config.search.space!r}; pass another --workdir or storage")

    while True:
        _retry_dead_trials(study, workdir)
        trials = study.get_trials(deepcopy=False)
        finished = _count(trials, "COMPLETE", "PRUNED")
        if finished >= n_trials:
            break
        if _count(trials, "WAITING") or finished + _count(trials, "RUNNING") < n_trials:
            if _run_trial(study, config, workdir, n_trials, space, trainer) == "stopped":
                return None
        else:
            time.sleep(POLL_S)  # others run the last trials; watch that their workers live
    return write_results(study, workdir, n_trials, trainer, space)


def _count(trials, *states: str) -> int:
    return sum(t.state.name in states for t in trials)


def _run_trial(study, config, workdir, n_trials, space, trainer: Trainer) -> str:
    import optuna
    from training.lease import worker_record
    trial = study.ask()  # a waiting retry first, else a new TPE sample
    ahead = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number
             and t.state.name in ("COMPLETE", "PRUNED", "RUNNING", "WAITING")]
    if len(ahead) >= n_trials:  # another worker took the last one in the same moment
        trial.set_user_attr("surplus", True)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return "surplus"
    run = trial.user_attrs.get("run", trial.number)  # a retry runs in the folder it resumes
    trial.set_user_attr("run", run)
    trial.set_user_attr("worker", worker_record())
    values = {p.name: p.suggest(trial) for p in space}
    cfg = with_overrides(config, [(p.key, _text(values[p.name])) for p in space])
    run_dir = workdir / "trials" / str(run)
    print(f"=== trial {trial.number} ({run_dir}): " + ", ".join(f"{k}={v}" for k, v in values.items()),
          flush=True)

    def on_eval(step: int, metrics: dict) -> None:
        value = metrics.get(trainer.metric)
        if value is not None and math.isfinite(value):
            trial.report(value, step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"{trainer.metric}={value:.4f} at step {step}")

    try:
        results = trainer.train(cfg, run_dir, on_eval)
    except optuna.TrialPruned as e:
        print(f"trial {trial.number} pruned: {e}", flush=True)
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        return "pruned"
    except UserError as e:  # e.g. a loss that became NaN: this setting fails, the study goes on
        trial.set_user_attr("error", str(e))
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        print(f"trial {trial.number} failed: {e}", flush=True)
        return "failed"
    except BaseException:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        raise
    if results is None:  # stopped: the run saved itself; a rerun resumes it in the same folder
        trial.set_user_attr("stopped", True)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        _enqueue_resume(study, trial, retries=trial.user_attrs.get("retries", 0))
        print(f"search stopped in trial {trial.number}; run the same command again to resume it")
        return "stopped"
    value, metrics = trainer.score(results)
    trial.set_user_attr("metrics", metrics)
    study.tell(trial, value)
    return "complete"


def _enqueue_resume(study, trial, retries: int) -> None:
    study.enqueue_trial(dict(trial.params), user_attrs={"run": trial.user_attrs.get("run", trial.number),
                                                         "resumes": trial.number, "retries": retries},
                        skip_if_exists=False)


def _retry_dead_trials(study, workdir) -> None:
    """RUNNING trials whose worker is gone: failed, and retried once in their own folder."""
    import optuna
    from optuna.exceptions import UpdateFinishedTrialError
    from training.lease import holder_alive, read_lease
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        worker = dict(t.user_attrs.get("worker") or {})
        if not worker:  # asked a moment ago; its worker writes itself in next
            worker = {"refreshed": t.datetime_start.timestamp(), "host": None}
        lease = read_lease(workdir / "trials" / str(t.user_attrs.get("run", t.number))) or {}
        if lease.get("host") == worker.get("host") and isinstance(lease.get("refreshed"), (int, float)):
            worker["refreshed"] = max(worker.get("refreshed", 0), lease["refreshed"])
        if holder_alive(worker, STALE_S):
            continue
        try:  # two workers may see it at once: the storage lets one of them finish it
            study._storage.set_trial_user_attr(t._trial_id, "worker_died", True)
            study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
        except UpdateFinishedTrialError:
            continue
        retries = t.user_attrs.get("retries", 0)
        if retries < 1:
            print(f"trial {t.number}: its worker is gone; retrying it once (it resumes from its "
                  f"last checkpoint)", flush=True)
            _enqueue_resume(study, t, retries=retries + 1)
        else:
            print(f"trial {t.number}: its worker is gone again; a new trial takes its place", flush=True)


# ---- Results -------------------------------------------------------------------------------

def write_results(study, workdir, n_trials: int, trainer: Trainer, space: list[Param]) -> dict:
    """search.json, the printed table and search.png from the study as stored."""
    trials = study.get_trials(deepcopy=False)
    rows = [{"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
             "run": t.user_attrs.get("run"), "resumes": t.user_attrs.get("resumes"),
             "metrics": t.user_attrs.get("metrics"),
             "note": _note(t)} for t in trials]
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    best = study.best_trial if complete else None
    keys = {p.name: p.key for p in space}
    summary = {"metric": trainer.metric, "direction": trainer.direction, "trials_asked": n_trials,
               "space": study.user_attrs.get("space"),
               "best": best and {"number": best.number, "value": best.value, "params": best.params,
                                 "overrides": {keys[k]: v for k, v in best.params.items()},
                                 "metrics": best.user_attrs.get("metrics"),
                                 "run": str(workdir / "trials" / str(best.user_attrs.get("run", best.number)))},
               "trials": rows}
    (workdir / "search.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    print(format_table(summary))
    from training.plots import draw_search
    draw_search(workdir / "search.png", summary, _importances(study))
    return summary


def _note(t) -> str:
    a = t.user_attrs
    return ("not run: another worker took the last trial" if a.get("surplus") else
            "worker died" if a.get("worker_died") else "stopped (SIGTERM)" if a.get("stopped") else
            a.get("error", ""))


def _importances(study) -> dict:
    import optuna
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return optuna.importance.get_param_importances(study)
    except (ValueError, RuntimeError):  # fewer than two finished trials, or one value only
        return {}


def format_table(summary: dict) -> str:
    names = sorted({k for r in summary["trials"] for k in r["params"]})
    header = ["trial", "state", summary["metric"], *names, "note"]
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = [header] + [[str(r["number"]), r["state"].lower(), "-" if r["value"] is None else f"{r['value']:.4f}",
                         *(cell(r["params"].get(n, "-")) for n in names),
                         (f"resumes trial {r['resumes']}; " if r["resumes"] is not None else "") + r["note"]]
                        for r in summary["trials"]]
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    text = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in lines]
    b = summary["best"]
    text.append(f"best: trial {b['number']}, {summary['metric']}={b['value']:.4f} with "
                + ", ".join(f"{k}={cell(v)}" for k, v in b["overrides"].items()) if b else
                "best: none (no trial finished)")
    return "\n".join(text)
