"""HuggingFace Transformers import and export: plain safetensors + JSON, no torch needed.

    python -m models.hf export --checkpoint WORKDIR_OR_STEP --out DIR

writes a folder that `transformers.AutoModelForPreTraining` (or `AutoModelForSequenceClassification`,
`AutoModelForImageClassification`) and `AutoTokenizer` (text) or `AutoImageProcessor` (images)
load with no custom code. The run's config.json says the family (`family`, "bert" when absent).

Each model family is one `Family` record named by its spec (`records()`; the language: `models/hf_table.py`; the
records: `models/hf_bert.py`, `models/hf_mae.py`): rules that map our parameter paths to
HuggingFace state-dict names with the layout between the two, the config.json conversion both
ways, and the HuggingFace classes it exports as. Export and import read the same table in
opposite directions, so a new family is a new record, not edits here. The bytes on disk
(safetensors, shards, tokenizer and image-processor files, a folder that appears whole or not at
all) are `models/hf_folder.py`'s. Facts checked on transformers 5.24:

- Weights are written as the released checkpoints name them, which every version loads. ViT-
  family checkpoints come in several spellings: released ones say `vit.encoder.layer.N.attention.
  attention.query`, transformers 5.24 renames them on load (`vit.layers.N.attention.q_proj`) and
  its `save_pretrained` of ViTMAE writes the decoder as `decoder.decoder_encoder.layer.N`
  (released: `decoder.decoder_layers.N`). A family's `renames` map every spelling to its rules'.
- ViTMAE stores its fixed sin-cos position tables in the checkpoint: such tensors are `fixed`
  rules, computed from the config on export and checked against it on import.

Weights are never unpickled: a folder with only `pytorch_model.bin` / `*.pt` is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
from safetensors import safe_open

from models import family as families
# ConversionError, export_tokenizer and TOKENIZER_FILES are public here too.
from models.hf_folder import (DEFAULT_MAX_SHARD_BYTES, DTYPES, TOKENIZER_FILES,  # noqa: F401
                              check_out_dir,
                              export_tokenizer, plan_shards, safetensors_files, shard_names, staged,
                              write_json, write_safetensors, write_tokenizer)
from models.hf_table import Architecture, ConversionError, Entry, Family
from models.layers import unstack_layers



def records() -> dict[str, Family]:
    """Each family's HuggingFace record (its spec's `hf`), keyed as run configs name the family."""
    return {spec.name: spec.hf_record() for spec in families.everything() if spec.hf}

DEFAULT_MODEL_TYPE = "bert"  # config.json files from before transformers wrote model_type


# =============================================================================================
# Tables and configs
# =============================================================================================


def architecture_of(name: str) -> tuple[Family, Architecture]:
    """The family that exports as HuggingFace class `name`, and the class's record."""
    for family in records().values():
        if name in family.architectures:
            return family, family.architectures[name]
    known = [a for family in records().values() for a in family.architectures]
    raise ConversionError(f"unknown architecture {name!r}; supported: {', '.join(known)}")


def name_table(architecture: str, cfg, num_labels: int | None = None) -> list[Entry]:
    """The rows for `architecture` (of whichever family has it), expanded over the layers."""
    family, _ = architecture_of(architecture)
    return family.table(architecture, cfg, num_labels)


def hf_config(cfg, architecture: str, **extra) -> dict:
    """The `config.json` of a HuggingFace `architecture` for `cfg`. Classifiers need `id2label`
    (a list or {id: label}) or `num_labels`; other `extra` keys are written as given."""
    family, arch = architecture_of(architecture)
    dtype = extra.pop("dtype", "float32")
    config = {"architectures": [architecture], "model_type": arch.model_type or family.model_type,
              **family.to_hf(cfg),
              "dtype": dtype, "torch_dtype": dtype}  # torch_dtype: what transformers 4.x reads
    id2label, num_labels = extra.pop("id2label", None), extra.pop("num_labels", None)
    if arch.labels:
        if id2label is None and num_labels is None:
            raise ConversionError(f"a {architecture} config needs id2label or num_labels")
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


def config_from_hf(config: dict, family: str | None = None):
    """Our config for a HuggingFace config.json, of `family` (a family name) or of whichever
    family reads its model_type; refuses what our models can't run."""
    return _family_of(config, family).from_hf(config)


def family_name(config: dict) -> str:
    """The family (its spec's name) whose record reads this config.json's model_type."""
    record = _family_of(config)
    return next(name for name, r in records().items() if r is record)


def _family_of(config: dict, name: str | None = None) -> Family:
    model_type = config.get("model_type", DEFAULT_MODEL_TYPE)
    candidates = [records()[name]] if name else list(records().values())
    for family in candidates:
        if model_type in family.model_types:
            return family
    known = sorted(t for family in candidates for t in family.model_types)
    raise ConversionError(f"model_type {model_type!r} is not supported, only {', '.join(map(repr, known))}")


# =============================================================================================
# Export
# =============================================================================================


def infer_architecture(params: dict, family: str = families.DEFAULT) -> str:
    """The first of the family's architectures whose marker is in `params`, else its base model
    (BERT: BertForSequenceClassification with a `classifier`, BertForPreTraining with `nsp`;
    MAE: ViTForImageClassification with a `classifier`, ViTMAEForPreTraining with a `decoder`)."""
    fam = records()[family]
    return next((name for name, a in fam.architectures.items() if a.marker and a.marker in params),
                fam.base)


def export_params(params: dict, cfg, out_dir, *, architecture: str,
                  dtype: str = "float32", max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                  id2label=None, tokenizer=None, image_stats=None,
                  config_extra: dict | None = None, transform=None, write_more=None) -> Path:
    """Write `params` as a HuggingFace `architecture` folder: config.json and model.safetensors
    (or shards + model.safetensors.index.json past `max_shard_bytes`); for a text family with
    `tokenizer` (a folder or a vocab.txt) also the tokenizer files; for an image family with
    `image_stats` (the per-channel `(mean, std)` of pixels in [0, 1] that training normalised
    with) also preprocessor_config.json; `config_extra` joins config.json. Returns the folder.

    `params` is our pure dict (`nnx.to_pure_dict`); layer keys may be ints or strings (Orbax).
    A scanned stack's stacked weights are split into layers first: the tables, like HuggingFace,
    name each layer (import gives per-layer weights; `models.layers.stack_layers` stacks them
    for a scanned model).
    Top-level entries the architecture does not use are dropped (export `BertModel` from a
    pretraining tree); everything under the ones it uses must be mapped. Leaves go to host one
    at a time. The folder appears whole or not at all; an existing one is replaced only if it
    is empty or holds nothing but a previous export. `transform(name, array)` changes each
    HuggingFace tensor before it is written (the quantised export's dequantised weights) and
    `write_more(folder)` writes more files into the folder before it appears.
    """
    family, arch = architecture_of(architecture)
    if dtype not in DTYPES:
        raise ConversionError(f"dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    if max_shard_bytes <= 0:
        raise ConversionError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    np_dtype, st_dtype = DTYPES[dtype]
    num_labels = None
    if arch.labels:
        leaf = _lookup(params, tuple(arch.labels.split("/")))
        if leaf is None or len(getattr(leaf, "shape", ())) != 1:
            raise ConversionError(f"params have no {arch.labels} of shape (C,) to export as {architecture}")
        num_labels = leaf.shape[0]
    table = name_table(architecture, cfg, num_labels)
    leaves = _check_params(_without(unstack_layers(params), family, arch), table, architecture)
    config = hf_config(cfg, architecture, dtype=dtype, id2label=id2label, num_labels=num_labels,
                       **(config_extra or {}))
    if tokenizer is not None and family.image_processor is not None:
        raise ConversionError(f"{architecture} reads images: it takes an image processor, not a tokenizer")
    if image_stats is not None and family.image_processor is None:
        raise ConversionError(f"{architecture} reads text: it takes a tokenizer, not image stats")
    preprocessor = None if image_stats is None else family.image_processor(cfg, image_stats)

    # Plan the files from shapes alone, then stream one tensor at a time into them.
    sizes = [math.prod(e.hf_shape) * np_dtype.itemsize for e in table]
    shards = plan_shards(sizes, max_shard_bytes)
    with staged(out_dir) as tmp:
        weight_map = {}
        for name, rows in zip(shard_names(len(shards)), shards):
            specs = [(table[r].name, table[r].hf_shape) for r in rows]
            arrays = (_hf_array(leaves[r], table[r], cfg, np_dtype) for r in rows)
            if transform is not None:
                arrays = (transform(n, a) for (n, _), a in zip(specs, arrays))
            write_safetensors(tmp / name, specs, arrays, st_dtype, np_dtype)
            weight_map.update({hf: name for hf, _ in specs})
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(sizes),
                                  "total_parameters": sum(math.prod(e.shape) for e in table)},
                     "weight_map": dict(sorted(weight_map.items()))}
            write_json(tmp / "model.safetensors.index.json", index)
        write_json(tmp / "config.json", config)
        if tokenizer is not None:  # a text family's: its positions and vocabulary bound it
            write_tokenizer(tokenizer, tmp, None, cfg.max_position, cfg.vocab_size)
        if preprocessor is not None:
            write_json(tmp / "preprocessor_config.json", preprocessor)
        if write_more is not None:
            write_more(tmp)
    return Path(out_dir)


def export_run(params: dict, run_config: dict, out_dir, *, kind: str | None = None,
               architecture: str | None = None, dtype: str = "float32",
               max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, id2label=None,
               tokenizer=None, transform=None, write_more=None) -> tuple[Path, str]:
    """Export a training run's `params` as `export_params` does, with everything else taken from
    the run's config.json (`run_config`): `family` (a family name; the default family when absent, as in
    runs from before it was written), `model` (the family's model group; a fine-tuning run's,
    `kind="finetune"`, may also hold FINETUNE_MODEL_KEYS) and, for an image family, the pixel
    stats (`data.image_mean` / `data.image_std`, else the defaults for `data.source`). The
    architecture defaults to the one the params imply. Returns (folder, architecture)."""
    name = run_config.get("family") or families.DEFAULT
    known_records = records()
    if name not in known_records or known_records[name].from_model_config is None:
        raise ConversionError(f"family {name!r} has no HuggingFace export; known: {', '.join(known_records)}")
    family = known_records[name]
    group = dict(run_config.get("model") or {})
    extra = FINETUNE_MODEL_KEYS if kind == "finetune" else ()
    # A key that is no field (a misspelt override) fails instead of silently doing nothing.
    known = {f.name for f in dataclasses.fields(family.config)} | {"size", *extra}
    if unknown := sorted(set(group) - known):
        raise ConversionError(f"the run's {name} model config has unknown key(s) "
                              f"{', '.join(map(repr, unknown))}; known: {', '.join(sorted(known))}")
    try:
        cfg = family.from_model_config({k: v for k, v in group.items() if k not in extra})
    except KeyError as e:
        raise ConversionError(f"the run's {name} model config lacks {e}") from None
    except ValueError as e:
        raise ConversionError(f"the run's {name} model config: {e}") from None
    architecture = architecture or infer_architecture(params, name)
    owner, arch = architecture_of(architecture)
    if owner is not family:
        raise ConversionError(f"{architecture} is no {name} architecture; choose one of "
                              f"{', '.join(family.architectures)}")
    pooling = group.get("pooling", "cls")
    if arch.labels and pooling != "cls":
        raise ConversionError(f"this classifier reads the {pooling}-pooled hidden states, which "
                              f"{architecture} cannot express; export the encoder alone with "
                              f"--architecture {family.base}")
    image_stats = family.image_stats(run_config, cfg) if family.image_stats else None
    if "probe_mean" in params:
        params = fold_probe_norm(params)
    # Where a continued-pretraining run's first weights came from (its config.json `init`).
    init = run_config.get("init")
    provenance = {"pretrax_init": {k: init.get(k) for k in ("init", "kind", "path", "step")}} if init else None
    out = export_params(params, cfg, out_dir, architecture=architecture, dtype=dtype,
                        max_shard_bytes=max_shard_bytes, id2label=id2label, tokenizer=tokenizer,
                        image_stats=image_stats, config_extra=provenance, transform=transform,
                        write_more=write_more)
    return out, architecture


def fold_probe_norm(params: dict) -> dict:
    """A linear probe standardises its feature, (x - mean) / sqrt(var + 1e-6), before the
    classifier (finetune/image.py); folded into the classifier's kernel (D, C) and bias it is a
    plain linear head: W' = W / s, b' = b - (mean / s) . W."""
    scale_D = 1.0 / np.sqrt(np.asarray(params["probe_var"], np.float64) + 1e-6)
    kernel_DC = np.asarray(params["classifier"]["kernel"], np.float64)
    bias_C = np.asarray(params["classifier"]["bias"], np.float64)
    folded = {"kernel": (kernel_DC * scale_D[:, None]).astype(np.float32),
              "bias": (bias_C - (np.asarray(params["probe_mean"], np.float64) * scale_D) @ kernel_DC).astype(np.float32)}
    return {**{k: v for k, v in params.items() if k not in ("probe_mean", "probe_var")}, "classifier": folded}


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


def _slash(keys) -> str:
    """Our path as the messages spell it: encoder/layers/0/query/kernel."""
    return "/".join(map(str, keys))


def _without(params: dict, family, arch) -> dict:
    """`params` less the base-model weights `arch` lacks (the pooler of BertForTokenClassification and BertForQuestionAnswering)."""
    for rule in (r for r in family.rules if r.hf in arch.lacks and r.ours is not None):
        *path, leaf = (family.ours, *rule.ours.split("/"))
        node = _lookup(params, tuple(path))
        if isinstance(node, dict) and leaf in node:
            params = _replaced(params, tuple(path), {k: v for k, v in node.items() if k != leaf})
    return params


def _replaced(tree: dict, keys: tuple, value) -> dict:
    if not keys:
        return value
    return {**tree, keys[0]: _replaced(tree[keys[0]], keys[1:], value)}


def _check_params(params: dict, table: list[Entry], architecture: str) -> list:
    """The leaves in table order (None for fixed tensors), after checking every shape and that
    nothing under the top-level entries the table uses is left unmapped."""
    leaves = []
    for e in table:
        leaf = None if e.ours is None else _lookup(params, e.ours)
        if e.ours is not None and (leaf is None or isinstance(leaf, dict)):
            raise ConversionError(f"params have no {_slash(e.ours)}, which {architecture} needs")
        if leaf is not None and tuple(leaf.shape) != e.shape:
            raise ConversionError(f"params {_slash(e.ours)} has shape {tuple(leaf.shape)} but the "
                                  f"config needs {e.describe()}")
        leaves.append(leaf)
    mapped = {_slash(e.ours) for e in table if e.ours is not None}
    for top in {e.ours[0] for e in table if e.ours is not None}:
        for path, _ in jax.tree_util.tree_leaves_with_path(params[top]):
            name = _slash((top, *(k.key for k in path)))
            if name not in mapped:
                raise ConversionError(f"params hold {name}, which the {architecture} table does not map")
    return leaves


def _hf_array(leaf, entry: Entry, cfg, np_dtype) -> np.ndarray:
    if entry.fixed is not None:
        return np.asarray(entry.fixed(cfg), np.float32).astype(np_dtype)
    if getattr(leaf, "is_fully_addressable", True) is False:
        raise ConversionError("a parameter is spread over several processes; gather it (or "
                              "restore the checkpoint on one host) before exporting")
    return entry.to_hf(np.asarray(leaf).astype(np.float32, copy=False)).astype(np_dtype, copy=False)


# =============================================================================================
# Import
# =============================================================================================


def import_params(hf_dir, architecture: str | None = None) -> tuple[dict, Any, str]:
    """Read a HuggingFace folder (config.json + safetensors, single or sharded) into our params
    dict (float32 numpy, int layer keys), our config and the architecture name.

    `architecture` defaults to config.json's; naming one reads that part of the checkpoint and
    ignores the rest (e.g. "BertModel" takes only the encoder of a BertForPreTraining). Base
    names are matched with or without the base-model prefix (`bert.`) and in every spelling the
    family renames. Fixed tensors are checked against the config, not read. Pickles are refused.
    """
    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise ConversionError(f"{hf_dir} has no config.json; is it a HuggingFace model folder?")
    config = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    family = _family_of(config)
    explicit = architecture is not None
    architecture = architecture or (config.get("architectures") or [family.base])[0]
    cfg = family.from_hf(config)
    owner, arch = architecture_of(architecture)
    if owner is not family:
        raise ConversionError(f"{hf_dir} holds a {config.get('model_type')} model, not a {architecture}")
    num_labels = None
    if arch.labels:
        num_labels = len(config["id2label"]) if config.get("id2label") else config.get("num_labels", 2)
    table = name_table(architecture, cfg, num_labels)

    with contextlib.ExitStack() as stack:
        tensors = {}  # canonical name -> (stored name, handle)
        for path in safetensors_files(hf_dir):
            handle = stack.enter_context(safe_open(str(path), framework="numpy"))
            for name in handle.keys():
                key = family.canonical(name)
                if key in tensors:
                    raise ConversionError(f"{hf_dir} holds {tensors[key][0]} and {name}, two names "
                                          f"of one tensor")
                tensors[key] = (name, handle)

        def read(key: str) -> np.ndarray:
            name, handle = tensors[key]
            return handle.get_tensor(name)

        missing = [e.name for e in table if e.hf not in tensors and e.fixed is None]
        if missing:
            raise ConversionError(f"{hf_dir} lacks {len(missing)} tensor(s) that {architecture} needs, "
                                  f"first {missing[0]}")
        known = {e.hf for e in table} | {copy for copy, _ in arch.tied}
        unexpected = [name for key, (name, _) in tensors.items()
                      if key not in known and not any(re.match(p, key) for p in family.ignored)]
        if unexpected and not explicit:
            raise ConversionError(f"{hf_dir} holds {len(unexpected)} tensor(s) that {architecture} does "
                                  f"not use, first {unexpected[0]}; pass architecture= to take a part")
        params: dict = {}
        for e in (e for e in table if e.hf in tensors):
            name, handle = tensors[e.hf]
            want = e.hf_shape
            got = tuple(handle.get_slice(name).get_shape())
            if got != want:
                raise ConversionError(f"tensor {name} has shape {got} but config.json implies {want}")
            if e.fixed is not None:
                _check_fixed(name, read(e.hf), e.fixed(cfg))
                continue
            node = params
            for k in e.ours[:-1]:
                node = node.setdefault(k, {})
            node[e.ours[-1]] = np.ascontiguousarray(e.from_hf(read(e.hf).astype(np.float32)))

        for copy, original in arch.tied:
            if copy in tensors and not np.array_equal(read(copy), read(original)):
                raise ConversionError(f"{tensors[copy][0]} differs from {tensors[original][0]}, "
                                      f"which our model ties it to")
    return params, cfg, architecture


def _check_fixed(name: str, stored: np.ndarray, want: np.ndarray) -> None:
    """A stored fixed table must be what the config implies, up to its dtype's rounding: our
    model computes its own, so a different one would silently change the outputs."""
    want = np.asarray(want, np.float32)
    diff = float(np.abs(stored.astype(np.float32) - want).max(initial=0))
    if diff > 4 * float(ml_dtypes.finfo(stored.dtype).eps) * max(1.0, float(np.abs(want).max(initial=0))):
        raise ConversionError(f"tensor {name} differs from the fixed table that config.json implies "
                              f"(max |diff| {diff:.3g}); our model would compute other values")


# =============================================================================================
# Command line
# =============================================================================================

# What fine-tuning's `model` group holds beside the encoder's fields.
FINETUNE_MODEL_KEYS = ("pooling", "classifier_dropout", "probe_norm")


if __name__ == "__main__":  # the command line's own module: the library needs no checkpoint reader
    from models.hf_cli import main
    main()
