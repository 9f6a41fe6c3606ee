"""Every config value checked before any work, in one table per kind of run: key -> what is allowed.

`validate(config)` raises a one-line UserError naming the key, the value and what is allowed.
`training.config.parse_cli` calls it once the overrides are applied; trainers may call it too.
A config with a field this table does not know, or without one it needs, is refused as well.

The choice lists repeat names that models/ and finetune/ own (training/ imports neither);
tests/test_validate.py keeps them equal. A warmup or decay longer than the run is allowed:
the schedule clips it, so a short test run keeps the default warmup.
"""

import dataclasses
import math
import re

import ml_collections

from training.errors import UserError

INT32_MAX = 2**31 - 1  # steps, sizes and seeds end up in int32 arrays or counters


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True)
class Int:
    lo: int
    hi: int = INT32_MAX
    special: dict = dataclasses.field(default_factory=dict)  # value -> what it means

    def ok(self, v) -> bool:
        return _is_int(v) and (v in self.special or self.lo <= v <= self.hi)

    def allowed(self) -> str:
        text = f"an integer >= {self.lo}" if self.hi == INT32_MAX else \
            f"an integer in [{self.lo}, {self.hi}]"
        return text + "".join(f", or {k} ({meaning})" for k, meaning in self.special.items())


@dataclasses.dataclass(frozen=True)
class Real:
    lo: float
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False

    def ok(self, v) -> bool:
        if not (_is_int(v) or isinstance(v, float)) or not math.isfinite(v):
            return False
        return (v > self.lo if self.lo_open else v >= self.lo) and \
            (v < self.hi if self.hi_open else v <= self.hi)

    def allowed(self) -> str:
        if self.hi == math.inf:
            return f"a finite number {'>' if self.lo_open else '>='} {self.lo:g}"
        return (f"a number in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}"
                f"{')' if self.hi_open else ']'}")


@dataclasses.dataclass(frozen=True)
class Bool:
    def ok(self, v) -> bool:
        return isinstance(v, bool)

    def allowed(self) -> str:
        return "true or false"


@dataclasses.dataclass(frozen=True)
class Text:
    """A string; `required`: non-empty; `names`/`prefixes`: one of the names or a prefixed form."""
    required: bool = False
    names: tuple = ()
    prefixes: tuple = ()
    meaning: str = ""

    def ok(self, v) -> bool:
        if not isinstance(v, str) or (self.required and not v.strip()):
            return False
        if not self.names and not self.prefixes:
            return True
        return v in self.names or any(v.startswith(p) and len(v) > len(p) for p in self.prefixes)

    def allowed(self) -> str:
        return self.meaning or ("a non-empty string" if self.required else "a string")


@dataclasses.dataclass(frozen=True)
class Span:
    """A range of steps, START:COUNT (both >= 1), or "" for none."""

    def ok(self, v) -> bool:
        return isinstance(v, str) and (v == "" or re.fullmatch(r"[1-9][0-9]{0,8}:[1-9][0-9]{0,8}", v)
                                       is not None)

    def allowed(self) -> str:
        return "START:COUNT (3:2 is steps 3 and 4), or '' for none"


@dataclasses.dataclass(frozen=True)
class Choice:
    options: tuple
    noun: str  # what the value names, for the message: "unknown BERT size 'huge'"

    def ok(self, v) -> bool:
        return isinstance(v, str) and v in self.options

    def allowed(self) -> str:
        return "choose one of: " + ", ".join(self.options)


COUNT = Int(1)                      # steps, sizes, batch sizes
NONNEG = Int(0)
SEED = Int(0)                       # numpy's default_rng refuses negative seeds
RATE = Real(0)                      # learning rates, weight decay, penalties
PROB = Real(0, 1)
DROPOUT = Real(0, 1, hi_open=True)
BETA = Real(0, 1, hi_open=True)
MESH_AXIS = Int(1, special={-1: "all remaining devices"})

# Names owned by models/bert.py and models/mae.py (SIZES), models/layers.py (ATTENTIONS),
# finetune/tasks.py (TASKS),
# finetune/text.py and finetune/image.py (POOLINGS) and pretrain/prepare.py (OBJECTIVES); kept
# equal by tests/test_validate.py.
BERT_SIZES = ("tiny", "mini", "small", "medium", "base", "large")
MAE_SIZES = ("tiny", "small", "base", "large", "huge")
DTYPES = ("float32", "bfloat16", "float16")
REMATS = ("none", "full", "dots", "dots_no_batch")  # models/layers.py REMAT_POLICIES
ATTENTIONS = ("auto", "reference", "xla", "cudnn")  # models/layers.py
OBJECTIVES = ("nsp", "sop", "mlm_packed")
DECAYS = ("linear", "cosine", "constant")
POOLINGS = ("cls", "mean")
TASKS = ("rt_polarity", "reuters_r8", "newsgroups20", "glue/cola", "glue/sst2", "glue/mrpc",
         "glue/qqp", "glue/stsb", "glue/mnli", "glue/qnli", "glue/rte", "glue/wnli")
IMAGE_TASKS = ("mnist",)

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
    "checkpoint.every_steps": NONNEG,   # 0: at every evaluation
    "eval.every_steps": NONNEG,         # 0: once per epoch
    "eval.batch_size": NONNEG,          # 0: train.batch_size
}

_BERT = {
    "model.size": Choice(BERT_SIZES, "BERT size"),
    "model.vocab_size": NONNEG,         # set by the run from the tokenizer
    "model.max_position": COUNT,
    "model.dropout": DROPOUT,
    "model.attention_dropout": DROPOUT,
    "model.scan_layers": Bool(),
    "model.attention": Choice(ATTENTIONS, "attention implementation"),
    "data.tokenizer": Text(),
    "data.vocab_size": COUNT,
    "data.max_seq_len": Int(8),
}

_MAE = {
    "model.size": Choice(MAE_SIZES, "MAE size"),
}

_IMAGES = {
    "data.crop_scale_min": Real(0, 1, lo_open=True),
    "data.flip": Bool(),
}

TABLES = {
    ("pretrain", "bert"): {**_COMMON, **_PRETRAIN, **_BERT,
        # One source or a weighted mixture (news:0.7,task:rt_polarity:0.3): data/corpora.py
        # parses the weights and names a bad one.
        "data.source": Text(required=True, names=("news", "pydocs"),
                            prefixes=("files:", "tfds:", "task:", "news:", "pydocs:", "parquet:",
                                      "hf:"),
                            meaning="news, pydocs, files:PATTERN, tfds:NAME[:SPLIT], task:NAME, "
                                    "parquet:GLOB[:COLUMN], hf:PATH[:SPLIT][:COLUMN] or "
                                    "SOURCE:WEIGHT,SOURCE:WEIGHT,..."),
        "data.objective": Choice(OBJECTIVES, "pretraining objective"),
        "data.seed": SEED,
        "data.max_predictions": COUNT,
        "data.mask_prob": Real(0, 1, lo_open=True),
        "data.whole_word": Bool(),
        "data.short_seq_prob": PROB,
        "data.dupe_factor": COUNT,
        "data.eval_fraction": Real(0, 1, hi_open=True),
        "data.max_doc_tokens": COUNT,
        "data.shard_documents": COUNT,
        "data.prepare_workers": Int(0, special={-1: "one per CPU"}),
        "data.strict": Bool(),
        "data.max_skipped_share": PROB,
        "data.workers": NONNEG,
        "data.prefetch": NONNEG},
    ("finetune", "bert"): {**_COMMON, **_FINETUNE, **_BERT,
        "model.classifier_dropout": DROPOUT,
        "model.pooling": Choice(POOLINGS, "pooling"),
        "data.task": Choice(TASKS, "task")},
    ("pretrain", "mae"): {**_COMMON, **_PRETRAIN, **_MAE, **_IMAGES,
        "model.image_size": Int(0),     # 0: the size's
        "model.patch_size": Int(0),
        "model.num_channels": Int(0),
        "model.mask_ratio": Real(0, 1, lo_open=True, hi_open=True),
        "model.norm_pix_loss": Bool(),
        "data.source": Text(required=True, names=("mnist",), prefixes=("tfds:",),
                            meaning="mnist or tfds:NAME"),
        "data.workers": NONNEG,
        "data.prefetch": NONNEG},
    ("finetune", "mae"): {**_COMMON, **_FINETUNE, **_MAE, **_IMAGES,
        "model.drop_path": DROPOUT,
        "model.pooling": Choice(POOLINGS, "pooling"),
        "model.probe_norm": Bool(),
        "data.task": Text(required=True, names=IMAGE_TASKS, prefixes=("tfds:",),
                          meaning="mnist or tfds:NAME")},
}
PRETRAIN, FINETUNE = TABLES["pretrain", "bert"], TABLES["finetune", "bert"]


def _cross_checks(c, table) -> str | None:
    """Rules between fields; the first broken one as a message."""
    axes = [c.mesh.data, c.mesh.fsdp, c.mesh.tensor]
    if axes.count(-1) > 1:
        return f"mesh {tuple(axes)}: at most one of mesh.data/fsdp/tensor may be -1"
    if c.train.batch_size % c.train.grad_accum:
        return (f"train.batch_size={c.train.batch_size} does not split into "
                f"train.grad_accum={c.train.grad_accum} microbatches; use a multiple of it")
    if table is PRETRAIN:  # BERT's sequence budget
        if c.data.max_predictions > c.data.max_seq_len:
            return (f"data.max_predictions={c.data.max_predictions} exceeds "
                    f"data.max_seq_len={c.data.max_seq_len}; lower it")
        if c.data.max_seq_len > c.model.max_position:
            return (f"data.max_seq_len={c.data.max_seq_len} exceeds "
                    f"model.max_position={c.model.max_position}; raise model.max_position")
    elif "method" in c and c.train.steps == 0 and c.train.epochs == 0:
        return "train.steps=0 and train.epochs=0: set train.epochs or train.steps above 0"
    return None


def table_for(config: ml_collections.ConfigDict) -> dict | None:
    """The table of the config's trainer (fine-tuning configs have a `method` group) and family;
    None for a family registered from outside (only what every run has is checked then)."""
    trainer = "finetune" if "method" in config else "pretrain"
    return TABLES.get((trainer, config.get("family", "bert")))


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
    table = table_for(config)
    values = dict(_leaves(config))
    if table is None:  # an outside family: its own fields are its own business
        table = {k: rule for k, rule in _COMMON.items() if k in values}
    for key, value in values.items():
        if key not in table and table_for(config) is not None:
            raise UserError(f"config field {key} is not used by this trainer; remove it from "
                            f"the config file (a misspelt field would be ignored)")
    for key, rule in table.items():
        if key not in values:
            raise UserError(f"the config has no field {key}; a config file starts from one in "
                            f"configs/ and changes fields")
        if not rule.ok(values[key]):
            raise UserError(message(key, values[key], rule))
    problem = _cross_checks(config, table)
    if problem:
        raise UserError(problem)
