"""The rules a config value is checked against (training/validate.py and each family's `checks`).

Each rule says whether a value is allowed (`ok`) and, for the message, what is (`allowed`).
They sit in the bottom package so that a family's spec under models/ can state its own fields.
"""

import dataclasses
import math
import re

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
    prefixes: tuple = ()  # also PREFIX + a non-empty rest ("conll:" for conll:DIR)

    def ok(self, v) -> bool:
        return isinstance(v, str) and (v in self.options or any(
            v.startswith(p) and len(v) > len(p) for p in self.prefixes))

    def allowed(self) -> str:
        return "choose one of: " + ", ".join((*self.options, *(f"{p}..." for p in self.prefixes)))


COUNT = Int(1)                      # steps, sizes, batch sizes
NONNEG = Int(0)
SEED = Int(0)                       # numpy's default_rng refuses negative seeds
RATE = Real(0)                      # learning rates, weight decay, penalties
PROB = Real(0, 1)
DROPOUT = Real(0, 1, hi_open=True)
BETA = Real(0, 1, hi_open=True)
MESH_AXIS = Int(1, special={-1: "all remaining devices"})

# Names owned by models/layers.py (REMAT_POLICIES), finetune/tasks.py (TASKS), finetune/text.py
# and finetune/image.py (POOLINGS) and data/preparation.py (OBJECTIVES), mirrored here so that a
# family's checks (models/) need no trainer; kept equal by tests/test_validate.py.
DTYPES = ("float32", "bfloat16", "float16")
REMATS = ("none", "full", "dots", "dots_no_batch")  # models/layers.py REMAT_POLICIES
OBJECTIVES = ("nsp", "sop", "mlm_packed")
DECAYS = ("linear", "cosine", "constant", "1-sqrt")
POOLINGS = ("cls", "mean")
TASKS = ("rt_polarity", "reuters_r8", "newsgroups20", "glue/cola", "glue/sst2", "glue/mrpc",
         "glue/qqp", "glue/stsb", "glue/mnli", "glue/qnli", "glue/rte", "glue/wnli",
         "wnut_tweets", "conll2003")
TEXT_TASK_PREFIXES = ("conll:", "squad:")  # conll:DIR and squad:DIR, the user's files
IMAGE_TASKS = ("mnist",)
SQUAD_TASKS = ("squad/v1.1", "squad/v2.0")  # data/squad.py TFDS_NAMES; and squad:DIR
QUANTIZE = ("none", "int8")  # models/quantize.py QTYPES, and none
