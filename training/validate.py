"""Every config value checked before any work, in one table per kind of run: key -> what is allowed.

`validate(config)` raises a one-line UserError naming the key, the value and what is allowed.
`training.config.parse_cli` calls it once the overrides are applied; trainers may call it too.
A config with a field this table does not know, or without one it needs, is refused as well.

A run's table is what every run has, its trainer's fields and its family's own (the `checks` of
its spec, models/family.py), so no family is named here. A warmup or decay longer than the run is allowed:
the schedule clips it, so a short test run keeps the default warmup.
"""

import ml_collections

from infra.errors import UserError
from infra.rules import (BETA, COUNT, DECAYS, DROPOUT, DTYPES, MESH_AXIS, NONNEG, PROB, RATE, SEED,  # noqa: F401
                         QUANTIZE, REMATS, Bool, Choice, Int, Real, Span, Text)
from models import family as families

# What every run has, whatever its trainer and family.
_COMMON = {
    "family": Text(required=True, meaning="a model family"),
    "model.dtype": Choice(DTYPES, "compute dtype"),
    "model.remat": Choice(REMATS, "remat policy"),
    "data.data_dir": Text(required=True, meaning="a folder or gs:// URL"),
    "train.batch_size": COUNT,
    "train.grad_accum": COUNT,
    "train.seed": SEED,
    "train.log_every": COUNT,
    "optim.lr": RATE,
    "optim.decay": Choice(DECAYS, "decay schedule"),
    "optim.decay_steps": NONNEG,        # 0: decay over all steps after warmup
    "optim.end_lr_ratio": PROB,
    "optim.weight_decay": RATE,
    "optim.b1": BETA,
    "optim.b2": BETA,
    "optim.eps": RATE,
    "optim.clip_norm": Real(0),         # 0: no clipping
    "mesh.data": MESH_AXIS,
    "mesh.fsdp": MESH_AXIS,
    "mesh.tensor": MESH_AXIS,
    "checkpoint.keep": COUNT,
    "checkpoint.every_seconds": Real(0),
    "distributed.heartbeat_timeout_s": Int(1),
    "distributed.shutdown_timeout_s": Int(1),
    "perf.peak_tflops": Real(0),        # 0: look the chip up
    "wandb.project": Text(),
    "profile.steps": Span(),            # a jax.profiler trace of these steps (training/profiling.py)
    "profile.all_processes": Bool(),
}

_PRETRAIN = {
    "train.steps": COUNT,
    "train.batch_warmup_steps": NONNEG,  # 0: no batch-size warmup (data/pipeline.py BatchWarmup)
    "train.batch_warmup_start": NONNEG,
    "optim.warmup_steps": NONNEG,
    "checkpoint.every_steps": NONNEG,   # 0: only at the end and when stopped
    "eval.every_steps": COUNT,
    "eval.max_batches": COUNT,
}

_FINETUNE = {
    "data.max_train_examples": NONNEG,  # 0: all
    "data.max_eval_examples": NONNEG,
    "train.epochs": Real(0),
    "train.steps": NONNEG,              # 0: from train.epochs
    "optim.warmup_steps": Int(0, special={-1: "optim.warmup_ratio of all steps"}),
    "optim.warmup_ratio": PROB,
    "method.freeze_encoder": Bool(),
    "method.freeze_bottom": Int(0, special={-1: "none frozen"}),
    "method.l2sp_alpha": RATE,
    "method.layer_decay": Real(0, 1, lo_open=True),
    "method.label_smoothing": Real(0, 1, hi_open=True),
    "method.mixup_alpha": RATE,         # 0: off (image families)
    "method.cutmix_alpha": RATE,
    "method.sparsity": Real(0, 1, hi_open=True),     # training/pruning.py
    "method.prune_heads": Real(0, 1, hi_open=True),
    "method.prune_start": NONNEG,
    "method.prune_end": Int(0, special={-1: "two thirds of the run"}),
    "method.prune_every": COUNT,
    "method.quantize": Choice(QUANTIZE, "quantisation type"),        # quantisation-aware
    "method.quantize_after": Choice(QUANTIZE, "quantisation type"),  # post-training
    "method.distill_from": Text(meaning="a teacher folder, or '' for none"),  # finetune/distill.py
    "method.distill_temperature": Real(0, lo_open=True),
    "method.distill_alpha": PROB,
    "method.distill_dtype": Choice(("float32", "bfloat16"), "teacher dtype"),
    "checkpoint.every_steps": NONNEG,   # 0: at every evaluation
    "eval.every_steps": NONNEG,         # 0: once per epoch
    "eval.batch_size": NONNEG,          # 0: train.batch_size
}

TRAINERS = {"pretrain": _PRETRAIN, "finetune": _FINETUNE}

# Fields any config may have or leave out. search.space: training/search.py parses it (--search).
OPTIONAL = {"search.space": Text(),
            # pretraining distillation (pretrain/distill.py); configs without the group do none
            "distill.teacher": Text(meaning="a pretraining workdir, or '' for none"),
            "distill.temperature": Real(0, lo_open=True),
            "distill.alpha_soft": RATE, "distill.alpha_mlm": RATE, "distill.alpha_cos": RATE,
            "distill.student_layers": Int(0, special={0: "half the teacher's"}),
            "distill.init_from_teacher": Bool(),
            "distill.dtype": Choice(("float32", "bfloat16"), "teacher dtype")}


def _cross_checks(c) -> str | None:
    """Rules between fields; the first broken one as a message."""
    axes = [c.mesh.data, c.mesh.fsdp, c.mesh.tensor]
    if axes.count(-1) > 1:
        return f"mesh {tuple(axes)}: at most one of mesh.data/fsdp/tensor may be -1"
    if c.train.batch_size % c.train.grad_accum:
        return (f"train.batch_size={c.train.batch_size} does not split into "
                f"train.grad_accum={c.train.grad_accum} microbatches; use a multiple of it")
    start, batch = c.train.get("batch_warmup_start", 0), c.train.batch_size
    if c.train.get("batch_warmup_steps", 0) and not (0 < start <= batch and batch % start == 0):
        return (f"train.batch_warmup_start={start} must divide train.batch_size={batch} (every "
                f"step takes a whole number of batches of that many rows); set it to a divisor "
                f"of {batch}, or train.batch_warmup_steps=0 for no batch-size warmup")
    if trainer(c) == "finetune" and c.train.steps == 0 and c.train.epochs == 0:
        return "train.steps=0 and train.epochs=0: set train.epochs or train.steps above 0"
    spec = families.of_config(c)
    return spec.cross_check(c, trainer(c)) if spec.cross_check else None


def trainer(config) -> str:
    """Which trainer a config is for: fine-tuning configs have a `method` group."""
    return "finetune" if "method" in config else "pretrain"


def table_for(config: ml_collections.ConfigDict) -> dict | None:
    """The table of the config's trainer and family (its spec's `checks`); None for a family
    whose spec states no checks for this trainer (only what every run has is checked then)."""
    checks = families.of_config(config).checks.get(trainer(config))
    return None if checks is None else {**_COMMON, **TRAINERS[trainer(config)], **checks}


def _leaves(cfg, prefix: str = ""):
    for k, v in cfg.items():
        if isinstance(v, ml_collections.ConfigDict):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield prefix + k, v


def message(key: str, value, rule) -> str:
    if isinstance(rule, Choice):
        return f"unknown {rule.noun} {value!r} for {key}; {rule.allowed()}"
    return f"{key}={value!r}: expected {rule.allowed()}; fix --config.{key} or the config file"


def validate(config: ml_collections.ConfigDict) -> None:
    """Raise a one-line UserError for the first value the run cannot use."""
    if "family" in config and not _COMMON["family"].ok(config.family):  # it chooses the table
        raise UserError(message("family", config.family, _COMMON["family"]))
    table = table_for(config)
    values = dict(_leaves(config))
    checked = table is not None
    if not checked:  # a family without checks: its own fields are its own business
        table = {k: rule for k, rule in _COMMON.items() if k in values}
    rules = {**table, **{k: rule for k, rule in OPTIONAL.items() if k in values}}
    for key, value in values.items():
        if key not in rules and checked:
            raise UserError(f"config field {key} is not used by this trainer; remove it from "
                            f"the config file (a misspelt field would be ignored)")
    for key, rule in rules.items():
        if key not in values:
            raise UserError(f"the config has no field {key}; a config file starts from one in "
                            f"configs/ and changes fields")
        if not rule.ok(values[key]):
            raise UserError(message(key, values[key], rule))
    problem = _cross_checks(config)
    if problem:
        raise UserError(problem)
