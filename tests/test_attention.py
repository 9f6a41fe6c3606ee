"""Attention paths, packed rows with segment ids, and bfloat16 compute, against references."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from models.bert import BertConfig, BertForPreTraining, segment_mask, segment_positions
from models.layers import attention_implementation, dot_product_attention
from pretrain import bert as bert_family
from training.optim import make_optimizer
from training.step import make_train_step


def tiny(**overrides) -> BertConfig:
    return BertConfig.of_size("tiny", 256, max_position=64, dropout=0.0, attention_dropout=0.0,
                              **overrides)


def make_model(cfg: BertConfig) -> BertForPreTraining:
    with nnx.use_eager_sharding(False):
        return BertForPreTraining(cfg, nnx.Rngs(0))


# ---------------------------------------------------------------------------------------------
# Segment ids in attention_mask
# ---------------------------------------------------------------------------------------------

def test_segment_positions_restart_per_document_and_keep_padding_indices():
    segments = np.array([[1, 1, 1, 2, 2, 3, 0, 0],
                         [1, 1, 1, 1, 1, 0, 0, 0],
                         [1, 1, 1, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(segment_positions(jnp.asarray(segments)),
                                  [[0, 1, 2, 0, 1, 0, 6, 7], [0, 1, 2, 3, 4, 5, 6, 7], np.arange(8)])


def test_segment_mask_matches_its_rule_token_by_token():
    segments = np.array([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 0, 0]])
    mask = np.asarray(segment_mask(jnp.asarray(segments)))
    for b in range(2):
        for q in range(6):
            for k in range(6):
                sq, sk = segments[b, q], segments[b, k]
                assert mask[b, q, k] == (sk > 0 and (sk == sq or sq == 0)), (b, q, k)


def _documents(rng, lengths, vocab=256, preds=3):
    docs = []
    for n in lengths:
        ids = rng.integers(5, vocab, n).astype(np.int32)
        ids[0] = 2  # a [CLS]-like first token
        types = (np.arange(n) >= n // 2).astype(np.int32)
        positions = np.sort(rng.choice(np.arange(1, n), preds, replace=False))
        docs.append((ids, types, positions, rng.integers(5, vocab, preds).astype(np.int32)))
    return docs


def _rows(docs, groups, T):
    """One row per group of documents, packed back to back and numbered 1, 2, ... in
    attention_mask; masked positions point at each document's tokens in its row."""
    B, P = len(groups), sum(len(docs[i][2]) for i in groups[0])
    out = {k: np.zeros((B, T), np.int32) for k in ("input_ids", "token_type_ids", "attention_mask")}
    out.update(masked_positions=np.zeros((B, P), np.int32), masked_ids=np.zeros((B, P), np.int32),
               masked_weights=np.ones((B, P), np.float32),
               next_sentence_labels=np.zeros(B, np.int32))
    for r, group in enumerate(groups):
        start, slot = 0, 0
        for number, i in enumerate(group, 1):
            ids, types, positions, labels = docs[i]
            n, p = len(ids), len(positions)
            out["input_ids"][r, start:start + n] = ids
            out["token_type_ids"][r, start:start + n] = types
            out["attention_mask"][r, start:start + n] = number
            out["masked_positions"][r, slot:slot + p] = start + positions
            out["masked_ids"][r, slot:slot + p] = labels
            start, slot = start + n, slot + p
    return out


@pytest.mark.parametrize("attention", ["reference", "xla"])
def test_packed_rows_give_the_loss_of_their_documents_one_per_row(attention):
    # Must-show 4: the same four documents, two to a packed row or one per row.
    docs = _documents(np.random.default_rng(0), [13, 17, 20, 9])
    packed = _rows(docs, [[0, 1], [2, 3]], T=40)
    single = _rows(docs, [[0], [1], [2], [3]], T=40)
    # Each single row has 3 predictions, each packed row 6: the same 12 slots in the same order.
    graphdef, params = nnx.split(make_model(tiny(attention=attention)), nnx.Param)
    forward = jax.jit(lambda b: nnx.merge(graphdef, params)(
        b["input_ids"], b["token_type_ids"], b["attention_mask"], b["masked_positions"]))
    logits = {}
    for name, b in (("packed", packed), ("single", single)):
        mlm_BPV, nsp_BC = forward(b)
        logits[name] = np.asarray(mlm_BPV)
        sums = bert_family.mlm_nsp_sums(mlm_BPV, nsp_BC, b)
        logits[name + "_loss"] = float(sums["mlm_loss"] / sums["mlm_count"])
    np.testing.assert_allclose(logits["packed"].reshape(12, -1), logits["single"].reshape(12, -1),
                               atol=1e-5, rtol=0)
    assert abs(logits["packed_loss"] - logits["single_loss"]) < 1e-5
    # Packing without the segment numbers (all 1s) lets documents see each other: it differs.
    mixed = dict(packed, attention_mask=(packed["attention_mask"] > 0).astype(np.int32))
    leaked = np.asarray(forward(mixed)[0])
    assert np.abs(leaked - logits["packed"]).max() > 1e-3


# ---------------------------------------------------------------------------------------------
# Attention paths
# ---------------------------------------------------------------------------------------------

def _qkv_and_mask(rng, B=3, T=24, N=4, H=16):
    q, k, v = (jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.float32) for _ in range(3))
    segments = np.zeros((B, T), np.int32)
    segments[0, :24] = 1                       # unpacked, no padding
    segments[1, :10], segments[1, 10:18] = 1, 2  # two documents, then padding
    segments[2, :5], segments[2, 5:7], segments[2, 7:20] = 1, 2, 3
    return q, k, v, segment_mask(jnp.asarray(segments))


@pytest.mark.parametrize("path", ["xla", "cudnn"])
def test_each_attention_path_equals_the_reference_forward_and_backward(path):
    if path == "cudnn" and jax.default_backend() != "gpu":
        pytest.skip("cuDNN attention needs a GPU")
    dtype = jnp.bfloat16 if path == "cudnn" else jnp.float32  # cuDNN has no float32 kernel
    q, k, v, mask = _qkv_and_mask(np.random.default_rng(0))
    q, k, v = (x.astype(dtype) for x in (q, k, v))

    def attend(implementation):
        def f(q, k, v):
            return dot_product_attention(q, k, v, dtype=dtype, mask_BTS=mask,
                                         implementation=implementation)
        out = f(q, k, v)
        grads = jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a).astype(jnp.float32))), (0, 1, 2))(q, k, v)
        return [np.asarray(x, np.float32) for x in (out, *grads)]

    tol = 2e-2 if dtype == jnp.bfloat16 else 1e-5
    for got, want in zip(attend(path), attend("reference")):
        np.testing.assert_allclose(got, want, atol=tol, rtol=tol)


def test_attention_dropout_always_takes_the_reference_path():
    q, k, v, mask = _qkv_and_mask(np.random.default_rng(1))
    assert attention_implementation("xla", jnp.float32, dropout_active=True) == "reference"
    on_gpu = jax.default_backend() == "gpu"
    assert attention_implementation("auto", jnp.bfloat16, False) == ("cudnn" if on_gpu else "reference")
    assert attention_implementation("auto", jnp.float32, False) == "reference"
    args = dict(dtype=jnp.float32, mask_BTS=mask, dropout_rate=0.5, key=jax.random.key(3))
    np.testing.assert_array_equal(dot_product_attention(q, k, v, implementation="xla", **args),
                                  dot_product_attention(q, k, v, implementation="reference", **args))
    with pytest.raises(ValueError, match="unknown attention 'flash'"):
        tiny(attention="flash")


# ---------------------------------------------------------------------------------------------
# bfloat16 compute, float32 weights and statistics
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow  # whole runs or a long compile: the default pytest stays under 15 minutes
def test_bfloat16_forward_is_close_to_float32_and_the_weights_stay_float32():
    from conftest import random_batch
    b = random_batch(np.random.default_rng(4), 4, 32, 256, 5)
    args = (b["input_ids"], b["token_type_ids"], b["attention_mask"], b["masked_positions"])
    f32, bf16 = make_model(tiny()), make_model(tiny(dtype="bfloat16"))
    nnx.update(bf16, nnx.state(f32, nnx.Param))  # the same weights
    (want_mlm, want_nsp), (got_mlm, got_nsp) = f32(*args), bf16(*args)
    assert got_mlm.dtype == jnp.float32 and got_nsp.dtype == jnp.float32
    np.testing.assert_allclose(got_mlm, want_mlm, atol=0.1, rtol=0)
    want = bert_family.mlm_nsp_sums(want_mlm, want_nsp, b)
    got = bert_family.mlm_nsp_sums(got_mlm, got_nsp, b)
    assert abs(float(got["mlm_loss"] / want["mlm_loss"]) - 1) < 1e-2

    # One AdamW step with bf16 compute: gradients and updated weights are float32.
    graphdef, params = nnx.split(bf16, nnx.Param)
    params = nnx.to_pure_dict(params)
    optim = ml_collections.ConfigDict(dict(lr=1e-3, warmup_steps=0, decay="constant", end_lr_ratio=0.0,
                                           weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-6, clip_norm=1.0))
    tx = make_optimizer(optim, 10)
    step = jax.jit(make_train_step(graphdef, tx, bert_family.objective(), seed=0))
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
    new_state, out = step(state, b)
    assert np.isfinite(float(out["means"]["grad_norm"]))
    dtypes = {x.dtype for x in jax.tree.leaves(new_state["params"])}
    assert dtypes == {jnp.dtype(jnp.float32)}, dtypes
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params),
                                                        jax.tree.leaves(new_state["params"])))


def test_bfloat16_layer_norm_and_softmax_statistics_are_float32():
    # The compiled bf16 forward computes its reductions (LayerNorm mean/variance, softmax sum)
    # in float32: no reduce over bf16 values appears in the HLO.
    from conftest import random_batch
    b = random_batch(np.random.default_rng(5), 2, 16, 256, 3)
    graphdef, params = nnx.split(make_model(tiny(dtype="bfloat16", attention="reference")), nnx.Param)

    def forward(params):
        model = nnx.merge(graphdef, params)
        return model(b["input_ids"], b["token_type_ids"], b["attention_mask"], b["masked_positions"])[0]

    hlo = jax.jit(forward).lower(params).as_text()
    reduces = [line for line in hlo.splitlines() if "stablehlo.reduce" in line or "reduce(" in line]
    assert reduces, "no reductions found"
    assert not [line for line in reduces if "bf16" in line.split("->")[-1]], reduces
