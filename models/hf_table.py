"""The language of HuggingFace name tables: how a model family describes its checkpoint.

A family (`models/hf_bert.py`, ...) is data: rules that map each of our parameter leaves to one
HuggingFace tensor with the layout between the two, the config.json conversion both ways, and the
HuggingFace classes it exports as. `models/hf.py` reads the same table one way to export and the
other way to import.

A rule's `dims` names our shape in letters that the family resolves against its config (BERT:
V vocab, D hidden, N heads, H head size, F feed-forward, P max positions, Y token types); C is
the number of classes, which comes from the classifier rather than the config; digits are
literal sizes. A parenthesised group is one axis of ours that the layout sees split: MAE's patch
kernel `(K K I) D` is our (p*p*C, D) array and, to the conv layout, a (p, p, C, D) kernel.
`{i}`, `{j}`... in a name is a layer index that ranges over the config field the family's
`depths` names for that letter, so an encoder and a decoder can differ in depth.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from typing import Any, Callable, NamedTuple

import numpy as np

LAYER = re.compile(r"\{([a-z])\}")


class ConversionError(ValueError):
    """A checkpoint or parameter tree that cannot be converted; the message is one line."""


def converted_config(config: dict, supported: dict, build: Callable[[], Any]):
    """A family's config from a HuggingFace config.json: refuses the variants our model does not
    run (`supported`: key -> the only value it takes), then `build()`s ours; a missing or bad
    key is one ConversionError."""
    for key, want in supported.items():
        if config.get(key, want) != want:
            raise ConversionError(f"config.json has {key}={config[key]!r}; only {want!r} is supported")
    try:
        return build()
    except KeyError as e:
        raise ConversionError(f"config.json lacks {e.args[0]!r}") from None
    except ValueError as e:
        raise ConversionError(f"config.json: {e}") from None


def encoder_shape(config: dict) -> dict:
    """The shape fields every encoder's config.json names alike, as our configs call them."""
    return dict(vocab_size=config["vocab_size"], num_layers=config["num_hidden_layers"],
                hidden_size=config["hidden_size"], num_heads=config["num_attention_heads"],
                intermediate_size=config["intermediate_size"])


class Layout(NamedTuple):
    """How one of our arrays (shape `ours`) is laid out in a HuggingFace state dict."""
    name: str
    hf_shape: Callable[[tuple], tuple]
    to_hf: Callable[[np.ndarray], np.ndarray]
    from_hf: Callable[[np.ndarray, tuple], np.ndarray]


COPY = Layout("copy", lambda s: s, lambda x: x, lambda y, s: y)
FLAT = Layout("flat", lambda s: (math.prod(s),), lambda x: x.reshape(-1), lambda y, s: y.reshape(s))


def kernel(n_in: int) -> Layout:
    """A kernel with `n_in` leading input axes <-> a torch Linear weight (out, in)."""
    return Layout(
        f"kernel{n_in}",
        lambda s: (math.prod(s[n_in:]), math.prod(s[:n_in])),
        lambda x: x.reshape(math.prod(x.shape[:n_in]), -1).T,
        lambda y, s: y.T.reshape(s))


def conv(n_spatial: int = 2) -> Layout:
    """A Flax conv kernel (*K, C_in, D), e.g. (kh, kw, C_in, D) <-> torch's (D, C_in, kh, kw)."""
    to_torch = (n_spatial + 1, n_spatial, *range(n_spatial))
    back = tuple(int(a) for a in np.argsort(to_torch))
    return Layout(f"conv{n_spatial}", lambda s: tuple(s[a] for a in to_torch),
                  lambda x: x.transpose(to_torch), lambda y, s: y.transpose(back))


class Rule(NamedTuple):
    ours: str | None  # slash path in our params, with layer letters; None: a fixed tensor
    hf: str           # HuggingFace name relative to the base model ("embeddings...") or a head ("cls...")
    dims: str         # our shape in letters (a fixed tensor: its HuggingFace shape)
    layout: Layout = COPY
    # A tensor that HuggingFace stores but our model computes (ViTMAE's sin-cos position
    # tables): cfg -> its value; export writes it, import checks it.
    fixed: Callable[[Any], np.ndarray] | None = None
    # cfg -> whether the tensor exists (ViT's query bias only with qkv_bias); None: always.
    when: Callable[[Any], bool] | None = None
    # layer indices ({"i": 3}) -> whether that layer has the tensor (ModernBERT's layer 0 has
    # no attention norm); None: every layer.
    at: Callable[[dict], bool] | None = None


def axes(dims: str) -> list[list[str]]:
    """A rule's dims as our axes, each the letters the layout sees: "(K K I) D" -> [[K, K, I], [D]]."""
    found = re.findall(r"\(([^()]*)\)|([^\s()]+)|(\S)", dims)
    if any(stray or (not single and not group.split()) for group, single, stray in found):
        raise ValueError(f"dims {dims!r}: unbalanced or empty parentheses")
    return [[single] if single else group.split() for group, single, _ in found]


def dense(ours: str, hf: str, d_in: str, d_out: str) -> list[Rule]:
    return [Rule(f"{ours}/kernel", f"{hf}.weight", f"{d_in} {d_out}", kernel(len(d_in.split()))),
            Rule(f"{ours}/bias", f"{hf}.bias", d_out, FLAT)]


def norm(ours: str, hf: str, dim: str = "D") -> list[Rule]:
    return [Rule(f"{ours}/scale", f"{hf}.weight", dim), Rule(f"{ours}/bias", f"{hf}.bias", dim)]


@dataclasses.dataclass(frozen=True)
class Architecture:
    """One HuggingFace class of a family: the family's base model plus these heads."""
    heads: tuple[Rule, ...] = ()
    prefix: str = ""                         # where this class keeps the base model ("bert.")
    tied: tuple[tuple[str, str], ...] = ()   # (stored copy, original) that must be equal if stored
    marker: str | None = None                # a top-level key of our params only this class has
    labels: str | None = None                # a classifier: our leaf whose one axis is the classes
    model_type: str | None = None            # config.json's model_type, when not the family's
    lacks: tuple[str, ...] = ()              # base-model rules (their `hf` names) this class has not


class Entry(NamedTuple):
    """One concrete row of a table."""
    ours: tuple | None     # our path as keys, int layer indices; None for a fixed tensor
    hf: str                # the rules' spelling: base-relative for the base model
    name: str              # the name export writes (with the architecture's prefix)
    shape: tuple           # our shape
    layout: Layout
    fixed: Callable | None = None
    groups: tuple | None = None  # where a group splits an axis: each axis's sizes, ((4, 4, 1), (32,))

    @property
    def view(self) -> tuple:
        """Our array as the layout sees it: `shape` with its groups split."""
        return self.shape if self.groups is None else tuple(n for g in self.groups for n in g)

    @property
    def hf_shape(self) -> tuple:
        return tuple(self.layout.hf_shape(self.view))

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        """Our array (`shape`) in HuggingFace's layout (`hf_shape`)."""
        return self.layout.to_hf(x.reshape(self.view))

    def from_hf(self, y: np.ndarray) -> np.ndarray:
        """A HuggingFace tensor (`hf_shape`) as our array (`shape`)."""
        return self.layout.from_hf(y, self.view).reshape(self.shape)

    def describe(self) -> str:
        """Our shape as messages spell it: (16, 32), or (4*4*1, 32) = (16, 32) for a group."""
        if self.groups is None:
            return str(self.shape)
        return f"({', '.join('*'.join(map(str, g)) for g in self.groups)}) = {self.shape}"


@dataclasses.dataclass(frozen=True)
class Family:
    """Everything export and import know about one model family."""
    model_type: str                           # config.json's model_type
    config: type                              # our config class
    rules: tuple[Rule, ...]                   # the base model; HF names relative to it
    dims: dict[str, str | Callable]           # shape letter -> our config's field (or cfg -> size)
    depths: dict[str, str]                    # layer letter -> the config field that counts them
    to_hf: Callable[[Any], dict]              # our config -> the family's config.json keys
    from_hf: Callable[[dict], Any]            # config.json -> our config; refuses what we can't run
    base: str                                 # the architecture that is the bare base model
    architectures: dict[str, Architecture]    # in the order `infer_architecture` tries them
    ours: str = "encoder"                     # where our params keep the base model
    prefix: str = ""                          # the base-model prefix stored names may carry
    renames: tuple[tuple[str, str], ...] = ()  # (regex, replacement): other spellings -> the rules'
    ignored: tuple[str, ...] = ()             # regexes of stored buffers that are not parameters
    # A run's `model` group (its config's fields and `size`) -> our config, for the CLI.
    from_model_config: Callable[[dict], Any] | None = None
    # An image family: (cfg, (mean, std)) -> preprocessor_config.json, and (run config, cfg) ->
    # the (mean, std) that run normalised pixels with.
    image_processor: Callable[[Any, tuple], dict] | None = None
    image_stats: Callable[[dict, Any], tuple] | None = None

    def __post_init__(self):  # a typo in a table fails on import, not half-way through an export
        for rule in self.rules + tuple(r for a in self.architectures.values() for r in a.heads):
            letters = {d for group in axes(rule.dims) for d in group if not d.isdigit()}
            letters -= set(self.dims) | {"C"}
            letters |= set(LAYER.findall(rule.hf)) - set(self.depths)
            letters |= set(LAYER.findall(rule.ours or "")) - set(LAYER.findall(rule.hf))
            if letters:
                raise ValueError(f"{self.model_type} rule {rule.hf}: undefined letters {sorted(letters)}")

    @property
    def model_types(self) -> set[str]:
        return {self.model_type} | {a.model_type for a in self.architectures.values() if a.model_type}

    def canonical(self, stored: str) -> str:
        """A stored name as the rules spell it: without the base-model prefix, renamed."""
        name = stored.removeprefix(self.prefix)
        for pattern, new in self.renames:
            name = re.sub(pattern, new, name)
        return name

    def table(self, architecture: str, cfg, num_labels: int | None = None) -> list[Entry]:
        """The rows of `architecture` for `cfg`, expanded over each layer letter's depth."""
        arch = self.architectures[architecture]
        if not isinstance(cfg, self.config):
            raise ConversionError(f"{architecture} needs a {self.config.__name__}, got {type(cfg).__name__}")
        sizes = {letter: field(cfg) if callable(field) else getattr(cfg, field)
                 for letter, field in self.dims.items()} | {"C": num_labels}
        depths = {letter: getattr(cfg, field) for letter, field in self.depths.items()}
        rows = []
        for rule, in_base in ([(r, True) for r in self.rules if r.hf not in arch.lacks]
                             + [(r, False) for r in arch.heads]):
            if rule.when is not None and not rule.when(cfg):
                continue
            dims = axes(rule.dims)
            if any("C" in group for group in dims) and num_labels is None:
                raise ConversionError(f"{architecture} needs the number of classes")
            groups = tuple(tuple(int(d) if d.isdigit() else sizes[d] for d in g) for g in dims)
            shape = tuple(math.prod(g) for g in groups)
            groups = groups if any(len(g) > 1 for g in groups) else None
            letters = sorted(set(LAYER.findall(rule.hf)))
            for index in itertools.product(*(range(depths[letter]) for letter in letters)):
                at = dict(zip(letters, index))
                if rule.at is not None and not rule.at(at):
                    continue
                ours = None
                if rule.ours is not None:
                    keys = [at[m[1]] if (m := LAYER.fullmatch(k)) else k for k in rule.ours.split("/")]
                    ours = ((self.ours,) if in_base else ()) + tuple(keys)
                hf = LAYER.sub(lambda m: str(at[m[1]]), rule.hf)
                name = (arch.prefix if in_base else "") + hf
                rows.append(Entry(ours, hf, name, shape, rule.layout, rule.fixed, groups))
        return rows
