"""Grids of fine-tuning runs over settings and seeds, summarised by median and spread on dev.

    python -m finetune --config C --init SRC --workdir DIR --sweep lr=2e-5,3e-5,5e-5 --seeds 5

runs every setting of the grid (the product of the --sweep flags) with seeds train.seed + 0..4,
one after another, each in DIR/<setting>/seed<k> (a finished run is read back, a stopped one
resumes), then writes DIR/sweep.json and prints a table: per setting the median, min/max and
interquartile range of the dev metric over seeds, and the setting that wins on dev with its test
median. Choosing on dev and reporting test keeps the test set out of the choice.
"""

from __future__ import annotations

import itertools
import json

import numpy as np

from training import storage
from training.config import with_overrides
from training.errors import UserError
from training.validate import validate

# Short names for the fields swept most; any full config key works too.
ALIASES = {"lr": "optim.lr", "epochs": "train.epochs", "batch_size": "train.batch_size",
           "warmup_ratio": "optim.warmup_ratio", "weight_decay": "optim.weight_decay",
           "l2sp_alpha": "method.l2sp_alpha", "layer_decay": "method.layer_decay",
           "label_smoothing": "method.label_smoothing", "freeze_bottom": "method.freeze_bottom",
           "freeze_encoder": "method.freeze_encoder", "dropout": "model.dropout"}


def parse_grid(specs: list[str], config) -> list[tuple[str, list[tuple[str, str]]]]:
    """["lr=1e-4,3e-4", "layer_decay=0.8,1"] -> [(setting name, [(config key, value text)])]."""
    axes = []
    for spec in specs:
        name, eq, values = spec.partition("=")
        texts = [v.strip() for v in values.split(",") if v.strip()]
        if not eq or not name or not texts:
            raise UserError(f"--sweep {spec}: expected KEY=V1,V2,... (e.g. --sweep lr=2e-5,3e-5)")
        key = ALIASES.get(name, name)
        for text in texts:  # fail on a bad key or value now, not after hours of runs
            with_overrides(config, [(key, text)])
        axes.append([(name, key, t) for t in texts])
    if not axes:
        return [("default", [])]
    grid = [(",".join(f"{name}={t}" for name, _, t in combo), [(key, t) for _, key, t in combo])
            for combo in itertools.product(*axes)]
    for _, assignments in grid:  # every setting's values, alone and together
        validate(with_overrides(config, assignments))
    return grid


def search_trainer(config, init: str, explicit=(), train_fn=None):
    """What `--search N` (training/search.py) needs to fine-tune: each trial a fine-tuning run
    from `init`, scored by its best dev checkpoint's primary metric, pruned on the dev metric at
    every evaluation; search.space may use the short names above."""
    from finetune.tasks import get_task
    from training.search import Trainer
    if train_fn is None:
        from finetune.train import train_and_evaluate as train_fn
    try:
        primary = get_task(config.data.task).primary
    except KeyError as e:
        raise UserError(e.args[0]) from None
    return Trainer(
        train=lambda cfg, run_dir, on_eval: train_fn(cfg, run_dir, init, explicit, on_eval=on_eval),
        score=lambda r: (r["dev"][r["metric"]], {split: r.get(split) for split in ("dev", "test")}),
        metric=f"dev/{primary}", aliases=ALIASES)


def summarize(values: list[float]) -> dict:
    v = np.asarray(values, np.float64)
    q25, q75 = np.percentile(v, [25, 75])
    return {"median": float(np.median(v)), "min": float(v.min()), "max": float(v.max()),
            "iqr": float(q75 - q25), "values": [float(x) for x in v]}


def run_sweep(config, workdir, init: str, specs: list[str], seeds: int,
              explicit=(), train_fn=None) -> dict | None:
    """Runs the grid sequentially; returns the sweep summary (as sweep.json), None if stopped."""
    if train_fn is None:
        from finetune.train import train_and_evaluate as train_fn
    if seeds < 1:
        raise UserError(f"--seeds {seeds}: need at least 1")
    workdir = storage.as_path(workdir)
    grid = parse_grid(specs, config)
    rows = []
    for name, assignments in grid:
        runs = []
        for k in range(seeds):
            cfg = with_overrides(config, assignments)
            cfg.train.seed = config.train.seed + k
            run_dir = workdir / name / f"seed{k}"
            if (run_dir / "results.json").is_file():
                results = json.loads((run_dir / "results.json").read_text())
            else:
                print(f"=== sweep {name} seed {k} ({run_dir})")
                results = train_fn(cfg, run_dir, init, set(explicit) | {key for key, _ in assignments})
                if results is None:  # stopped: the run saved itself; a rerun resumes it
                    print(f"sweep stopped in {run_dir}; run the same command again to resume")
                    return None
            runs.append(results)
        metric = runs[0]["metric"]
        row = {"setting": name, "overrides": dict(assignments), "seeds": seeds,
               "dev": summarize([r["dev"][metric] for r in runs])}
        if all(r.get("test") for r in runs):
            row["test"] = summarize([r["test"][metric] for r in runs])
        rows.append(row)
    best = max(rows, key=lambda r: r["dev"]["median"])
    sweep = {"metric": metric, "seeds": seeds, "settings": rows,
             "best": {"setting": best["setting"], "dev_median": best["dev"]["median"],
                      "test_median": best["test"]["median"] if "test" in best else None}}
    (workdir / "sweep.json").write_text(json.dumps(sweep, indent=1) + "\n")
    print(format_table(sweep))
    return sweep


def format_table(sweep: dict) -> str:
    m = sweep["metric"]
    width = max(len("setting"), *(len(r["setting"]) for r in sweep["settings"]))
    cell = lambda d: f"{d['median']:.4f} [{d['min']:.4f}, {d['max']:.4f}]"
    lines = [f"{'setting':<{width}}  {'dev ' + m + ': median [min, max]':<30}  {'IQR':>6}  "
             f"{'test median':>11}   ({sweep['seeds']} seeds)"]
    for r in sweep["settings"]:
        test = f"{r['test']['median']:.4f}" if "test" in r else "-"
        mark = "  <- best on dev" if r["setting"] == sweep["best"]["setting"] else ""
        lines.append(f"{r['setting']:<{width}}  {cell(r['dev']):<30}  {r['dev']['iqr']:>6.4f}  {test:>11}{mark}")
    b = sweep["best"]
    test = f"{b['test_median']:.4f}" if b["test_median"] is not None else "n/a (hidden labels)"
    lines.append(f"best on dev: {b['setting']} (dev median {b['dev_median']:.4f}); its test median {test}")
    return "\n".join(lines)
