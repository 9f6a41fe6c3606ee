"""The BERT model and its objectives against independent references."""

import dataclasses

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from conftest import random_batch
from models.bert import SIZES, BertConfig, BertForPreTraining
from models.layers import projection, tied_logits
from pretrain import bert as bert_family


def test_masked_position_mlm_loss_equals_dense_reference():
    cfg = BertConfig.of_size("tiny", 256, max_position=32)
    with nnx.use_eager_sharding(False):
        model = BertForPreTraining(cfg, nnx.Rngs(0))
    b = random_batch(np.random.default_rng(1), 4, 32, 256, 6)
    args = (b["input_ids"], b["token_type_ids"], b["attention_mask"])
    mlm_BPV, nsp_BC = model(*args, b["masked_positions"])
    sums = bert_family.mlm_nsp_sums(mlm_BPV, nsp_BC, b)

    # Reference: logits at every position, labels scattered into a dense (B, T) grid, -1 elsewhere.
    dense_BTV, _ = model(*args)
    labels = np.full(b["input_ids"].shape, -1)
    for row in range(4):
        keep = b["masked_weights"][row] > 0
        labels[row, b["masked_positions"][row][keep]] = b["masked_ids"][row][keep]
    logp = np.asarray(jax.nn.log_softmax(dense_BTV, axis=-1), np.float64)
    rows, cols = np.nonzero(labels >= 0)
    reference = -logp[rows, cols, labels[rows, cols]].mean()
    np.testing.assert_allclose(float(sums["mlm_loss"] / sums["mlm_count"]), reference, atol=1e-5)
    assert sums["mlm_count"] == len(rows)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tied_logits_and_its_gradients_equal_float64_autodiff(dtype):
    # The hand-written backward against jax.grad of the plain formula, in float64 (numpy).
    rng = np.random.default_rng(3)
    x = rng.normal(size=(3, 5, 16)).astype(dtype)
    table, bias = rng.normal(size=(40, 16)).astype(np.float32), rng.normal(size=40).astype(np.float32)
    g = rng.normal(size=(3, 5, 40)).astype(np.float32)
    logits, vjp = jax.vjp(tied_logits, x, table, bias)
    got = vjp(g)
    x64, t64 = np.asarray(x, np.float64), table.astype(np.float64)
    np.testing.assert_allclose(logits, x64 @ t64.T + bias, rtol=1e-5, atol=1e-5)
    assert logits.dtype == np.float32 and [a.dtype for a in got] == [x.dtype, table.dtype, bias.dtype]
    tol = 1e-5 if dtype == "float32" else 2e-2  # bf16: dx is rounded to bf16
    np.testing.assert_allclose(np.asarray(got[0], np.float64), g @ t64, rtol=tol, atol=tol)
    np.testing.assert_allclose(got[1], np.einsum("bpv,bpd->vd", g, x64), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[2], g.sum((0, 1)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("x_shape,k_shape,n", [((2, 3, 8), (8, 2, 4), 1), ((2, 3, 2, 4), (2, 4, 8), 2)])
def test_projection_and_its_gradients_equal_dot_general_autodiff(x_shape, k_shape, n):
    # LinearGeneral's contraction of x's trailing axes with the kernel's leading ones (q/k/v: D
    # -> N H; attention output: N H -> D), against lax.dot_general and its autodiff.
    rng = np.random.default_rng(6)
    x, kernel = rng.normal(size=x_shape).astype(np.float32), rng.normal(size=k_shape).astype(np.float32)
    dims = ((tuple(range(len(x_shape) - n, len(x_shape))), tuple(range(n))), ((), ()))
    want, want_vjp = jax.vjp(lambda a, b: jax.lax.dot_general(a, b, dims), x, kernel)
    got, got_vjp = jax.vjp(lambda a, b: projection(a, b, dims), x, kernel)
    g = rng.normal(size=want.shape).astype(np.float32)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_vjp(g), want_vjp(g)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    other = (((0,), (0,)), ((), ()))  # anything else is lax.dot_general itself
    np.testing.assert_array_equal(projection(x, x, other), jax.lax.dot_general(x, x, other))


def test_accuracy_counts_the_largest_logit_and_ties():
    logits = np.array([[0.1, 2.0, -1.0], [3.0, 3.0, 0.0], [0.0, 1.0, 5.0]], np.float32)
    labels = np.array([1, 1, 0])  # a hit; a tie for the largest (argmax would say 0); a miss
    _, correct = bert_family._nll_and_correct(logits, labels)
    np.testing.assert_array_equal(correct, [1.0, 1.0, 0.0])
    random = np.random.default_rng(4).normal(size=(64, 50)).astype(np.float32)  # no ties
    labels = np.where(np.arange(64) % 2, random.argmax(-1), np.random.default_rng(5).integers(0, 50, 64))
    np.testing.assert_array_equal(bert_family._nll_and_correct(random, labels)[1],
                                  random.argmax(-1) == labels)


def test_size_table_and_parameter_count():
    # BERT-base has 110M parameters (Devlin et al.), with the 30,522-token vocabulary.
    cfg = BertConfig.of_size("base", 30522)
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: BertForPreTraining(cfg, nnx.Rngs(0)))
    count = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert 109e6 < count < 111e6, count
    assert SIZES["large"] == (24, 1024, 16)


def test_dropout_is_active_only_with_a_key():
    cfg = BertConfig.of_size("tiny", 256, max_position=32)
    with nnx.use_eager_sharding(False):
        model = BertForPreTraining(cfg, nnx.Rngs(0))
    b = random_batch(np.random.default_rng(2), 2, 32, 256, 4)
    args = (b["input_ids"], b["token_type_ids"], b["attention_mask"], b["masked_positions"])
    eval_a, eval_b = model(*args)[0], model(*args)[0]
    train_a, train_b = model(*args, key=jax.random.key(0))[0], model(*args, key=jax.random.key(1))[0]
    np.testing.assert_array_equal(eval_a, eval_b)
    assert not np.allclose(train_a, train_b) and not np.allclose(train_a, eval_a)


def test_model_config_from_size_or_fields_and_unknown_keys_fail():
    group = ml_collections.ConfigDict({"size": "tiny", "vocab_size": 256, "max_position": 32, "dropout": 0.0})
    cfg = BertConfig.from_model_config(group)
    assert (cfg.num_layers, cfg.hidden_size, cfg.max_position, cfg.dropout) == (2, 128, 32, 0.0)
    explicit = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(BertConfig)}
    assert BertConfig.from_model_config({**explicit, "size": ""}) == cfg == BertConfig.from_model_config(explicit)

    with pytest.raises(ValueError, match="'pooling'"):
        BertConfig.from_model_config({"size": "tiny", "vocab_size": 256, "pooling": "cls"})
    with pytest.raises(ValueError, match="'dropuot'"):
        BertConfig.from_model_config({**explicit, "dropuot": 0.1})
    fine_tuning = {"size": "tiny", "vocab_size": 256, "pooling": "mean", "classifier_dropout": 0.1}
    assert BertConfig.from_model_config(fine_tuning, allow=("pooling", "classifier_dropout")).vocab_size == 256
    with pytest.raises(ValueError, match="needs vocab_size"):
        BertConfig.from_model_config({"size": "tiny"})
    with pytest.raises(ValueError, match="needs num_heads"):
        BertConfig.from_model_config({k: v for k, v in explicit.items() if k != "num_heads"})
    with pytest.raises(ValueError, match="not divisible by 3 heads"):
        BertConfig.from_model_config({**explicit, "num_heads": 3})


def test_train_flops_matches_xla_cost_analysis():
    # XLA's own count of the compiled forward + backward (matmuls and every elementwise op) is
    # an independent check of pretrain/bert.py's analytic matmul count: a little above it.
    cfg = BertConfig.of_size("mini", 1024, max_position=64)
    with nnx.use_eager_sharding(False):
        graphdef, params = nnx.split(BertForPreTraining(cfg, nnx.Rngs(0)), nnx.Param)
    b = random_batch(np.random.default_rng(0), 4, 64, 1024, 8)
    loss = lambda p: nnx.merge(graphdef, p)(b["input_ids"], b["token_type_ids"], b["attention_mask"],
                                            b["masked_positions"])[0].sum()
    xla = jax.jit(jax.grad(loss)).lower(params).compile().cost_analysis()["flops"]
    ratio = xla / bert_family.train_flops(cfg, 4, 64, 8)
    assert 1.0 < ratio < 1.06, ratio
