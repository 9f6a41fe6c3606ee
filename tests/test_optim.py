"""Learning-rate schedules: golden values by hand."""

import ml_collections
import numpy as np
import pytest

from training.errors import UserError
from training.optim import learning_rate_schedule


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
    with pytest.raises(UserError, match="choose linear, cosine or constant"):
        schedule(decay="exponential")
