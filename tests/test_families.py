"""Both trainers run a new family through the one step and loop: a linear-regression family of a
few lines, pretrained, stopped and resumed, then fine-tuned from its checkpoint, stopped and
resumed. Resumed runs equal uninterrupted ones bitwise, log rows included."""

import json

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import bert_tiny, finetune_rt_polarity
from conftest import stop_at
from data import labelled
from data.pipeline import prefetching_iterator, process_share
from finetune.setup import FinetuneSetup
from finetune import tasks
from finetune.train import train_and_evaluate as finetune
from models.layers import normal, zeros
from models.family import FamilySpec, register
from pretrain.setup import PretrainSetup
from pretrain.train import train_and_evaluate as pretrain
from training import loop
from training.checkpoint import read_params
from training.metrics import read_metrics
from training.step import Objective

D, H = 6, 4
W_TRUE = np.linspace(-1.0, 1.0, D).astype(np.float32)


class Regressor(nnx.Module):
    """x -> encoder (D -> H) -> head (H -> 1): a linear model, factored."""

    def __init__(self, rngs):
        self.encoder = nnx.Linear(D, H, kernel_init=normal(0.5, "embed", "mlp"), bias_init=zeros("mlp"), rngs=rngs)
        self.head = nnx.Linear(H, 1, kernel_init=normal(0.5, "mlp", None), bias_init=zeros(None), rngs=rngs)

    def __call__(self, x_BD):
        return self.head(self.encoder(x_BD))


def examples(rows: np.ndarray) -> dict:
    """Row r: a fixed x and y = x . w + noise, a pure function of r."""
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
    ds = grain.MapDataset.range(256).shuffle(config.train.seed).repeat(None)
    ds = process_share(ds, config.train.batch_size, 0, 1).map(examples)
    return PretrainSetup(
        model_fn=Regressor, objective=OBJECTIVE, train_batches=prefetching_iterator(ds),
        eval_batches=lambda: [examples(np.arange(1000, 1016))],
        throughput=loop.Throughput(config.train.batch_size, "examples"))


class Split:
    def __init__(self, rows):
        self.rows, self.index, self.labelled = rows, rows, True
        self.labels = examples(rows)["labels"]

    def __len__(self):
        return len(self.rows)


def finetune_setup(config, workdir, init, explicit):
    splits = {"train": Split(np.arange(48)), "dev": Split(np.arange(100, 124)), "test": Split(np.arange(200, 220))}
    return FinetuneSetup(
        task=tasks.get_task(config.data.task), splits=splits, label_names=None,
        encode=lambda split, rows, positions: examples(splits[split].rows[rows]), model_fn=Regressor,
        predict=lambda model, batch, key: model(batch["x"]), depth=lambda keys: 1, num_layers=1,
        initial_params=lambda fresh: {**fresh, "encoder": read_params(init)[0]["encoder"]},
        save_assets=lambda folder: None,
        source={"init": init}, results={"source": {"init": init}})


register(FamilySpec(name="linreg", config_class=dict, sizes={}, size_of=lambda cfg: "custom",
                    shape_fields=(), pretrain=f"{__name__}:pretrain_setup",
                    finetune=f"{__name__}:finetune_setup"))


def configs():
    pre = ml_collections.ConfigDict({k: bert_tiny.get_config()[k] for k in
                                     ("optim", "mesh", "checkpoint", "eval", "wandb")})
    pre.family = "linreg"
    pre.train = dict(steps=12, batch_size=16, grad_accum=2, seed=0, log_every=4)
    pre.optim.lr, pre.optim.warmup_steps, pre.optim.decay_steps = 0.05, 2, 0
    pre.checkpoint.every_steps, pre.eval.every_steps = 3, 6
    ft = finetune_rt_polarity.get_config()
    ft.family, ft.data.task = "linreg", "glue/stsb"  # a regression task: pearson, spearman
    ft.train.steps, ft.train.batch_size, ft.train.log_every, ft.eval.every_steps = 9, 8, 2, 3
    ft.optim.lr = 0.05
    return pre, ft


def spy_on_the_loop(monkeypatch) -> list[int]:
    """The steps that training/loop.py's log window saw."""
    steps, add = [], loop.LogWindow.add
    monkeypatch.setattr(loop.LogWindow, "add", lambda self, s, out: (steps.append(s), add(self, s, out))[1])
    return steps


def train_rows(workdir):
    return [{k: v for k, v in m.items() if not k.startswith("perf/")} for m in read_metrics(workdir)]


def assert_same_params(a, b):
    for x, y in zip(jax.tree.leaves(read_params(a)[0]), jax.tree.leaves(read_params(b)[0])):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    pre, _ = configs()
    workdir = tmp_path_factory.mktemp("linreg_pre")
    last_eval = pretrain(pre, workdir)
    return workdir, last_eval


def test_pretraining_a_new_family_learns_and_resumes_bitwise(pretrained, tmp_path, monkeypatch):
    full, last_eval = pretrained
    rows = train_rows(full)
    assert [r["step"] for r in rows if "train/loss" in r] == [4, 8, 12]
    evals = [r["eval/loss"] for r in rows if "eval/loss" in r]
    assert len(evals) == 3 and evals[0] > evals[1] > evals[2]  # steps 0, 6 and 12: it learns
    assert last_eval["eval/loss"] == evals[-1] and (full / "curves.png").stat().st_size > 0

    pre, _ = configs()
    stop_at(monkeypatch, 5)  # inside a log window (log_every 4) and between checkpoints (every 3)
    steps = spy_on_the_loop(monkeypatch)
    assert pretrain(pre, tmp_path) == {"eval/loss": evals[0]}  # stopped: the start's eval only
    assert (tmp_path / "checkpoints" / "5").is_dir()
    monkeypatch.undo()
    pretrain(pre, tmp_path)
    assert steps == [1, 2, 3, 4, 5]
    assert train_rows(tmp_path) == rows  # the train row of the open window too, bitwise
    assert_same_params(tmp_path, full)


def test_fine_tuning_a_new_family_from_its_checkpoint_resumes_bitwise(pretrained, tmp_path, monkeypatch):
    source, _ = pretrained
    _, ft = configs()
    full = finetune(ft, tmp_path / "full", str(source))
    assert full["metric"] == "pearson" and full["dev"]["pearson"] > 0.5
    assert (tmp_path / "full" / "curves.png").is_file()
    np.testing.assert_array_equal(read_params(tmp_path / "full" / "best")[0]["encoder"]["kernel"].shape, (D, H))

    stop_at(monkeypatch, 4)
    steps = spy_on_the_loop(monkeypatch)
    assert finetune(ft, tmp_path / "stopped", str(source)) is None
    monkeypatch.undo()
    assert steps == [1, 2, 3, 4]
    resumed = finetune(ft, tmp_path / "stopped", str(source))
    assert train_rows(tmp_path / "stopped") == train_rows(tmp_path / "full")
    for key in ("dev", "test", "best_step"):
        assert resumed[key] == full[key]
    assert json.loads((tmp_path / "stopped" / "source.json").read_text()) == {"init": str(source)}
    assert_same_params(tmp_path / "stopped", tmp_path / "full")
