"""ModernBERT's blocks and model (models/modernbert.py, models/layers.py) against independent
references: rotary as complex rotation, attention paths against a token-by-token mask rule, the
grouped scanned stack against the unrolled one, packed rows against one document a row, losses
across meshes, the release's init and sizes. Parity with transformers: test_hf_modernbert.py."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.core import spmd

from models.layers import (dot_product_attention, in_layout, is_stacked, rotary, stack_layers,
                           unstack_layers, window_mask)
from models.modernbert import ModernBertConfig, ModernBertForMaskedLM
from test_train_step import mesh_of
from training import mesh as mesh_lib
from training.optim import make_optimizer
from conftest import tiny_config
from training.state import create_train_state, init_params
from training.step import Objective, make_train_step

VOCAB, SEQ, PREDS = 256, 32, 4
# A window of 8 tokens, so that rows of 32 have global and local layers that differ.
TINY = ModernBertConfig.of_size("tiny", VOCAB, max_position=64, local_window=8, dropout=0.1,
                                attention_dropout=0.1)


def build(cfg, seed=0):
    with nnx.use_eager_sharding(False):
        return ModernBertForMaskedLM(cfg, nnx.Rngs(seed))


# ---------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------


def test_rotary_is_a_complex_rotation_of_half_pairs():
    """Rotate-half: (x_i, x_{i+H/2}) as one complex number turned by position / base^(2i/H)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 3, 8)).astype(np.float32)
    positions = np.array([[0, 1, 2, 0, 1], [7, 3, 0, 100, 5]])
    got = np.asarray(rotary(jnp.asarray(x), jnp.asarray(positions), 10_000.0))
    z = x[..., :4] + 1j * x[..., 4:]
    angle = positions[..., None, None] / 10_000.0 ** (np.arange(0, 8, 2) / 8)
    z = z * np.exp(1j * angle)
    np.testing.assert_allclose(got, np.concatenate([z.real, z.imag], -1), atol=2e-5)
    # Negative control: the interleaved (GPT-J) pairing is another function.
    zi = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * angle)
    assert np.abs(got - np.stack([zi.real, zi.imag], -1).reshape(x.shape)).max() > 0.1


def test_window_mask_token_by_token():
    mask = np.asarray(window_mask(9, 2))
    for t in range(9):
        for s in range(9):
            assert mask[t, s] == (abs(t - s) <= 2)


def _attention_by_hand(q, k, v, segments, half_window):
    """softmax over the keys each query may see, one query at a time, in float64."""
    B, T, N, H = q.shape
    out = np.zeros(q.shape)
    for b in range(B):
        for t in range(T):
            seen = [s for s in range(T) if segments[b, s] > 0
                    and (segments[b, s] == segments[b, t] or segments[b, t] == 0)
                    and (half_window is None or abs(t - s) <= half_window)]
            if not seen:
                continue
            scores = np.einsum("NH,SNH->NS", q[b, t], k[b, seen]) / np.sqrt(H)
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            out[b, t] = np.einsum("NS,SNH->NH", probs, v[b, seen])
    return out


@pytest.mark.parametrize("half_window", [None, 3])
@pytest.mark.parametrize("path", ["reference", "xla"])
def test_attention_paths_equal_the_rule(path, half_window):
    """Packed documents, padding and a sliding window: every path equals softmax over exactly
    the keys the rule allows (the cuDNN path, GPU only, folds the window into the mask as the
    reference path does)."""
    from models.bert import segment_mask
    rng = np.random.default_rng(1)
    q, k, v = (rng.normal(size=(2, 16, 2, 8)).astype(np.float32) for _ in range(3))
    segments = np.array([[1] * 6 + [2] * 7 + [0] * 3, [1] * 12 + [0] * 4])
    got = dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), dtype=jnp.float32,
                                mask_BTS=segment_mask(jnp.asarray(segments)),
                                implementation=path, half_window=half_window)
    want = _attention_by_hand(q, k, v, segments, half_window)
    real = segments > 0
    np.testing.assert_allclose(np.asarray(got)[real], want[real], atol=2e-6)


# ---------------------------------------------------------------------------------------------
# The grouped stack: layer 0, then scanned groups (global, local, local)
# ---------------------------------------------------------------------------------------------


def test_grouped_layout_converts_both_ways_bitwise():
    cfg = ModernBertConfig.of_size("mini", VOCAB)  # 7 layers: 1 + 2 groups of 3
    params = nnx.to_pure_dict(nnx.state(build(cfg), nnx.Param))
    grouped = stack_layers(params, head=1, group=3)
    layers = grouped["encoder"]["layers"]
    assert set(layers) == {"head", "groups"} and is_stacked(grouped) and not is_stacked(params)
    assert "attn_norm" not in layers["head"][0]
    # Group position 0 holds layers 1 and 4, position 2 layers 3 and 6.
    np.testing.assert_array_equal(layers["groups"][2]["qkv"]["kernel"][1],
                                  params["encoder"]["layers"][6]["qkv"]["kernel"])
    back = unstack_layers(grouped)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)))
    # Orbax's string keys, and `like` (a fresh scanned tree) choosing the grouping.
    fresh = nnx.to_pure_dict(nnx.state(build(dataclasses.replace(cfg, scan_layers=True)), nnx.Param))
    assert jax.tree.structure(in_layout(params, True, like=fresh)) == jax.tree.structure(fresh)
    stringly = jax.tree.map(lambda x: x, {"encoder": {**grouped["encoder"], "layers": {
        "head": {"0": layers["head"][0]}, "groups": {str(j): s for j, s in layers["groups"].items()}}}})
    assert all(np.array_equal(a, b) for a, b in
               zip(jax.tree.leaves(unstack_layers(stringly)["encoder"]), jax.tree.leaves(params["encoder"])))


def test_scan_needs_whole_groups():
    with pytest.raises(ValueError, match="num_layers = 1 \\+ a multiple of 3"):
        ModernBertConfig.of_size("tiny", VOCAB, num_layers=5, scan_layers=True)


# ---------------------------------------------------------------------------------------------
# Training: losses across meshes and layouts, packed rows
# ---------------------------------------------------------------------------------------------


def mlm_objective() -> Objective:
    """Cross entropy at the masked positions (the recipe's objective lives with the pretraining
    setup; this is the loss the step differentiates, for the mesh and layout tests)."""

    def sums(model, batch, key):
        logits = model(batch["input_ids"], batch["attention_mask"], batch["masked_positions"], key=key)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["masked_ids"])
        w = batch["masked_weights"]
        return {"mlm_loss": jnp.sum(nll * w), "mlm_count": jnp.sum(w)}

    return Objective(sums, lambda batch: {"mlm": jnp.maximum(jnp.sum(batch["masked_weights"]), 1.0)},
                     lambda s, n: s["mlm_loss"] / n["mlm"],
                     lambda s, prefix: {f"{prefix}/mlm_loss": float(s["mlm_loss"] / s["mlm_count"])})


def random_batch(rng, batch=16):
    lengths = rng.integers(SEQ // 2, SEQ + 1, size=batch)
    mask = (np.arange(SEQ)[None] < lengths[:, None]).astype(np.int32)
    positions = np.sort(np.stack([rng.choice(n, PREDS, replace=False) for n in lengths]), axis=1)
    return {"input_ids": (rng.integers(5, VOCAB, (batch, SEQ)) * mask).astype(np.int32),
            "attention_mask": mask, "masked_positions": positions.astype(np.int32),
            "masked_ids": rng.integers(5, VOCAB, (batch, PREDS)).astype(np.int32),
            "masked_weights": (rng.random((batch, PREDS)) < 0.8).astype(np.float32)}


def run_steps(shape, batches, cfg, params):
    mesh = mesh_of(shape)
    tx = make_optimizer(tiny_config().optim, 10)
    state, shardings, graphdef = create_train_state(lambda rngs: ModernBertForMaskedLM(cfg, rngs), tx,
                                                    mesh, seed=0, params=params)
    step = jax.jit(make_train_step(graphdef, tx, mlm_objective(), seed=0),
                   in_shardings=(shardings, mesh_lib.batch_sharding(mesh)),
                   out_shardings=(shardings, None), donate_argnums=0)
    losses = []
    with jax.set_mesh(mesh), spmd.logical_axis_rules(mesh_lib.RULES):
        for b in batches:
            state, out = step(state, mesh_lib.global_batch(b, mesh))
            losses.append(float(out["sums"]["mlm_loss"] / out["sums"]["mlm_count"]))
    return np.array(losses), jax.device_get(state["params"])


@pytest.fixture(scope="module")
def batches():
    rng = np.random.default_rng(0)
    return [random_batch(rng) for _ in range(3)]


@pytest.fixture(scope="module")
def unrolled_init():
    return init_params(lambda rngs: ModernBertForMaskedLM(TINY, rngs), seed=0)


@pytest.fixture(scope="module")
def single_device(batches, unrolled_init):
    return run_steps((1, 1, 1), batches, TINY, unrolled_init)


@pytest.mark.parametrize("shape,scan,remat", [
    pytest.param((8, 1, 1), False, "none", marks=pytest.mark.slow), ((2, 2, 2), False, "none"),
    ((1, 1, 1), True, "none"), pytest.param((2, 2, 2), True, "full", marks=pytest.mark.slow)])
def test_losses_equal_across_meshes_and_layouts(shape, scan, remat, batches, unrolled_init,
                                                single_device):
    """Three AdamW steps with dropout on: the same losses and weights on every mesh, in either
    layout of the stack, with or without remat."""
    cfg = dataclasses.replace(TINY, scan_layers=scan, remat=remat)
    params = stack_layers(unrolled_init, head=1, group=3) if scan else unrolled_init
    losses, trained = run_steps(shape, batches, cfg, params)
    reference, reference_params = single_device
    assert losses[0] > 1.0 and not np.allclose(losses[0], losses[2])  # it trains, dropout on
    np.testing.assert_allclose(losses, reference, atol=1e-5, rtol=0)
    for a, b in zip(jax.tree.leaves(unstack_layers(trained)), jax.tree.leaves(reference_params)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_packed_rows_equal_one_document_a_row():
    """Three documents packed into one row (numbered 1, 2, 3 in attention_mask, then padding)
    give the logits and loss each gives alone in a row: attention never crosses a document (nor
    its window) and rotary positions restart at each one."""
    cfg = dataclasses.replace(TINY, dropout=0.0, attention_dropout=0.0)
    model = build(cfg, seed=3)
    rng = np.random.default_rng(4)
    lengths, P = (20, 13, 9), 3
    docs = [rng.integers(5, VOCAB, n).astype(np.int32) for n in lengths]
    picks = [np.sort(rng.choice(n, P, replace=False)) for n in lengths]
    labels = rng.integers(5, VOCAB, (len(docs), P)).astype(np.int32)
    T = 48
    alone_ids = np.zeros((3, T), np.int32)
    alone_mask = np.zeros((3, T), np.int32)
    for r, d in enumerate(docs):
        alone_ids[r, :len(d)], alone_mask[r, :len(d)] = d, 1
    alone = model(jnp.asarray(alone_ids), jnp.asarray(alone_mask), jnp.asarray(np.stack(picks)))
    starts = np.cumsum((0,) + lengths[:-1])
    packed_ids = np.zeros((1, T), np.int32)
    packed_mask = np.zeros((1, T), np.int32)
    for number, (d, s) in enumerate(zip(docs, starts), 1):
        packed_ids[0, s:s + len(d)], packed_mask[0, s:s + len(d)] = d, number
    positions = np.concatenate([p + s for p, s in zip(picks, starts)])[None]
    packed = model(jnp.asarray(packed_ids), jnp.asarray(packed_mask), jnp.asarray(positions))
    np.testing.assert_allclose(np.asarray(packed).reshape(3, P, -1), np.asarray(alone), atol=1e-5)
    nll = lambda logits: optax.softmax_cross_entropy_with_integer_labels(
        logits.reshape(-1, VOCAB), labels.reshape(-1)).mean()
    assert abs(float(nll(packed)) - float(nll(alone))) < 1e-5
    # Negative control: the same row read as one document differs.
    joined = model(jnp.asarray(packed_ids), jnp.asarray((packed_mask > 0).astype(np.int32)),
                   jnp.asarray(positions))
    assert np.abs(np.asarray(joined).reshape(3, P, -1) - np.asarray(alone)).max() > 1e-3


# ---------------------------------------------------------------------------------------------
# Init, sizes, bad input
# ---------------------------------------------------------------------------------------------


def test_release_init():
    """Truncated normal cut at 2 sigma (torch's trunc_normal_, so the standard deviation is
    0.88 sigma), sigma 0.02, output projections 0.02 / sqrt(2 layers), norms 1, biases 0."""
    cfg = ModernBertConfig.of_size("mini", 4096)
    params = nnx.to_pure_dict(nnx.state(build(cfg), nnx.Param))
    cut_std = 0.8796  # std of N(0, 1) cut at +-2
    checks = {"embedding": (params["encoder"]["embed"]["embedding"], 0.02),
              "qkv": (params["encoder"]["layers"][3]["qkv"]["kernel"], 0.02),
              "mlp_in": (params["encoder"]["layers"][3]["mlp_in"]["kernel"], 0.02),
              "attn_out": (params["encoder"]["layers"][3]["attn_out"]["kernel"], 0.02 / np.sqrt(14)),
              "mlp_out": (params["encoder"]["layers"][3]["mlp_out"]["kernel"], 0.02 / np.sqrt(14))}
    for name, (w, sigma) in checks.items():
        w = np.asarray(w)
        assert np.abs(w).max() <= 2 * sigma + 1e-9, name
        assert abs(w.std() / (sigma * cut_std) - 1) < 0.05, (name, w.std())
    assert np.all(np.asarray(params["encoder"]["final_norm"]["scale"]) == 1)
    assert np.all(np.asarray(params["decoder_bias"]) == 0)


@pytest.mark.parametrize("size", ["base", pytest.param("large", marks=pytest.mark.slow)])
def test_sizes_match_the_release(size):
    """Parameter counts equal transformers' ModernBertForMaskedLM of the release's config
    (built on torch's meta device: no memory), 149M and 395M."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = ModernBertConfig.of_size(size, 50368, pad_token_id=50283, cls_token_id=50281,
                                   sep_token_id=50282)
    with nnx.use_eager_sharding(False):
        shapes = nnx.eval_shape(lambda: ModernBertForMaskedLM(cfg, nnx.Rngs(0)))
    ours = sum(x.size for x in jax.tree.leaves(nnx.state(shapes, nnx.Param)))
    layers, hidden, heads, width = {"base": (22, 768, 12, 1152), "large": (28, 1024, 16, 2624)}[size]
    with torch.device("meta"):
        model = transformers.ModernBertForMaskedLM(transformers.ModernBertConfig(
            num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
            intermediate_size=width))
    theirs = sum(p.numel() for n, p in model.named_parameters())  # the tied decoder counted once
    assert ours == theirs and round(ours / 1e6) == {"base": 150, "large": 396}[size], ours


def test_bad_input_is_one_line():
    with pytest.raises(ValueError, match="local_window 127 must be a positive even number"):
        ModernBertConfig.of_size("tiny", VOCAB, local_window=127)
    model = build(dataclasses.replace(TINY, max_position=16))
    with pytest.raises(ValueError, match="rows of 32 tokens are longer than the model's context of 16"):
        model(jnp.ones((1, 32), jnp.int32), jnp.ones((1, 32), jnp.int32))
