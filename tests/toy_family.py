"""A linear-regression model family in one file, as a third family would arrive: its model and
config class, its pretraining and fine-tuning setups, a HuggingFace record, and one spec.

It uses only what a family is given (the spec API): `models.family` to register, the setups'
records (`pretrain.setup`, `finetune.setup`), the shared `--init` (`training.init_source`), the
`Objective` of the one train step, the data pipeline's helpers and the HF table's language.
Nothing under training/, pretrain/, finetune/ or models/hf*.py knows it exists.
"""

import dataclasses

import grain
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data.pipeline import prefetching_iterator, process_share
from finetune import tasks
from finetune.setup import FinetuneSetup
from models.family import FamilySpec, register
from models.hf_table import FLAT, Architecture, Family, Rule, kernel
from models.layers import normal, zeros
from pretrain.setup import PretrainSetup
from training import loop
from training.init_source import finetune_source, load_encoder, pretrain_source, source_params, take_params
from training.step import Objective

W_TRUE = np.linspace(-1.0, 1.0, 6).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class LinRegConfig:
    inputs: int = 6
    hidden: int = 4

    @classmethod
    def from_model_config(cls, group) -> "LinRegConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in dict(group).items() if k in names})


class Regressor(nnx.Module):
    """x -> encoder (inputs -> hidden) -> head (hidden -> 1): a linear model, factored."""

    def __init__(self, cfg: LinRegConfig, rngs):
        self.encoder = nnx.Linear(cfg.inputs, cfg.hidden, kernel_init=normal(0.5, "embed", "mlp"),
                                  bias_init=zeros("mlp"), rngs=rngs)
        self.head = nnx.Linear(cfg.hidden, 1, kernel_init=normal(0.5, "mlp", None), bias_init=zeros(None), rngs=rngs)

    def __call__(self, x_BD):
        return self.head(self.encoder(x_BD))


def examples(rows: np.ndarray) -> dict:
    """Row r: a fixed x and y = x . w + noise, a pure function of r."""
    D = len(W_TRUE)
    xn = np.stack([np.random.default_rng([7, int(r)]).normal(size=D + 1) for r in rows]).astype(np.float32)
    return {"x": xn[:, :D], "labels": xn[:, :D] @ W_TRUE + 0.1 * xn[:, D]}


def squared_error(model, batch, key):
    err_B = model(batch["x"])[:, 0] - batch["labels"]
    return {"sq": jnp.sum(err_B ** 2), "count": jnp.asarray(err_B.shape[0], jnp.float32)}


OBJECTIVE = Objective(
    squared_error, lambda batch: {"count": jnp.asarray(batch["x"].shape[0], jnp.float32)},
    lambda sums, norm: sums["sq"] / norm["count"],
    lambda sums, prefix: {f"{prefix}/loss": float(sums["sq"]) / float(sums["count"])})


def pretrain_setup(config, workdir, init, explicit):
    source, resolved = pretrain_source(config, workdir, init, explicit)  # --init: its shape, its weights
    cfg = SPEC.model_config({**config.model.to_dict(), **resolved.get("model", {})})
    ds = grain.MapDataset.range(256).shuffle(config.train.seed).repeat(None)
    ds = process_share(ds, config.train.batch_size, 0, 1).map(examples)
    return PretrainSetup(
        model_fn=lambda rngs: Regressor(cfg, rngs), objective=OBJECTIVE,
        train_batches=prefetching_iterator(ds), eval_batches=lambda: [examples(np.arange(1000, 1016))],
        throughput=loop.Throughput(config.train.batch_size, "examples"),
        initial_params=None if source is None else lambda fresh: source_params(source, fresh),
        resolved=resolved, source=source)


class Split:
    def __init__(self, rows):
        self.rows, self.index, self.labelled = rows, rows, True
        self.labels = examples(rows)["labels"]

    def __len__(self):
        return len(self.rows)


def finetune_setup(config, workdir, init, explicit):
    source, _ = finetune_source(workdir, init, SPEC.name)
    cfg = source.model_config()
    splits = {"train": Split(np.arange(48)), "dev": Split(np.arange(100, 124)), "test": Split(np.arange(200, 220))}
    return FinetuneSetup(
        task=tasks.get_task(config.data.task), splits=splits, label_names=None,
        encode=lambda split, rows, positions: examples(splits[split].rows[rows]),
        model_fn=lambda rngs: Regressor(cfg, rngs),
        predict=lambda model, batch, key: model(batch["x"]), depth=lambda keys: 1, num_layers=1,
        initial_params=lambda fresh: {**fresh, "encoder": take_params(load_encoder(source), fresh["encoder"],
                                                                      source.init)[0]},
        save_assets=lambda folder: None,
        source=dataclasses.asdict(source), results={"source": {"init": init}})


# The HuggingFace record: the encoder as `encoder.weight` / `encoder.bias`, the head as a head.
HF = Family(
    model_type="toy_linreg", config=LinRegConfig,
    rules=(Rule("kernel", "encoder.weight", "I H", kernel(1)), Rule("bias", "encoder.bias", "H", FLAT)),
    dims={"I": "inputs", "H": "hidden"}, depths={},
    to_hf=lambda c: {"input_size": c.inputs, "hidden_size": c.hidden},
    from_hf=lambda d: LinRegConfig(d["input_size"], d["hidden_size"]),
    base="ToyLinRegModel",
    architectures={"ToyLinRegForRegression": Architecture((
        Rule("head/kernel", "head.weight", "H 1", kernel(1)), Rule("head/bias", "head.bias", "1", FLAT)),
        marker="head"), "ToyLinRegModel": Architecture()},
    from_model_config=LinRegConfig.from_model_config)

SPEC = register(FamilySpec(
    name="linreg", config_class=LinRegConfig, sizes={}, size_of=lambda cfg: "custom",
    shape_fields=("inputs", "hidden"), pretrain=f"{__name__}:pretrain_setup",
    finetune=f"{__name__}:finetune_setup", hf=f"{__name__}:HF"))
