"""What the pretraining and fine-tuning loops share: the log window of per-step sums, timed."""

import time

import jax
import jax.numpy as jnp


class LogWindow:
    """Adds up the train step's outputs on device over a log window and times the steps in it.

    The timer leaves out compilation (a run's first step) and whatever `restart_timer` marks
    (evaluation). In multi-process runs each step waits for the previous one: CPU (gloo) runs
    deadlock with ~30 programs in flight; on TPU/GPU one step still stays queued behind the
    running one.
    """

    def __init__(self, start_step: int):
        self._first_step = start_step + 1
        self._previous = None
        self._new_window()

    def _new_window(self):
        self._sums, self._steps = None, 0
        self.restart_timer()

    def restart_timer(self):
        self._timer, self._timed_steps = time.perf_counter(), 0

    def add(self, step: int, sums):
        if jax.process_count() > 1:
            jax.block_until_ready(self._previous)
            self._previous = sums
        self._sums = sums if self._sums is None else jax.tree.map(jnp.add, self._sums, sums)
        self._steps += 1
        self._timed_steps += 1
        if step == self._first_step:
            jax.block_until_ready(sums)
            self.restart_timer()

    def take(self):
        """(the sums on the host, the steps in the window, timed steps per second or None); then
        starts the next window."""
        host = jax.device_get(self._sums)
        elapsed = time.perf_counter() - self._timer
        steps_per_sec = self._timed_steps / elapsed if self._timed_steps else None
        steps = self._steps
        self._new_window()
        return host, steps, steps_per_sec
