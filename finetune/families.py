"""Model families for fine-tuning: what a family gives the shared trainer, and where to find them.

A family is a module with `setup(config, workdir, init, explicit) -> Setup`; `config.family`
names it. Text families tokenise, image families decode pixels; everything after that (methods,
the step and loop, best-dev selection, results and predictions) is finetune/train.py's.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import jax
from flax import nnx

from finetune.methods import Depth
from finetune.tasks import Task
from training.families import Registry

FAMILIES = Registry("fine-tuning", {"bert": "finetune.text"})


@dataclasses.dataclass
class Setup:
    """One family's fine-tuning pieces, built from the config and the `--init` source.

    `splits` maps split names (train first, then dev, test...) to objects with `len()`,
    `labels` (-1 where hidden), `index` (example ids) and `labelled`; `encode(split, rows)` gives
    the model inputs and `labels` of those rows. `predict(model, batch, key)` is the head's
    output BC (float32). `load_encoder(fresh)` returns the source's encoder params, checked
    against the fresh ones' shapes (None: a random encoder, --init none). `save_assets(folder)`
    writes what a run folder needs besides checkpoints (a tokenizer). `source` is written to
    source.json (what a rerun and `--init` of this run read back); `results` joins results.json
    (where the encoder came from, its shape).
    """
    task: Task
    splits: dict
    label_names: list[str] | None
    encode: Callable[[str, "np.ndarray"], dict]
    model_fn: Callable[[nnx.Rngs], nnx.Module]
    predict: Callable[[nnx.Module, dict, jax.Array | None], jax.Array]
    depth: Depth
    num_layers: int
    load_encoder: Callable[[dict], dict] | None
    save_assets: Callable[[Path], None]
    source: dict
    results: dict
