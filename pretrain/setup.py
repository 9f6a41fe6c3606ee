"""What a model family's pretraining setup gives the shared trainer.

A family's pretraining module (its spec's `pretrain`, models/family.py) has
`setup(config, workdir, init, explicit) -> PretrainSetup`; `config.family` names the family. `init` is `--init SRC` (None: random weights) and `explicit` the config keys set on the
command line (a flag that contradicts SRC's model shape or tokenizer is an error). Adding one
is adding a module (e.g. `pretrain/mae.py`) that its spec names (ARCHITECTURE.md).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Iterator

from flax import nnx

from training.loop import Throughput
from training.step import Objective

@dataclasses.dataclass
class PretrainSetup:
    """What one family's `setup(config, workdir)` returns. It has already prepared its data and
    written what the workdir needs besides checkpoints (e.g. its tokenizer). It leaves `config`
    as given: `resolved` is what it derived, nested like the config (e.g. model.vocab_size, the
    shape an `--init` source fixes), and `source` the `--init` source (None: random weights);
    both go to run.json (training/run_record.py).

    `train_batches` is this process's endless iterator of local batches (numpy dicts) with grain's
    `get_state()` / `set_state()` and `close()`; `eval_batches()` yields one evaluation pass.
    `pictures(model, batch)`, if given, draws {name: HWC image in [0, 1]} from the first eval
    batch at every evaluation (saved as workdir/<name>.png and in TensorBoard).

    `initial_params(fresh)` gives the parameters a fresh start begins from (with `--init`: SRC's
    weights, shape-checked, and `fresh` random values where SRC lacks a head), given the random
    ones; None: the random ones. A rerun that restores a checkpoint never calls it.
    """
    model_fn: Callable[[nnx.Rngs], nnx.Module]
    objective: Objective
    train_batches: Iterator[dict]
    eval_batches: Callable[[], Iterable[dict]]
    throughput: Throughput
    pictures: Callable[[nnx.Module, dict], dict] | None = None
    initial_params: Callable[[dict], dict] | None = None
    resolved: dict = dataclasses.field(default_factory=dict)
    source: Any = None  # training.init_source.Source
