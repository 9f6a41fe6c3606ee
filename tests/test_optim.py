"""Learning-rate schedules: golden values by hand."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from training.errors import UserError
from training.optim import learning_rate_schedule, make_optimizer


def schedule(**kw):
    cfg = dict(lr=1.0, warmup_steps=10, decay="linear", end_lr_ratio=0.0, decay_steps=0)
    return learning_rate_schedule(ml_collections.ConfigDict(dict(cfg, **kw)), 110)


def lrs(sched, steps):
    return np.array([float(sched(s)) for s in steps])


def test_linear_decay_over_all_steps_after_warmup():
    np.testing.assert_allclose(lrs(schedule(), [0, 5, 10, 60, 110]), [0, 0.5, 1, 0.5, 0], atol=1e-6)


def test_warmup_stable_decay_holds_then_decays_over_the_last_steps():
    sched = schedule(decay_steps=40, end_lr_ratio=0.1)  # hold over 10..70, then 1 -> 0.1 over 70..110
    np.testing.assert_allclose(lrs(sched, [5, 10, 40, 70, 90, 110]), [0.5, 1, 1, 1, 0.55, 0.1], atol=1e-6)
    cosine = schedule(decay="cosine", decay_steps=40)
    np.testing.assert_allclose(lrs(cosine, [69, 70, 90, 110]), [1, 1, 0.5, 0], atol=1e-6)


def test_decay_steps_longer_than_the_run_decays_over_all_of_it():
    np.testing.assert_allclose(lrs(schedule(decay_steps=10_000), [10, 60, 110]),
                               lrs(schedule(), [10, 60, 110]))


def test_negative_decay_steps_is_refused():
    with pytest.raises(UserError, match="decay_steps=-1"):
        schedule(decay_steps=-1)
    with pytest.raises(UserError, match="choose linear, cosine, constant or 1-sqrt"):
        schedule(decay="exponential")


def test_one_minus_sqrt_tail_holds_then_drops_as_one_minus_sqrt():
    sched = schedule(decay="1-sqrt", decay_steps=40)  # hold over 10..70, then 1 - sqrt((t-70)/40)
    np.testing.assert_allclose(lrs(sched, [5, 70, 80, 100, 110]),
                               [0.5, 1, 0.5, 1 - np.sqrt(0.75), 0], atol=1e-6)
    to_tenth = schedule(decay="1-sqrt", decay_steps=40, end_lr_ratio=0.1)
    np.testing.assert_allclose(lrs(to_tenth, [80, 110]), [0.55, 0.1], atol=1e-6)
    linear = schedule(decay_steps=40)  # negative control: the linear tail is at 0.75 there
    assert abs(float(linear(80)) - 0.75) < 1e-6


def optimizer(**kw):
    cfg = dict(lr=0.1, warmup_steps=0, decay="constant", end_lr_ratio=0.0, decay_steps=0,
               weight_decay=0.0, b1=0.9, b2=0.98, eps=1e-6, clip_norm=0.0)
    return make_optimizer(ml_collections.ConfigDict(dict(cfg, **kw)), 100)


def one_update(tx, params, grads):
    updates, _ = tx.update(grads, tx.init(params), params)
    return {k: np.asarray(v) for k, v in updates.items()}


def test_update_clip_divides_each_tensor_by_its_update_rms_over_the_clip():
    params = {"kernel": jnp.zeros((2, 2)), "other": jnp.zeros((2, 2))}
    # First Adam step: update = g / (|g| + eps). "kernel": one entry ~1, rms 0.5; "other": all ~1.
    grads = {"kernel": jnp.array([[2.0, 0.0], [0.0, 0.0]]), "other": jnp.full((2, 2), -3.0)}
    got = one_update(optimizer(update_clip=0.25), params, grads)
    one_step = 2 / (2 + 1e-6)
    np.testing.assert_allclose(got["kernel"], [[-0.1 * one_step * 0.25 / 0.5, 0], [0, 0]], rtol=1e-6)
    np.testing.assert_allclose(got["other"], np.full((2, 2), 0.1 * 3 / (3 + 1e-6) * 0.25), rtol=1e-6)
    unclipped = one_update(optimizer(), params, grads)  # negative control: Adam's sign-like step
    np.testing.assert_allclose(unclipped["kernel"], [[-0.1 * one_step, 0], [0, 0]], rtol=1e-6)


def test_decoupled_decay_ignores_the_peak_lr_and_spares_vectors():
    params = {"kernel": jnp.full((2, 2), 2.0), "bias": jnp.full((2,), 2.0)}
    grads = {"kernel": jnp.zeros((2, 2)), "bias": jnp.zeros((2,))}
    decoupled = one_update(optimizer(weight_decay=0.01, decoupled_decay=True), params, grads)
    np.testing.assert_allclose(decoupled["kernel"], np.full((2, 2), -0.01 * 2.0), rtol=1e-6)
    np.testing.assert_allclose(decoupled["bias"], np.zeros(2))
    coupled = one_update(optimizer(weight_decay=0.01), params, grads)  # AdamW: wd * lr
    np.testing.assert_allclose(coupled["kernel"], np.full((2, 2), -0.001 * 2.0), rtol=1e-6)
