"""One record per model family that the shared code asks: the family spec and its registry.

A family registers one `FamilySpec` at the bottom of its own file under models/ (models/bert.py,
models/mae.py); `--init` for both trainers, export, config validation and the trainers' family
registries read it, so the shared code never names a family. Specs of the package's families are
imported only when asked for (BERT runs never import the image code); a family that lives
elsewhere (a test's) calls `register` itself.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

from infra.errors import UserError

DEFAULT = "bert"  # the family of a config or workdir that names none (runs before `family` existed)
_MODULES = {"bert": "models.bert", "mae": "models.mae", "modernbert": "models.modernbert"}  # where each package family registers
_SPECS: dict[str, "FamilySpec"] = {}


def _attribute(path: str):
    """`"package.module:name"` -> that object, imported on first use."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclasses.dataclass(frozen=True)
class FamilySpec:
    name: str                       # what a config's `family` says
    config_class: type              # frozen dataclass with `from_model_config(dict)`
    sizes: dict                     # the size table: name -> shape tuple
    size_of: Callable[[Any], str]   # a config -> its `sizes` name, or "custom"
    shape_fields: tuple[str, ...]   # the config fields a source fixes (run.json records them)
    carried_fields: tuple[str, ...] = ()  # fields pretraining's --init of an HF folder brings (no flag)
    pretrain: str | None = None     # module with `setup(config, workdir, init, explicit)` (or
    finetune: str | None = None     # "module:function"); the same for fine-tuning
    hf: str | None = None           # "module:NAME" of its models.hf_table.Family record
    tokenizer: str = "none"         # "wordpiece" | "bpe" | "none" (images)
    encoder: str = "encoder"        # the subtree of pretraining params that fine-tuning takes
    heads: tuple[str, ...] = ()     # pretraining params a source may lack (start random)
    pretrain_sources: tuple[str, ...] = ()  # HF classes pretraining's --init takes (empty: all)
    checks: dict = dataclasses.field(default_factory=dict)  # trainer -> {config key: rule}
    cross_check: Callable[[Any, str], str | None] | None = None  # (config, trainer) -> problem

    def model_config(self, model_group, **kw):
        """The family's config from a run's `model` group (or a dict), as one UserError if bad."""
        try:
            return self.config_class.from_model_config(model_group, **kw)
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"config.model does not describe a {self.name} model: {e}") from None

    def hf_record(self):
        if self.hf is None:
            raise UserError(f"the {self.name} family has no HuggingFace record")
        return _attribute(self.hf)

    def setup(self, trainer: str) -> Callable:
        module = self.pretrain if trainer == "pretrain" else self.finetune
        if module is None:
            raise UserError(f"the {self.name} family has no {trainer} setup")
        return _attribute(module if ":" in module else module + ":setup")


def sized_config(cls, model_cfg, noun: str, allow=()):
    """A family's config dataclass `cls` (with `of_size(size, vocab_size, **overrides)`) from a
    run config's `model` group or a plain dict: `size` + `vocab_size` + field overrides, or (`size`
    absent or empty) every field spelled out. A key that is neither a field, `size`, nor in
    `allow` is a ValueError naming it, so that a misspelt override fails instead of silently
    doing nothing; callers whose model group carries more (fine-tuning's `pooling`) list those
    keys in `allow`. `noun` names the family in the messages."""
    given = dict(model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else model_cfg)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(given) - fields - {"size"} - set(allow))
    if unknown:
        raise ValueError(f"unknown {noun} model key(s) {', '.join(map(repr, unknown))}; "
                         f"known: size, {', '.join(sorted(fields))}")
    size = given.pop("size", "")
    given = {k: v for k, v in given.items() if k in fields}
    if not size:
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.name not in given]
        if required:
            raise ValueError(f"a {noun} model without `size` needs {', '.join(required)}")
        return cls(**given)
    if "vocab_size" not in given:
        raise ValueError(f"a {noun} model of size {size!r} needs vocab_size")
    return cls.of_size(size, given.pop("vocab_size"), **given)


def register(spec: FamilySpec) -> FamilySpec:
    _SPECS[spec.name] = spec
    return spec


def names() -> list[str]:
    return sorted({*_MODULES, *_SPECS})


def get(name: str | None) -> FamilySpec:
    """The spec of family `name` (None: the default); a one-line error for an unknown name."""
    name = name or DEFAULT
    if name not in _SPECS and name in _MODULES:
        importlib.import_module(_MODULES[name])
    if name not in _SPECS:
        raise UserError(f"config.family={name!r} is not a model family; choose one of: {', '.join(names())}")
    return _SPECS[name]


def of_config(config) -> FamilySpec:
    """The spec of a run config (a ConfigDict or config.json's dict)."""
    return get(config.get("family"))


def everything() -> list[FamilySpec]:
    return [get(name) for name in names()]
