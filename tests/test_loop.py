"""The log window the pretraining and fine-tuning loops share."""

import jax.numpy as jnp

from training.loop import LogWindow


def test_log_window_sums_steps_and_leaves_the_first_step_out_of_the_timer():
    window = LogWindow(start_step=10)
    window.add(11, {"loss": jnp.float32(1.0)})  # the run's first step: compilation, not timed
    host, steps, steps_per_sec = window.take()
    assert (float(host["loss"]), steps, steps_per_sec) == (1.0, 1, None)

    window.add(12, {"loss": jnp.float32(2.0)})
    window.add(13, {"loss": jnp.float32(3.0)})
    host, steps, steps_per_sec = window.take()
    assert (float(host["loss"]), steps) == (5.0, 2) and steps_per_sec > 0

    window.add(14, {"loss": jnp.float32(4.0)})
    window.restart_timer()  # an evaluation: its time and the step before it are not counted
    host, steps, steps_per_sec = window.take()
    assert (float(host["loss"]), steps, steps_per_sec) == (4.0, 1, None)
