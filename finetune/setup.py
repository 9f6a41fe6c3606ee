"""What a model family's fine-tuning setup gives the shared trainer.

A family's fine-tuning module (its spec's `finetune`, models/family.py) has
`setup(config, workdir, init, explicit) -> FinetuneSetup`; `config.family` names the family. Text families tokenise, image families decode pixels; everything after that (methods,
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

@dataclasses.dataclass
class FinetuneSetup:
    """One family's fine-tuning pieces, built from the config and the `--init` source.

    `splits` maps split names (train first, then dev, test...) to objects with `len()`,
    `labels` (-1 where hidden), `index` (example ids) and `labelled`; `encode(split, rows,
    positions)` gives the model inputs and `labels` of those rows (positions: data/labelled.py).
    `predict(model, batch, key)` is the head's output BC (float32). `initial_params(fresh)`
    turns a fresh random init into the params to start from: the source's encoder, checked
    against the fresh shapes (identity for --init none). `fixed(keys)` marks head parameters
    that never train (a linear probe's feature statistics). `mix(batch, key)`, if given, mixes
    training examples (mixup, cutmix) and returns (batch, partner labels, weight of the
    originals). `save_assets(folder)`
    writes what a run folder needs besides checkpoints (a tokenizer). `source` is written to
    run.json as the source (what a rerun and `--init` of this run read back), and `resolved`
    (what the setup derived, nested like the config: the encoder's fields, image statistics) as
    what was resolved; the setup leaves the config as given. `results` joins results.json
    (where the encoder came from, its shape). A task whose splits are not one label per row
    (token: tags per word; span: a question's windows) gives `score(split, outputs) ->
    (metrics, predictions)` and `write_predictions(workdir, split, predictions)`.
    """
    task: Task
    splits: dict
    label_names: list[str] | None
    encode: Callable[[str, "np.ndarray", "np.ndarray"], dict]
    model_fn: Callable[[nnx.Rngs], nnx.Module]
    predict: Callable[[nnx.Module, dict, jax.Array | None], jax.Array]
    depth: Depth
    num_layers: int
    initial_params: Callable[[dict], dict]
    save_assets: Callable[[Path], None]
    source: dict
    results: dict
    resolved: dict = dataclasses.field(default_factory=dict)
    fixed: Callable[[tuple], bool] | None = None
    mix: Callable | None = None
    score: Callable[[str, "np.ndarray"], tuple[dict, object]] | None = None
    write_predictions: Callable[[Path, str, object], None] | None = None
