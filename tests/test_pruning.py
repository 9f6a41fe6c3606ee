"""Pruning during fine-tuning (training/pruning.py): the cubic schedule against values worked by
hand, exact per-matrix counts, whole heads by norm in every family's layout, weights that stay
zero through AdamW (with the control that shows they would not), and the CLI's one-line refusal."""


import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from conftest import cli_error, sigterm_when
from finetune.__main__ import main
from finetune.image import ImageClassifier
from finetune.bert import SequenceClassifier
from models.bert import BertConfig
from models.mae import MAEConfig
from models.modernbert import ModernBertConfig, ModernBertForSequenceClassification
from training import pruning
from test_finetune import ft_flags
from training.checkpoint_reader import read_params
from training.metrics import read_metrics
from training.step import Objective, make_train_step
from training.state import graphdef_and_specs, init_params

REPO = Path(__file__).resolve().parents[1]

BERT = lambda **kw: (lambda r: SequenceClassifier(BertConfig.of_size("tiny", 128, max_position=16, **kw), 3, 0.0, r))
FAMILIES = {
    "bert": BERT(num_heads=4),
    "modernbert_scanned": lambda r: ModernBertForSequenceClassification(
        ModernBertConfig.of_size("tiny", 128, num_heads=4, scan_layers=True), 3, r),
    "mae": lambda r: ImageClassifier(MAEConfig.of_size("tiny", num_heads=4), 3, r),
}


def method(**kw):
    m = ml_collections.ConfigDict(dict(sparsity=0.0, prune_heads=0.0, prune_start=0, prune_end=10,
                                       prune_every=1, freeze_encoder=False))
    m.update(kw)
    return m


def setup(model_fn, **kw):
    _, specs = graphdef_and_specs(model_fn)
    params = init_params(model_fn, 0)
    return pruning.pruner(method(**kw), specs, 20), params


def flat(tree) -> dict:
    return {pruning.name(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_cubic_schedule_golden_values():
    # s_t = s_f + (s_i - s_f)(1 - (t - t0)/(n dt))^3 with s_f = 0.8, t0 = 10, n dt = 100, by hand:
    # t=35: 0.8 * (1 - 0.75^3) = 0.8 * 0.578125; t=60: 0.8 * (1 - 0.125); t=85: 0.8 * (1 - 0.015625)
    for t, want in [(0, 0.0), (10, 0.0), (35, 0.4625), (60, 0.7), (85, 0.7875), (110, 0.8), (500, 0.8)]:
        assert float(pruning.cubic_sparsity(t, 0.8, 10, 110)) == pytest.approx(want, abs=1e-6), t
    assert float(pruning.cubic_sparsity(60, 0.8, 10, 110, initial=0.2)) == pytest.approx(0.725)
    p = pruning.Pruner({}, 0.5, 0.0, start=10, end=105, every=10)
    assert [t for t in range(120) if p.due(t)] == [20, 30, 40, 50, 60, 70, 80, 90, 100, 105]


def test_masks_keep_exactly_the_right_count_per_matrix():
    prune, params = setup(BERT(), sparsity=0.8)
    w = flat(params)
    big = "encoder/layers/1/mlp_out/kernel"  # 100x larger: a global threshold would keep all of it
    params = jax.tree_util.tree_map_with_path(
        lambda p, v: v * 100 if pruning.name(p) == big else v, params)
    w[big] = w[big] * 100
    masks = jax.jit(prune.redraw)(prune.init_masks(params), params, 10)
    assert sorted(masks) == sorted(k for k in w if k.startswith("encoder/layers/") and k.endswith("kernel"))
    for k, m in flat(masks).items():
        assert (~m).sum() == int(0.8 * m.size), k  # floor(s * n), each matrix on its own
        assert np.abs(w[k][~m]).max() <= np.abs(w[k][m]).min(), k  # the smallest ones
    # Halfway up the ramp (t=5 of 10): s = 0.8 * (1 - 0.5^3) = 0.7
    half = flat(jax.jit(prune.redraw)(prune.init_masks(params), params, 5))
    assert all((~m).sum() == int(0.7 * m.size) for m in half.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_head_pruning_zeroes_whole_heads_by_norm(family):
    prune, params = setup(FAMILIES[family], prune_heads=0.5)
    # Make the heads 2 and 3 of every block the strong ones, so 0 and 1 go (negative control: an
    # index-order or random choice of heads would not pick exactly these).
    def strong(path, v):
        spec = prune.axes.get(pruning.name(path))
        if spec is None:
            return v
        h = spec.index("heads")
        scale = np.ones(v.shape[h], np.float32)
        scale[2:] = 10.0
        return v * scale.reshape([-1 if i == h else 1 for i in range(v.ndim)])
    params = jax.tree_util.tree_map_with_path(strong, params)
    masks = flat(jax.jit(prune.redraw)(prune.init_masks(params), params, 10))
    assert masks and all("encoder/" in k for k in masks)
    for k, m in masks.items():
        alive = np.moveaxis(m, prune.axes[k].index("heads"), -1)
        alive = alive.reshape(*((alive.shape[0],) if prune.axes[k][0] == "layers" else ()), -1, 4)
        assert not alive[..., :2].any() and alive[..., 2:].all(), k  # whole heads, the weak ones


def test_pruned_weights_stay_zero_through_adamw_and_the_control_moves_them():
    model_fn = BERT(num_layers=1)  # one layer: the step compiles in half the time
    prune, params = setup(model_fn, sparsity=0.5, prune_heads=0.5, prune_end=2)
    graphdef, _ = graphdef_and_specs(model_fn)
    ids = np.random.default_rng(0).integers(1, 128, (4, 8)).astype(np.int32)
    batch = {"input_ids": ids, "token_type_ids": np.zeros_like(ids), "attention_mask": np.ones_like(ids)}
    objective = Objective(
        sums=lambda model, b, key: {"loss": jnp.sum(jnp.square(model(b["input_ids"], b["token_type_ids"],
                                                                        b["attention_mask"])))},
        normalisers=lambda b: {}, loss=lambda s, n: s["loss"], summarize=lambda s, p: {})
    tx = optax.adamw(1e-2, weight_decay=0.1)
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
             "masks": prune.init_masks(params)}
    step = jax.jit(make_train_step(graphdef, tx, objective, seed=0, pruner=prune))
    for _ in range(2):  # the ramp: masks at s = 0.4375, then 0.5
        state, _ = step(state, batch)
    ramp_end = flat(state["masks"])
    for _ in range(3):
        state, _ = step(state, batch)
    w, masks = flat(state["params"]), flat(state["masks"])
    assert all(np.array_equal(masks[k], ramp_end[k]) for k in masks)  # no redraw after the ramp
    for k, m in masks.items():
        assert (w[k][~m] == 0).all() and not np.signbit(w[k][~m]).any(), k  # exactly +0.0
        if k.endswith("mlp_in/kernel"):
            assert (~m).sum() == int(0.5 * m.size)
    # Control: the same steps without the pruner move pruned weights off zero (Adam's moments
    # from before the prune, and the gradients), so the check above can fail.
    plain = jax.jit(make_train_step(graphdef, tx, objective, seed=0))
    moved, _ = plain(state, batch)
    w2 = flat(moved["params"])
    assert any((w2[k][~m] != 0).any() for k, m in masks.items())


def test_report_counts_zeros_and_bytes():
    params = {"encoder": {"a": {"kernel": np.array([[0.0, 1.0], [0.0, 0.0]], np.float32)}},
              "head": np.ones(4, np.float32)}
    r = pruning.report(["encoder/a/kernel"], params)
    assert r["sparsity_per_matrix"] == {"encoder/a/kernel": 0.75}
    assert (r["params"], r["nonzero_params"], r["bytes_dense"], r["bytes_nonzero"]) == (8, 5, 32, 20)


@pytest.mark.parametrize("value", ["1.0", "-0.1", "1.5"])
def test_sparsity_outside_unit_interval_is_one_line_nothing_written(capsys, tmp_path, value):
    workdir = tmp_path / "run"
    err = cli_error(capsys, main, ["--config", "configs/finetune_reuters_r8.py", "--init", "none",
                                   "--workdir", str(workdir), f"--config.method.sparsity={value}"])
    assert "method.sparsity" in err and "[0, 1)" in err, err
    assert not workdir.exists()


def test_bad_ramp_and_frozen_encoder_are_refused():
    _, specs = graphdef_and_specs(BERT())
    with pytest.raises(pruning.UserError, match="prune_start=5 and method.prune_end=5"):
        pruning.pruner(method(sparsity=0.5, prune_start=5, prune_end=5), specs, 20)
    with pytest.raises(pruning.UserError, match="freeze_encoder"):
        pruning.pruner(method(sparsity=0.5, freeze_encoder=True), specs, 20)
    assert pruning.pruner(method(), specs, 20) is None




# ---- end to end: the CLI, SIGTERM during the ramp, export ------------------------------------

RAMP = dict(train__steps=32, eval__every_steps=8, data__max_train_examples=128, method__sparsity=0.8,
            method__prune_heads=0.5, method__prune_start=4, method__prune_end=20, method__prune_every=4)


def state_of(workdir) -> dict:
    """The newest checkpoint's whole state (params, masks, optimizer) as host arrays."""
    import orbax.checkpoint as ocp
    step = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    return ocp.PyTreeCheckpointer().restore(str(workdir / "checkpoints" / str(step) / "state"))


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory, data_dir):
    """Fine-tuning from a random encoder with both kinds of pruning, through the CLI: the
    uninterrupted reference."""
    workdir = tmp_path_factory.mktemp("pruned")
    proc = subprocess.run(cli(workdir, data_dir, **RAMP), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return workdir, json.loads((workdir / "results.json").read_text())


def cli(workdir, data_dir, **extra):
    return [sys.executable, "-m", "finetune", "--config", "configs/finetune_rt_polarity.py", "--init", "none",
            "--workdir", str(workdir), *ft_flags(data_dir, **extra)]


@pytest.mark.slow
def test_sigterm_during_the_ramp_then_rerun_gives_bitwise_masks_and_weights(pruned_run, data_dir, tmp_path):
    reference, results = pruned_run
    assert results["best_step"] >= RAMP["method__prune_end"]  # best dev only at the final sparsity
    workdir = tmp_path / "stopped"
    # --init none trains a tokenizer, which can differ between two runs: take the reference's.
    fixed = dict(RAMP, data__tokenizer=reference / "tokenizer")
    reached = lambda: max((m["step"] for m in read_metrics(workdir)), default=0) >= 9
    _, out = sigterm_when(cli(workdir, data_dir, **fixed), reached)
    stopped_at = int(out.split("stopped at step ")[1].split(",")[0])
    assert RAMP["method__prune_start"] < stopped_at < RAMP["method__prune_end"], out
    assert 0 < (state_of(workdir)["step"]) < RAMP["method__prune_end"]
    again = subprocess.run(cli(workdir, data_dir, **fixed), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    ours, theirs = state_of(workdir), state_of(reference)
    for part in ("masks", "params", "opt_state"):
        a, b = jax.tree.leaves(ours[part]), jax.tree.leaves(theirs[part])
        assert len(a) == len(b) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b)), part
    assert json.loads((workdir / "results.json").read_text())["pruning"] == results["pruning"]


@pytest.mark.slow
def test_pruned_export_is_dense_with_exact_zeros_and_transformers_logits(pruned_run, tmp_path):
    import torch
    import transformers
    from flax import nnx
    from data.tasks import Split, encode
    from models import hf_cli
    from models.tokenizer import Tokenizer
    from training.state import abstract_model

    workdir, results = pruned_run
    params, _ = read_params(workdir / "best")
    w = flat(params)
    report = results["pruning"]
    assert report["sparsity_per_matrix"]["encoder/layers/0/mlp_in/kernel"] == pytest.approx(0.8, abs=1e-3)
    assert report["sparsity_per_matrix"]["encoder/layers/1/query/bias"] == 0.5  # one of two heads
    for k, s in report["sparsity_per_matrix"].items():
        assert np.mean(w[k] == 0) == s and s >= 0.5, k
    out = tmp_path / "hf"
    hf_cli.main(["export", "--checkpoint", str(workdir / "best"), "--out", str(out), "--labels", "rotten,fresh"])
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    sd = {k: v.numpy() for k, v in theirs.state_dict().items()}
    # Our kernels are (in..., out...); torch's Linear weights are (out, in).
    as_torch = lambda kernel, n_in: kernel.reshape(int(np.prod(kernel.shape[:n_in])), -1).T
    for i in range(2):
        ours_of = lambda name, n_in=1: as_torch(w[f"encoder/layers/{i}/{name}/kernel"], n_in)
        pairs = {f"attention.self.{q}.weight": ours_of(q) for q in ("query", "key", "value")}
        pairs.update({"attention.output.dense.weight": ours_of("attn_out", 2),
                      "intermediate.dense.weight": ours_of("mlp_in"), "output.dense.weight": ours_of("mlp_out")})
        for name, ours in pairs.items():
            hf_w = sd[f"bert.encoder.layer.{i}.{name}"]
            assert hf_w.dtype == np.float32 and hf_w.shape == ours.shape
            np.testing.assert_array_equal(hf_w == 0, ours == 0, err_msg=name)  # the same zeros
            assert np.mean(hf_w == 0) >= 0.5, name
    cfg = BertConfig(**results["encoder"])
    model = nnx.merge(nnx.graphdef(abstract_model(lambda r: SequenceClassifier(cfg, 2, 0.1, r))), params)
    texts = ["A three-hour cinema master class.", "So muddled, repetitive and ragged.", "Meh."]
    batch = encode(Split(texts, None, np.zeros(3), np.arange(3)), Tokenizer.load(workdir / "tokenizer"), 32)
    ours = np.asarray(model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]))
    with torch.no_grad():
        logits = theirs(**{k: torch.tensor(batch[k]).long() for k in
                           ("input_ids", "token_type_ids", "attention_mask")}).logits.numpy()
    np.testing.assert_allclose(logits, ours, atol=1e-5)
