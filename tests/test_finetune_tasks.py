"""Fine-tuning metrics, losses and method plumbing against hand-computed values (no training)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import scipy.stats

from flax import nnx

from finetune import tasks
from finetune.methods import frozen_mask as _frozen_mask, layer_scales as _layer_scales
from finetune.bert import SequenceClassifier, encoder_depth
from training.optim import make_optimizer as _make_optimizer
from models.bert import BertConfig


# ---- metrics: hand values ------------------------------------------------------------------

def test_accuracy_and_binary_f1_by_hand():
    labels = np.array([1, 1, 1, 0, 0, 0, 1, 0])
    preds = np.array([1, 0, 1, 1, 0, 0, 1, 0])
    # tp=3 (0,2,6), fp=1 (3), fn=1 (1), tn=3: accuracy 6/8, F1 = 2*3 / (2*3 + 1 + 1) = 0.75
    assert tasks.accuracy(labels, preds) == 0.75
    assert tasks.f1(labels, preds) == pytest.approx(0.75)
    assert tasks.f1([0, 0], [0, 0]) == 0.0  # no positives anywhere: 0, as scikit-learn


def test_matthews_binary_by_hand():
    labels = np.array([1, 1, 1, 0, 0, 0, 1, 0])
    preds = np.array([1, 0, 1, 1, 0, 0, 1, 0])
    tp, tn, fp, fn = 3, 3, 1, 1
    hand = (tp * tn - fp * fn) / np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))  # = 0.5
    assert tasks.matthews_corr(labels, preds) == pytest.approx(hand) == pytest.approx(0.5)
    assert tasks.matthews_corr(labels, np.ones(8)) == 0.0  # constant prediction: undefined -> 0
    assert tasks.matthews_corr(labels, 1 - labels) == pytest.approx(-1.0)


def test_matthews_multiclass_by_hand():
    # Confusion (rows true, cols pred): [[2,1,0],[0,2,0],[1,0,1]]; t=(3,2,2), p=(3,3,1), c=5, s=7.
    labels = np.array([0, 0, 0, 1, 1, 2, 2])
    preds = np.array([0, 0, 1, 1, 1, 0, 2])
    hand = (5 * 7 - (3 * 3 + 2 * 3 + 2 * 1)) / np.sqrt((49 - (9 + 9 + 1)) * (49 - (9 + 4 + 4)))
    assert tasks.matthews_corr(labels, preds) == pytest.approx(hand)


def test_macro_f1_by_hand():
    labels = np.array([0, 0, 0, 1, 1, 2, 2])
    preds = np.array([0, 0, 1, 1, 1, 0, 2])
    # class 0: tp 2, fp 1, fn 1 -> 4/6; class 1: tp 2, fp 1, fn 0 -> 4/5; class 2: tp 1, fn 1 -> 2/3
    assert tasks.macro_f1(labels, preds) == pytest.approx((4 / 6 + 4 / 5 + 2 / 3) / 3)


def test_pearson_spearman_by_hand_and_against_scipy():
    x = np.array([1.0, 2.0, 3.0, 4.0])
    y = np.array([2.0, 4.0, 5.0, 9.0])
    # means 2.5, 5; dx=(-1.5,-.5,.5,1.5), dy=(-3,-1,0,4): sxy=4.5+.5+0+6=11, sxx=5, syy=26
    assert tasks.pearson(x, y) == pytest.approx(11 / np.sqrt(5 * 26))
    assert tasks.spearman(x, y) == pytest.approx(1.0)
    assert tasks.pearson(x, np.ones(4)) == 0.0
    # ties take their average rank: [3, 1, 3, 2, 3] ranks as [4, 1, 4, 2, 4]
    z = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    assert tasks.spearman([3, 1, 3, 2, 3], z) == pytest.approx(tasks.pearson([4, 1, 4, 2, 4], z))
    rng = np.random.default_rng(0)
    a = rng.integers(0, 6, 200).astype(float)  # many ties
    b = a + rng.normal(size=200) * 2
    assert tasks.pearson(a, b) == pytest.approx(scipy.stats.pearsonr(a, b).statistic, abs=1e-12)
    assert tasks.spearman(a, b) == pytest.approx(scipy.stats.spearmanr(a, b).statistic, abs=1e-12)


def test_task_registry_uses_glue_official_metrics():
    official = {"cola": "matthews_corr", "sst2": "accuracy", "mrpc": "f1", "qqp": "f1",
                "stsb": "pearson", "mnli": "accuracy", "qnli": "accuracy", "rte": "accuracy",
                "wnli": "accuracy"}
    for name, metric in official.items():
        assert tasks.get_task(f"glue/{name}").primary == metric
    assert tasks.get_task("glue/stsb").regression and "spearman" in tasks.get_task("glue/stsb").metrics
    assert tasks.get_task("glue/mrpc").kind == tasks.PAIR and tasks.get_task("glue/cola").kind == tasks.SINGLE
    with pytest.raises(KeyError, match="unknown task"):
        tasks.get_task("glue/nope")


# ---- losses --------------------------------------------------------------------------------

def test_label_smoothing_loss_by_hand():
    logits = jnp.array([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    labels = jnp.array([0, 2])
    weights = jnp.array([1.0, 0.0])  # the second row is padding
    logp = np.log(np.exp([2.0, 0.0, -1.0]) / np.exp([2.0, 0.0, -1.0]).sum())
    eps = 0.3
    hand = -((1 - eps + eps / 3) * logp[0] + eps / 3 * logp[1] + eps / 3 * logp[2])
    sums = tasks.loss_sums(logits, labels, weights, regression=False, label_smoothing=eps)
    assert float(sums["loss"]) == pytest.approx(hand, rel=1e-6)
    assert float(sums["count"]) == 1.0 and float(sums["correct"]) == 1.0
    plain = tasks.loss_sums(logits, labels, weights, regression=False)
    assert float(plain["loss"]) == pytest.approx(-logp[0], rel=1e-6)
    reg = tasks.loss_sums(jnp.array([[1.5], [0.0]]), jnp.array([0.5, 3.0]), jnp.ones(2), regression=True)
    assert float(reg["loss"]) == pytest.approx(1.0 + 9.0)


# ---- methods: masks, layer decay, frozen optimizer state -----------------------------------
# BERT's depths (finetune/bert.py): embeddings 0, layer i at i + 1, the pooler above the layers.

def frozen_mask(params, method):
    return _frozen_mask(params, method, encoder_depth(len(params["encoder"]["layers"])))


def layer_scales(params, decay, num_layers):
    return _layer_scales(params, decay, num_layers, encoder_depth(num_layers))


def make_optimizer(optim_cfg, total_steps, frozen, scales=None):
    return _make_optimizer(optim_cfg, total_steps, frozen=frozen, scales=scales), None


def fake_params(layers=2):
    w = lambda *s: jnp.ones(s)
    return {"encoder": {"embed": {"word": {"embedding": w(4, 2)}, "norm": {"scale": w(2), "bias": w(2)}},
                        "layers": {i: {"query": {"kernel": w(2, 2), "bias": w(2)}} for i in range(layers)},
                        "pooler": {"kernel": w(2, 2), "bias": w(2)}},
            "classifier": {"kernel": w(2, 3), "bias": w(3)}}


def method(**kw):
    return ml_collections.ConfigDict(dict(dict(freeze_encoder=False, freeze_bottom=-1), **kw))


def test_frozen_masks():
    p = fake_params(3)
    m = frozen_mask(p, method(freeze_bottom=1))
    assert m["encoder"]["embed"]["word"]["embedding"] and m["encoder"]["layers"][0]["query"]["kernel"]
    assert not m["encoder"]["layers"][1]["query"]["kernel"] and not m["encoder"]["pooler"]["kernel"]
    m0 = frozen_mask(p, method(freeze_bottom=0))
    assert m0["encoder"]["embed"]["norm"]["scale"] and not m0["encoder"]["layers"][0]["query"]["bias"]
    me = frozen_mask(p, method(freeze_encoder=True))
    assert all(jax.tree.leaves(me["encoder"])) and not any(jax.tree.leaves(me["classifier"]))
    assert not any(jax.tree.leaves(frozen_mask(p, method())))


def test_layer_decay_scales():
    s = layer_scales(fake_params(2), 0.5, 2)  # depths: embed 0, layers 1-2, pooler/head 3
    assert s["classifier"]["kernel"] == 1.0 and s["encoder"]["pooler"]["bias"] == 1.0
    assert s["encoder"]["layers"][1]["query"]["kernel"] == 0.5
    assert s["encoder"]["layers"][0]["query"]["kernel"] == 0.25
    assert s["encoder"]["embed"]["word"]["embedding"] == 0.125


def optim_cfg(**kw):
    base = dict(lr=1e-2, warmup_steps=0, warmup_ratio=0.0, decay="constant", end_lr_ratio=0.0,
                weight_decay=0.1, b1=0.9, b2=0.999, eps=1e-6, clip_norm=1.0)
    return ml_collections.ConfigDict(dict(base, **kw))


def test_frozen_params_get_zero_updates_no_state_no_decay():
    p = fake_params()
    frozen = frozen_mask(p, method(freeze_bottom=0))
    tx, _ = make_optimizer(optim_cfg(), 10, frozen)
    state = tx.init(p)
    grads = jax.tree.map(jnp.ones_like, p)
    updates, _ = tx.update(grads, state, p)
    for f, u in zip(jax.tree.leaves(frozen), jax.tree.leaves(updates)):
        assert bool(jnp.all(u == 0)) == f  # frozen: exactly zero (no weight decay either)
    # Adam moments exist only for trained parameters.
    n_moments = sum(x.size for x in jax.tree.leaves(state) if x.ndim)  # not the step counters
    trained = sum(x.size for f, x in zip(jax.tree.leaves(frozen), jax.tree.leaves(p)) if not f)
    assert n_moments == 2 * trained


def test_layer_decay_scales_updates():
    p = fake_params()
    frozen = frozen_mask(p, method())
    scales = layer_scales(p, 0.5, 2)
    plain, _ = make_optimizer(optim_cfg(weight_decay=0.0, clip_norm=0.0), 10, frozen)
    decayed, _ = make_optimizer(optim_cfg(weight_decay=0.0, clip_norm=0.0), 10, frozen, scales)
    grads = jax.tree.map(jnp.ones_like, p)
    u0, _ = plain.update(grads, plain.init(p), p)
    u1, _ = decayed.update(grads, decayed.init(p), p)
    for a, b, s in zip(jax.tree.leaves(u0), jax.tree.leaves(u1), jax.tree.leaves(scales)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a) * s, rtol=1e-6)
    assert optax.tree.norm(u0) > 0


# ---- pooling -------------------------------------------------------------------------------

def test_mean_pooling_is_the_mean_over_real_tokens_and_ignores_padding():
    cfg = BertConfig.of_size("tiny", 64, max_position=16, dropout=0.0, attention_dropout=0.0)
    with nnx.use_eager_sharding(False):
        model = SequenceClassifier(cfg, 3, 0.1, nnx.Rngs(0), pooling="mean")
    ids = np.array([[2, 10, 11, 12, 3, 0, 0, 0]])
    mask = np.array([[1, 1, 1, 1, 1, 0, 0, 0]])
    types = np.zeros_like(ids)
    hidden_BTD, _ = model.encoder(ids, types, mask)
    mean_D = np.asarray(hidden_BTD)[0, :5].mean(axis=0)  # the 5 real tokens only
    expected = mean_D @ np.asarray(model.classifier.kernel[...]) + np.asarray(model.classifier.bias[...])
    np.testing.assert_allclose(np.asarray(model(ids, types, mask))[0], expected, atol=1e-5)
    # The same text with less padding gives the same logits.
    short = np.asarray(model(ids[:, :6], types[:, :6], mask[:, :6]))
    np.testing.assert_allclose(short, np.asarray(model(ids, types, mask)), atol=1e-5)
    with pytest.raises(ValueError, match="pooling"):
        SequenceClassifier(cfg, 3, 0.1, nnx.Rngs(0), pooling="max")
