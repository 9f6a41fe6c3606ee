"""HuggingFace Transformers import and export for BERT: plain safetensors + JSON, no torch needed.

One name table per architecture maps our parameter paths to HuggingFace state-dict names, with
the transform between the two layouts; export and import read the same table in opposite
directions. Our kernels are (in..., out...), PyTorch's Linear weights are (out, in): attention
projections go (D, N, H) <-> (N*H, D) and (N, H, D) <-> (D, N*H), biases (N, H) <-> (N*H,).

    python -m models.hf export --checkpoint WORKDIR_OR_STEP --out DIR

writes a folder that `transformers.AutoModelForPreTraining` (or `AutoModelForSequenceClassification`)
and `AutoTokenizer` load with no custom code. Facts checked on transformers 5.23:

- `save_pretrained` writes no `cls.predictions.decoder.{weight,bias}`: the decoder is tied to the
  word embeddings and to `cls.predictions.bias` (`_tied_weights_keys`), so neither do we. On import
  such copies (older checkpoints) are accepted only when they equal what they are tied to.
- `hidden_act: "gelu"` is the exact (erf) GELU our model uses; `layer_norm_eps` is carried over.
- `BertTokenizer` rebuilds its normalizer from `tokenizer_config.json` (do_lower_case,
  strip_accents, tokenize_chinese_chars) and takes only the vocabulary and post-processor from
  `tokenizer.json`, so the two files must agree; `export_tokenizer` checks that they do.

Weights are never unpickled: a folder with only `pytorch_model.bin` / `*.pt` is refused.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import secrets
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, NamedTuple

import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from models.bert import BertConfig


class ConversionError(ValueError):
    """A checkpoint or parameter tree that cannot be converted; the message is one line."""


# =============================================================================================
# The name tables
# =============================================================================================
#
# A rule maps one of our leaves to one HuggingFace tensor. `dims` names our shape in letters,
# resolved against the config: V vocab, D hidden, N heads, H head size, F feed-forward,
# P max positions, Y token types, C classes; digits are literal sizes.


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


class Rule(NamedTuple):
    ours: str     # slash path in our params; "{i}" for the layer index
    hf: str       # HuggingFace name relative to the base model ("embeddings...") or a head ("cls...")
    dims: str     # our shape, in letters
    layout: Layout


def _dense(ours: str, hf: str, d_in: str, d_out: str) -> list[Rule]:
    return [Rule(f"{ours}/kernel", f"{hf}.weight", f"{d_in} {d_out}", kernel(len(d_in.split()))),
            Rule(f"{ours}/bias", f"{hf}.bias", d_out, FLAT)]


def _norm(ours: str, hf: str) -> list[Rule]:
    return [Rule(f"{ours}/scale", f"{hf}.weight", "D", COPY),
            Rule(f"{ours}/bias", f"{hf}.bias", "D", COPY)]


# The encoder (our `encoder/...`, HuggingFace's `BertModel`, `bert.` inside the task models).
ENCODER = [
    Rule("embed/word/embedding", "embeddings.word_embeddings.weight", "V D", COPY),
    Rule("embed/position/embedding", "embeddings.position_embeddings.weight", "P D", COPY),
    Rule("embed/token_type/embedding", "embeddings.token_type_embeddings.weight", "Y D", COPY),
    *_norm("embed/norm", "embeddings.LayerNorm"),
    *_dense("layers/{i}/query", "encoder.layer.{i}.attention.self.query", "D", "N H"),
    *_dense("layers/{i}/key", "encoder.layer.{i}.attention.self.key", "D", "N H"),
    *_dense("layers/{i}/value", "encoder.layer.{i}.attention.self.value", "D", "N H"),
    *_dense("layers/{i}/attn_out", "encoder.layer.{i}.attention.output.dense", "N H", "D"),
    *_norm("layers/{i}/attn_norm", "encoder.layer.{i}.attention.output.LayerNorm"),
    *_dense("layers/{i}/mlp_in", "encoder.layer.{i}.intermediate.dense", "D", "F"),
    *_dense("layers/{i}/mlp_out", "encoder.layer.{i}.output.dense", "F", "D"),
    *_norm("layers/{i}/mlp_norm", "encoder.layer.{i}.output.LayerNorm"),
    *_dense("pooler", "pooler.dense", "D", "D"),
]

PRETRAINING_HEADS = [
    *_dense("mlm_transform", "cls.predictions.transform.dense", "D", "D"),
    *_norm("mlm_norm", "cls.predictions.transform.LayerNorm"),
    Rule("mlm_bias", "cls.predictions.bias", "V", COPY),
    *_dense("nsp", "cls.seq_relationship", "D", "2"),
]

CLASSIFIER_HEAD = _dense("classifier", "classifier", "D", "C")


@dataclasses.dataclass(frozen=True)
class Architecture:
    prefix: str                          # where HuggingFace keeps the encoder in this model
    heads: tuple[Rule, ...]
    tied: tuple[tuple[str, str], ...] = ()  # (HF copy, HF original) pairs that must be equal


ARCHITECTURES = {
    "BertForPreTraining": Architecture("bert.", tuple(PRETRAINING_HEADS), tied=(
        ("cls.predictions.decoder.weight", "embeddings.word_embeddings.weight"),
        ("cls.predictions.decoder.bias", "cls.predictions.bias"))),
    "BertModel": Architecture("", ()),
    "BertForSequenceClassification": Architecture("bert.", tuple(CLASSIFIER_HEAD)),
}

# Names older checkpoints use, and buffers that are not parameters (base-relative names).
LEGACY_RENAMES = ((re.compile(r"LayerNorm\.gamma$"), "LayerNorm.weight"),
                  (re.compile(r"LayerNorm\.beta$"), "LayerNorm.bias"))
IGNORED = re.compile(r"^embeddings\.position_ids$")


class Entry(NamedTuple):
    """One concrete row of a table: our path (keys), HF name (base-relative for the encoder),
    our shape, layout, and whether it lives in the base model (gets the architecture's prefix)."""
    ours: tuple
    hf: str
    shape: tuple
    layout: Layout
    in_base: bool


def _dims(cfg: BertConfig, num_labels: int | None) -> dict[str, int]:
    return {"V": cfg.vocab_size, "D": cfg.hidden_size, "N": cfg.num_heads, "H": cfg.head_size,
            "F": cfg.intermediate_size, "P": cfg.max_position, "Y": cfg.type_vocab_size,
            "C": num_labels}


def name_table(architecture: str, cfg: BertConfig, num_labels: int | None = None) -> list[Entry]:
    """The rows for `architecture`, expanded over layers. HF names of encoder rows are
    relative to the base model (no `bert.`); `hf_name` gives the name in the state dict."""
    arch = _architecture(architecture)
    if cfg.hidden_size % cfg.num_heads:
        raise ConversionError(f"hidden_size {cfg.hidden_size} is not divisible by {cfg.num_heads} heads")
    dims = _dims(cfg, num_labels)

    def shape(letters: str) -> tuple:
        return tuple(int(d) if d.isdigit() else dims[d] for d in letters.split())

    def keys(path: str, i=None) -> tuple:
        return tuple(i if k == "{i}" else k for k in path.split("/"))

    rows = []
    for rule in ENCODER:
        layers = range(cfg.num_layers) if "{i}" in rule.ours else [None]
        for i in layers:
            rows.append(Entry(("encoder",) + keys(rule.ours, i), rule.hf.replace("{i}", str(i)),
                              shape(rule.dims), rule.layout, True))
    rows += [Entry(keys(r.ours), r.hf, shape(r.dims), r.layout, False) for r in arch.heads]
    return rows


def hf_name(architecture: str, entry: Entry) -> str:
    """The state-dict name of a `name_table` row in `architecture`."""
    return (_architecture(architecture).prefix if entry.in_base else "") + entry.hf


def _architecture(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        raise ConversionError(f"unknown architecture {name!r}; supported: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def _path_str(keys: tuple) -> str:
    return "/".join(str(k) for k in keys)


# =============================================================================================
# config.json
# =============================================================================================


def hf_config(cfg: BertConfig, architecture: str, **extra) -> dict:
    """The `config.json` of a HuggingFace BERT for `cfg`. Classifiers need `id2label` (a list or
    {id: label}) or `num_labels`; other `extra` keys are written as given."""
    _architecture(architecture)
    dtype = extra.pop("dtype", "float32")
    config = {
        "architectures": [architecture],
        "model_type": "bert",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.intermediate_size,
        "hidden_act": "gelu",  # exact erf GELU, as models/bert.py
        "hidden_dropout_prob": cfg.dropout,
        "attention_probs_dropout_prob": cfg.attention_dropout,
        "max_position_embeddings": cfg.max_position,
        "type_vocab_size": cfg.type_vocab_size,
        "initializer_range": cfg.initializer_range,
        "layer_norm_eps": cfg.layer_norm_eps,
        "position_embedding_type": "absolute",
        "pad_token_id": 0,
        "tie_word_embeddings": True,
        "dtype": dtype,
        "torch_dtype": dtype,  # what transformers 4.x reads
    }
    id2label, num_labels = extra.pop("id2label", None), extra.pop("num_labels", None)
    if architecture == "BertForSequenceClassification":
        if id2label is None and num_labels is None:
            raise ConversionError("a BertForSequenceClassification config needs id2label or num_labels")
        labels = _labels(id2label, num_labels)
        config["id2label"] = {str(i): label for i, label in enumerate(labels)}
        config["label2id"] = {label: i for i, label in enumerate(labels)}
    config.update(extra)
    return config


def _labels(id2label, num_labels: int | None) -> list[str]:
    if id2label is None:
        return [f"LABEL_{i}" for i in range(num_labels)]
    if isinstance(id2label, dict):
        ids = sorted(int(i) for i in id2label)
        if ids != list(range(len(ids))):
            raise ConversionError(f"id2label keys must be 0..{len(ids) - 1}, got {ids}")
        labels = [str(id2label[i] if i in id2label else id2label[str(i)]) for i in ids]
    else:
        labels = [str(label) for label in id2label]
    if num_labels is not None and num_labels != len(labels):
        raise ConversionError(f"id2label has {len(labels)} labels but the classifier has {num_labels}")
    if len(set(labels)) != len(labels):
        raise ConversionError(f"id2label has repeated labels: {labels}")
    return labels


def bert_config_from_hf(config: dict) -> BertConfig:
    """Our BertConfig for a HuggingFace BERT `config.json`; refuses what our model can't run."""
    if config.get("model_type", "bert") != "bert":
        raise ConversionError(f"model_type {config.get('model_type')!r} is not supported, only 'bert'")
    checks = {"hidden_act": "gelu", "position_embedding_type": "absolute", "is_decoder": False,
              "add_cross_attention": False}
    for key, want in checks.items():
        if config.get(key, want) != want:
            raise ConversionError(f"config.json has {key}={config[key]!r}; only {want!r} is supported")
    try:
        return BertConfig(
            vocab_size=config["vocab_size"], num_layers=config["num_hidden_layers"],
            hidden_size=config["hidden_size"], num_heads=config["num_attention_heads"],
            intermediate_size=config["intermediate_size"],
            max_position=config.get("max_position_embeddings", 512),
            type_vocab_size=config.get("type_vocab_size", 2),
            dropout=config.get("hidden_dropout_prob", 0.1),
            attention_dropout=config.get("attention_probs_dropout_prob", 0.1),
            layer_norm_eps=config.get("layer_norm_eps", 1e-12),
            initializer_range=config.get("initializer_range", 0.02))
    except KeyError as e:
        raise ConversionError(f"config.json lacks {e.args[0]!r}") from None


def bert_config_from(model_config) -> BertConfig:
    """A BertConfig from a BertConfig, a dict of its fields, or a dict with `size` + `vocab_size`
    (and any field overrides); other keys are ignored. For the export CLI."""
    if isinstance(model_config, BertConfig):
        return model_config
    if hasattr(model_config, "to_dict"):
        model_config = model_config.to_dict()
    model_config = dict(model_config)
    fields = {f.name for f in dataclasses.fields(BertConfig)}
    given = {k: v for k, v in model_config.items() if k in fields}
    try:
        if model_config.get("size"):
            vocab = given.pop("vocab_size")
            for k in ("num_layers", "hidden_size", "num_heads", "intermediate_size"):
                given.pop(k, None)  # the size decides these
            return BertConfig.of_size(model_config["size"], vocab, **given)
        return BertConfig(**given)
    except (KeyError, TypeError) as e:
        raise ConversionError(f"model config {sorted(model_config)} does not describe a BERT: {e}") from None


# =============================================================================================
# Export
# =============================================================================================

DTYPES = {"float32": (np.dtype("<f4"), "F32"), "float16": (np.dtype("<f2"), "F16"),
          "bfloat16": (np.dtype(jnp.bfloat16), "BF16")}
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # HuggingFace's long-standing "5GB"
# Everything an export (with its tokenizer) writes; a folder holding only these is replaceable.
EXPORT_FILES = re.compile(r"^(config\.json|model\.safetensors|model-\d{5}-of-\d{5}\.safetensors|"
                          r"model\.safetensors\.index\.json|vocab\.txt|tokenizer\.json|"
                          r"tokenizer_config\.json|special_tokens_map\.json)$")


def infer_architecture(params: dict) -> str:
    """BertForSequenceClassification with a `classifier`, BertForPreTraining with `nsp`, else BertModel."""
    if "classifier" in params:
        return "BertForSequenceClassification"
    if "nsp" in params:
        return "BertForPreTraining"
    return "BertModel"


def export_params(params: dict, cfg: BertConfig, out_dir, *, architecture: str,
                  dtype: str = "float32", max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                  id2label=None, tokenizer=None) -> Path:
    """Write `params` as a HuggingFace `architecture` folder: config.json and model.safetensors
    (or shards + model.safetensors.index.json past `max_shard_bytes`); with `tokenizer` (a folder
    or a vocab.txt) also the tokenizer files. Returns the folder.

    `params` is our pure dict (`nnx.to_pure_dict`); layer keys may be ints or strings (Orbax).
    Top-level entries the architecture does not use are dropped (export `BertModel` from a
    pretraining tree); everything under the ones it uses must be mapped. Leaves go to host one
    at a time. The folder appears whole or not at all; an existing one is replaced only if it
    is empty or holds nothing but a previous export.
    """
    if dtype not in DTYPES:
        raise ConversionError(f"dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    if max_shard_bytes <= 0:
        raise ConversionError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    np_dtype, st_dtype = DTYPES[dtype]
    num_labels = None
    if architecture == "BertForSequenceClassification":
        bias = _lookup(params, ("classifier", "bias"))
        if bias is None or len(getattr(bias, "shape", ())) != 1:
            raise ConversionError("params have no classifier/bias of shape (C,) to export as "
                                  "BertForSequenceClassification")
        num_labels = bias.shape[0]
    table = name_table(architecture, cfg, num_labels)
    leaves = _check_params(params, table, architecture)
    config = hf_config(cfg, architecture, dtype=dtype, id2label=id2label, num_labels=num_labels)

    # Plan the files from shapes alone, then stream one tensor at a time into them.
    sizes = [math.prod(e.layout.hf_shape(e.shape)) * np_dtype.itemsize for e in table]
    shards = _plan_shards(sizes, max_shard_bytes)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])

    with _staged(out_dir) as tmp:
        weight_map = {}
        for name, rows in zip(names, shards):
            specs = [(hf_name(architecture, table[r]), table[r].layout.hf_shape(table[r].shape))
                     for r in rows]
            arrays = (_hf_array(leaves[r], table[r], np_dtype) for r in rows)
            _write_safetensors(tmp / name, specs, arrays, st_dtype, np_dtype)
            weight_map.update({hf: name for hf, _ in specs})
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(sizes),
                                  "total_parameters": sum(math.prod(e.shape) for e in table)},
                     "weight_map": dict(sorted(weight_map.items()))}
            _write_json(tmp / "model.safetensors.index.json", index)
        _write_json(tmp / "config.json", config)
        if tokenizer is not None:
            _write_tokenizer(tokenizer, tmp, None, cfg.max_position, cfg.vocab_size)
    return Path(out_dir)


def _lookup(tree, keys: tuple):
    """tree[k0][k1]...; integer keys also match their string form (Orbax restores '0')."""
    node = tree
    for k in keys:
        if not isinstance(node, dict):
            return None
        if k in node:
            node = node[k]
        elif str(k) in node:
            node = node[str(k)]
        else:
            return None
    return node


def _leaf_paths(tree, prefix=()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaf_paths(v, prefix + (k,))
    else:
        yield prefix


def _check_params(params: dict, table: list[Entry], architecture: str) -> list:
    """The leaves in table order, after checking every shape and that nothing is left unmapped."""
    leaves = []
    for e in table:
        leaf = _lookup(params, e.ours)
        if leaf is None or isinstance(leaf, dict):
            raise ConversionError(f"params have no {_path_str(e.ours)}, which {architecture} needs")
        if tuple(leaf.shape) != e.shape:
            raise ConversionError(f"params {_path_str(e.ours)} has shape {tuple(leaf.shape)} but the "
                                  f"config needs {e.shape}")
        leaves.append(leaf)
    mapped = {_path_str(e.ours) for e in table}
    used_tops = {e.ours[0] for e in table}
    for top in used_tops:
        for path in _leaf_paths(params[top], (top,)):
            if _path_str(path) not in mapped:
                raise ConversionError(f"params hold {_path_str(path)}, which the {architecture} "
                                      f"table does not map")
    return leaves


def _host(x) -> np.ndarray:
    """One leaf on host; a jax.Array spread over other processes can't be read here."""
    if getattr(x, "is_fully_addressable", True) is False:
        raise ConversionError("a parameter is spread over several processes; gather it (or "
                              "restore the checkpoint on one host) before exporting")
    return np.asarray(x)


def _hf_array(leaf, entry: Entry, np_dtype) -> np.ndarray:
    x = entry.layout.to_hf(_host(leaf).astype(np.float32, copy=False))
    # Always contiguous: a transposed view would be written in the wrong order.
    return np.ascontiguousarray(x.astype(np_dtype, copy=False))


def _plan_shards(sizes: list[int], max_bytes: int) -> list[list[int]]:
    """Greedy, in table order; a tensor larger than `max_bytes` gets a shard of its own."""
    shards, current, used = [], [], 0
    for i, size in enumerate(sizes):
        if current and used + size > max_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(i)
        used += size
    shards.append(current)
    return shards


def _write_safetensors(path: Path, specs, arrays, st_dtype: str, np_dtype) -> None:
    """A safetensors file written tensor by tensor: the header comes from the shapes, then each
    array is pulled, written and dropped (so host memory holds one tensor at a time)."""
    header, offset = {}, 0
    for name, shape in specs:
        nbytes = math.prod(shape) * np_dtype.itemsize
        header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as the reference writer does
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for (name, shape), array in zip(specs, arrays):
            if array.shape != tuple(shape) or array.dtype != np_dtype:
                raise ConversionError(f"{name}: produced {array.shape} {array.dtype}, planned {shape}")
            if sys.byteorder != "little":
                array = array.byteswap()
            f.write(array.reshape(-1).view(np.uint8).data)  # bytes, no copy (bf16 has no buffer)
        if f.tell() != 8 + len(blob) + offset:
            raise ConversionError(f"{path.name}: wrote {f.tell()} bytes, planned {8 + len(blob) + offset}")


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _check_out_dir(out_dir: Path) -> None:
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ConversionError(f"{out_dir} exists and is not a folder")
    strangers = [p.name for p in out_dir.iterdir() if not (p.is_file() and EXPORT_FILES.match(p.name))]
    if strangers:
        raise ConversionError(f"{out_dir} is not empty and not a previous export (it holds "
                              f"{sorted(strangers)[0]!r}); choose a new --out folder")


@contextlib.contextmanager
def _staged(out_dir):
    """Yield a temp folder beside `out_dir`; on success it replaces `out_dir`, on failure it goes."""
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(out_dir, "tmp")
    tmp.mkdir()  # not mkdtemp: the folder keeps the umask's permissions, not 0700
    try:
        yield tmp
        if out_dir.exists():
            _check_out_dir(out_dir)  # again: something may have appeared while we wrote
            old = _sibling(out_dir, "old")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _sibling(path: Path, what: str) -> Path:
    return path.with_name(f".{path.name}.{what}-{os.getpid()}-{secrets.token_hex(4)}")


# =============================================================================================
# Import
# =============================================================================================

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def import_params(hf_dir, architecture: str | None = None) -> tuple[dict, BertConfig, str]:
    """Read a HuggingFace BERT folder (config.json + safetensors, single or sharded) into our
    params dict (float32 numpy, int layer keys), our BertConfig and the architecture name.

    `architecture` defaults to config.json's; naming one reads that part of the checkpoint and
    ignores the rest (e.g. "BertModel" takes only the encoder of a BertForPreTraining).
    Encoder names are matched with or without the `bert.` prefix. Pickle files are refused.
    """
    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise ConversionError(f"{hf_dir} has no config.json; is it a HuggingFace model folder?")
    config = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    explicit = architecture is not None
    if architecture is None:
        declared = config.get("architectures") or ["BertModel"]
        architecture = declared[0]
    cfg = bert_config_from_hf(config)
    arch = _architecture(architecture)
    num_labels = None
    if architecture == "BertForSequenceClassification":
        num_labels = len(config["id2label"]) if config.get("id2label") else config.get("num_labels", 2)

    files = _safetensors_files(hf_dir)
    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(safe_open(str(f), framework="numpy")) for f in files]
        # base-relative name -> (name in the file, handle)
        tensors = {}
        for handle in handles:
            for name in handle.keys():
                key = name[len("bert."):] if name.startswith("bert.") else name
                for pattern, new in LEGACY_RENAMES:
                    key = pattern.sub(new, key)
                if key in tensors:
                    raise ConversionError(f"{hf_dir} holds {name} twice (with and without 'bert.')")
                tensors[key] = (name, handle)

        def read(key: str) -> np.ndarray:
            name, handle = tensors[key]
            return handle.get_tensor(name).astype(np.float32)

        table = name_table(architecture, cfg, num_labels)
        missing = [hf_name(architecture, e) for e in table if e.hf not in tensors]
        if missing:
            raise ConversionError(f"{hf_dir} lacks {len(missing)} tensor(s) that {architecture} needs, "
                                  f"first {missing[0]}")
        known = {e.hf for e in table} | {copy for copy, _ in arch.tied}
        unexpected = [tensors[k][0] for k in tensors if k not in known and not IGNORED.match(k)]
        if unexpected and not explicit:
            raise ConversionError(f"{hf_dir} holds {len(unexpected)} tensor(s) that {architecture} does "
                                  f"not use, first {unexpected[0]}; pass architecture= to take a part")
        params: dict = {}
        for e in table:
            name, handle = tensors[e.hf]
            want = e.layout.hf_shape(e.shape)
            got = tuple(handle.get_slice(name).get_shape())
            if got != want:
                raise ConversionError(f"tensor {name} has shape {got} but config.json implies {want}")
            node = params
            for k in e.ours[:-1]:
                node = node.setdefault(k, {})
            node[e.ours[-1]] = np.ascontiguousarray(e.layout.from_hf(read(e.hf), e.shape))

        for copy, original in arch.tied:
            if copy in tensors and not np.array_equal(read(copy), read(original)):
                raise ConversionError(f"{tensors[copy][0]} differs from {tensors[original][0]}, "
                                      f"which our model ties it to")
    return params, cfg, architecture


def _safetensors_files(hf_dir: Path) -> list[Path]:
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        files = [hf_dir / f for f in dict.fromkeys(weight_map.values())]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise ConversionError(f"{index} names {absent[0]}, which is not in {hf_dir}")
        return files
    if (hf_dir / "model.safetensors").is_file():
        return [hf_dir / "model.safetensors"]
    pickles = sorted(p.name for p in hf_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ConversionError(f"{hf_dir} holds only pickle weights ({pickles[0]}), which can run code "
                              f"when loaded and are never read here; convert them to safetensors first")
    raise ConversionError(f"{hf_dir} has no model.safetensors or model.safetensors.index.json")


# =============================================================================================
# Tokenizer
# =============================================================================================

SPECIAL_TOKENS = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
                  "cls_token": "[CLS]", "mask_token": "[MASK]"}
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def export_tokenizer(tokenizer_dir_or_vocab, out_dir, do_lower_case: bool | None = None,
                     model_max_length: int = 512) -> Path:
    """Write vocab.txt, tokenizer.json, tokenizer_config.json and special_tokens_map.json so that
    `transformers.AutoTokenizer.from_pretrained(out_dir)` gives a BertTokenizer with our ids.

    The source is a folder with vocab.txt and/or tokenizer.json (as `models.tokenizer.Tokenizer.save`
    writes) or a vocab.txt. `do_lower_case=None` takes the casing from tokenizer.json (or the
    folder's tokenizer_config.json), else True. `out_dir` may be an export: only the tokenizer
    files in it are replaced.
    """
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.tok-", dir=out_dir.parent) as tmp:
        _write_tokenizer(tokenizer_dir_or_vocab, Path(tmp), do_lower_case, model_max_length, None)
        for name in TOKENIZER_FILES:
            if (Path(tmp) / name).exists():
                os.replace(Path(tmp) / name, out_dir / name)
    return out_dir


def _write_tokenizer(src, dest: Path, do_lower_case: bool | None, model_max_length: int,
                     model_vocab_size: int | None) -> None:
    src = Path(src)
    folder = src if src.is_dir() else src.parent
    vocab_file = src if src.is_file() else folder / "vocab.txt"
    json_file = folder / "tokenizer.json"
    tok_json = json.loads(json_file.read_text(encoding="utf-8")) if json_file.is_file() else None
    if not vocab_file.is_file() and tok_json is None:
        raise ConversionError(f"{src} has neither vocab.txt nor tokenizer.json")

    normalizer = {}
    if tok_json is not None:
        normalizer = _check_bert_tokenizer_json(tok_json, json_file)
    if do_lower_case is None:
        old_config = folder / "tokenizer_config.json"
        if "lowercase" in normalizer:
            do_lower_case = bool(normalizer["lowercase"])
        elif old_config.is_file():
            do_lower_case = bool(json.loads(old_config.read_text()).get("do_lower_case", True))
        else:
            do_lower_case = True
    if "lowercase" in normalizer and bool(normalizer["lowercase"]) != do_lower_case:
        raise ConversionError(f"{json_file} lowercases={normalizer['lowercase']} but "
                              f"do_lower_case={do_lower_case} was asked for")

    if vocab_file.is_file():
        # One token a line; like BertTokenizer, strip only the newline.
        with open(vocab_file, encoding="utf-8") as f:
            tokens = [t.rstrip("\n") for t in f.readlines()]
    else:
        vocab = tok_json["model"]["vocab"]
        tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
        if [vocab[t] for t in tokens] != list(range(len(tokens))):
            raise ConversionError(f"{json_file} vocabulary ids are not 0..{len(tokens) - 1}")
    if len(set(tokens)) != len(tokens):
        seen = set()
        repeated = next(t for t in tokens if t in seen or seen.add(t))
        raise ConversionError(f"{vocab_file} lists the token {repeated!r} twice")
    if tok_json is not None:
        if tok_json["model"]["vocab"] != {t: i for i, t in enumerate(tokens)}:
            raise ConversionError(f"{vocab_file} and {json_file} hold different vocabularies")
    missing = [t for t in SPECIAL_TOKENS.values() if t not in tokens]
    if missing:
        raise ConversionError(f"the vocabulary lacks the special token {missing[0]}")
    if model_vocab_size is not None and len(tokens) > model_vocab_size:
        raise ConversionError(f"the tokenizer has {len(tokens)} tokens but the model only "
                              f"{model_vocab_size} embeddings")

    (dest / "vocab.txt").write_text("".join(t + "\n" for t in tokens), encoding="utf-8")
    if tok_json is not None:
        shutil.copyfile(json_file, dest / "tokenizer.json")
    else:
        _build_tokenizer_json(dest, do_lower_case)
    config = {"tokenizer_class": "BertTokenizer", "do_lower_case": do_lower_case,
              "strip_accents": normalizer.get("strip_accents"),
              "tokenize_chinese_chars": normalizer.get("handle_chinese_chars", True),
              "model_max_length": model_max_length, "clean_up_tokenization_spaces": True,
              **SPECIAL_TOKENS}
    _write_json(dest / "tokenizer_config.json", config)
    _write_json(dest / "special_tokens_map.json", SPECIAL_TOKENS)


def _check_bert_tokenizer_json(tok: dict, where: Path) -> dict:
    """BertTokenizer keeps only the vocabulary of tokenizer.json and rebuilds the rest as BERT's:
    refuse a tokenizer.json that would then tokenize differently. Returns its BertNormalizer."""
    model, norm, pre = tok.get("model") or {}, tok.get("normalizer") or {}, tok.get("pre_tokenizer") or {}
    problems = []
    if model.get("type") != "WordPiece":
        problems.append(f"model {model.get('type')}")
    elif model.get("continuing_subword_prefix", "##") != "##" or model.get("unk_token") != "[UNK]":
        problems.append("a WordPiece without '##' continuations and [UNK]")
    elif model.get("max_input_chars_per_word", 100) != 100:
        problems.append(f"max_input_chars_per_word {model.get('max_input_chars_per_word')}")
    if norm.get("type") != "BertNormalizer" or not norm.get("clean_text", True):
        problems.append(f"normalizer {norm.get('type')}")
    if pre.get("type") != "BertPreTokenizer":
        problems.append(f"pre-tokenizer {pre.get('type')}")
    if problems:
        raise ConversionError(f"{where} is not a BERT WordPiece tokenizer ({problems[0]}); "
                              f"transformers' BertTokenizer would tokenize differently")
    return norm


def _build_tokenizer_json(dest: Path, do_lower_case: bool) -> None:
    """tokenizer.json for a vocab.txt, built the way transformers' BertTokenizer builds it."""
    try:
        from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
        from tokenizers.models import WordPiece
    except ImportError:  # transformers builds it from vocab.txt on load anyway
        return
    tok = Tokenizer(WordPiece.from_file(str(dest / "vocab.txt"), unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=None, lowercase=do_lower_case)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens(list(SPECIAL_TOKENS.values()))  # "[MASK]" in text stays one token
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0", pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    tok.save(str(dest / "tokenizer.json"))


# =============================================================================================
# Command line
# =============================================================================================


def _parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 2GB, 500MB, 1000000)")
    unit = (m.group(2) or "").upper().rstrip("B")
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
             "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    return int(float(m.group(1)) * scale)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m models.hf", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="write a checkpoint as a HuggingFace model folder")
    export.add_argument("--checkpoint", required=True,
                        help="a pretraining/fine-tuning workdir or one checkpoints/<step> folder")
    export.add_argument("--out", required=True, help="the folder to write (new, or a previous export)")
    export.add_argument("--architecture", choices=sorted(ARCHITECTURES),
                        help="default: from the parameters (classifier / NSP head / encoder only)")
    export.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    export.add_argument("--max-shard-size", type=_parse_bytes, default=DEFAULT_MAX_SHARD_BYTES,
                        help="split model.safetensors past this size (e.g. 2GB)")
    export.add_argument("--labels", help="comma-separated class names, in class-id order")
    args = parser.parse_args(argv)

    from training.errors import UserError  # lazily: models/ does not depend on training/
    try:
        from training.checkpoint import load_checkpoint_params
        params, model_config, tokenizer_dir, kind = load_checkpoint_params(args.checkpoint)
        cfg = bert_config_from(model_config)
        architecture = args.architecture or infer_architecture(params)
        if architecture == "BertForSequenceClassification" and model_config.get("pooling", "cls") != "cls":
            raise ConversionError(f"this classifier reads the {model_config['pooling']}-pooled hidden "
                                  f"states, which BertForSequenceClassification cannot express; "
                                  f"export the encoder alone with --architecture BertModel")
        id2label = args.labels.split(",") if args.labels else None
        out = export_params(params, cfg, args.out, architecture=architecture, dtype=args.dtype,
                            max_shard_bytes=args.max_shard_size, id2label=id2label,
                            tokenizer=tokenizer_dir)
    except (ConversionError, UserError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    what = f"{architecture} ({kind} checkpoint)" if kind else architecture
    print(f"wrote {what} to {out}" + ("" if tokenizer_dir else " (no tokenizer found)"))


if __name__ == "__main__":
    main()
