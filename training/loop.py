"""The one run loop: pretraining and fine-tuning, every model family.

`run(...)` drives a jit-compiled train step (training/step.py) over a batch iterator and does,
once and in this order each step: logging (losses averaged over a log window, the learning rate,
throughput and MFU), the NaN check, evaluation (with `curves.png` redrawn), checkpointing (the
train state, the iterator position and the open log window) and the preemption stop (SIGTERM /
Ctrl-C: every process stops at the same step, saves and returns).

The trainer builds what differs (model, data, objective, evaluation) and hands it in as plain
values and functions; it restores or creates the state with `restore_or_init` beforehand.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from training import mesh as mesh_lib
from training.errors import UserError
from training.metrics import MetricsWriter, read_metrics
from training.plots import draw_curves
from training.preemption import StopRequest
from training.profiling import Profiler


class LogWindow:
    """Adds up the train step's outputs on device over a log window and times the steps in it.

    The timer leaves out compilation (a run's first step) and whatever `restart_timer` marks
    (evaluation). In multi-process runs each step waits for the previous one: CPU (gloo) runs
    deadlock with ~30 programs in flight; on TPU/GPU one step still stays queued behind the
    running one. `state()` / `restore()` carry an open window through a checkpoint, so a run
    stopped mid-window logs the same row after resuming as it would have without the stop.
    """

    def __init__(self, start_step: int):
        self._first_step = start_step + 1
        self._previous = None
        self._rows, self._new_shape = None, False
        self.rows_per_sec = None  # of the window last taken: timed rows per second
        self._new_window()

    def _new_window(self):
        self._sums, self._steps = None, 0
        self._carried = None  # a resumed window's sums, on the host until the next step
        self.restart_timer()

    def restart_timer(self):
        self._timer, self._timed_steps, self._timed_rows = time.perf_counter(), 0, 0

    def batch_rows(self, rows: int) -> None:
        """The rows of the step about to be added: a batch-size warmup changes them, and the
        first step at a new size compiles, so the timer leaves it out as it does the first."""
        self._new_shape = self._rows is not None and rows != self._rows
        self._rows = rows

    def add(self, step: int, sums):
        if jax.process_count() > 1:
            jax.block_until_ready(self._previous)
            self._previous = sums
        if self._sums is None and self._carried is not None:
            # A window resumed from a checkpoint: its host sums go over explicitly, next to the
            # step's, and are added in the order an unstopped run adds them (bitwise resume).
            self._sums = jax.tree.map(lambda c, s: jax.device_put(c, s.sharding), self._carried, sums)
            self._carried = None
        self._sums = sums if self._sums is None else jax.tree.map(jnp.add, self._sums, sums)
        self._steps += 1
        self._timed_steps += 1
        self._timed_rows += self._rows or 0
        if step == self._first_step or self._new_shape:
            jax.block_until_ready(sums)
            self.restart_timer()

    def take(self):
        """(the sums on the host, the steps in the window, timed steps per second or None); then
        starts the next window."""
        host = self._host_sums()
        elapsed = time.perf_counter() - self._timer
        steps_per_sec = self._timed_steps / elapsed if self._timed_steps else None
        self.rows_per_sec = self._timed_rows / elapsed if self._timed_steps else None
        steps = self._steps
        self._new_window()
        return host, steps, steps_per_sec

    def _host_sums(self):
        return self._carried if self._sums is None else jax.device_get(self._sums)

    def state(self) -> dict:
        """The open window as JSON (float32 values are exact as JSON floats)."""
        sums = self._host_sums()
        return {"steps": self._steps, "sums": None if sums is None else jax.tree.map(float, sums)}

    def restore(self, state: dict | None) -> None:
        if state and state["steps"]:
            self._carried = jax.tree.map(np.float32, state["sums"])
            self._steps = state["steps"]


@dataclasses.dataclass(frozen=True)
class Throughput:
    """What one step processes, for the perf/* metrics."""
    items_per_step: float        # tokens, images or examples in one global batch (train.batch_size
                                 # rows; a batch-size warmup's steps count by their rows)
    unit: str                    # logged as perf/<unit>_per_sec
    flops_per_step: float = 0.0  # matmul FLOPs of one step; 0: no perf/mfu
    peak_flops: float = 0.0      # of all devices together; 0: unknown, no perf/mfu


def restore_or_init(ckpt, target, init: Callable[[], dict], batches) -> tuple[dict, int, dict]:
    """(state, start step, the checkpoint's data state): the newest checkpoint that restores
    into `target` (a damaged one is set aside, training/checkpoint.py) with the iterator moved
    to its position, or `init()` at step 0."""
    restored = ckpt.restore_latest(target)
    if restored is None:
        return init(), 0, {}
    start, state, data_state = restored
    batches.set_state(data_state["iterator"])  # grain's JSON state: the exact position
    return state, start, data_state


def evaluate_objective(eval_step, params, batches, mesh, objective, prefix: str = "eval") -> dict[str, float]:
    """The objective's sums added over every batch of `batches` (local rows), summarised."""
    totals = None
    for local in batches:
        sums = eval_step(params, mesh_lib.global_batch(local, mesh))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
        if jax.process_count() > 1:
            jax.block_until_ready(totals)  # see LogWindow
    return objective.summarize(jax.device_get(totals), prefix) if totals is not None else {}


@dataclasses.dataclass
class Outcome:
    state: dict
    step: int
    stopped: bool                 # by SIGTERM / Ctrl-C before the last step
    last_eval: dict[str, float]


def run(config, workdir, *, mesh, state, start: int, total_steps: int, train_step, batches: Iterator,
        ckpt, objective, evaluate: Callable[[dict, int], dict[str, float]], lr, throughput: Throughput,
        eval_every: int, eval_at_start: bool = False, save_at_eval: bool = False,
        steps_per_epoch: float | None = None, data_state: Callable[[], dict] = dict,
        window_state: dict | None = None, pictures: Callable[[dict], dict] | None = None,
        lease=None, desc: str = "train",
        on_eval: Callable[[int, dict[str, float]], None] | None = None) -> Outcome:
    """Train from `start` to `total_steps`.

    `evaluate(params, step)` returns the metrics to log (names prefixed, e.g. eval/mlm_accuracy);
    `data_state()` adds trainer fields to every checkpoint's data item next to the iterator
    position; `window_state` is the open log window of the checkpoint resumed from;
    `pictures(params)` gives {name: HWC image in [0, 1]} to show at every evaluation;
    `lease` (training/lease.py) is checked at every log step, with the checkpointer's last save;
    `on_eval(step, metrics)` sees every evaluation once it is logged (a hyperparameter search
    reports it and may stop the run by raising, training/search.py).
    """
    log_every, batch_size = config.train.log_every, config.train.batch_size
    warming = config.train.get("batch_warmup_steps", 0) > 0  # then train/batch_size is logged
    metrics = MetricsWriter(workdir, config.wandb.project, config=config.to_dict(), after_step=start)
    epoch = (lambda s: {"epoch": s / steps_per_epoch}) if steps_per_epoch else (lambda s: {})
    stop = StopRequest()
    profiler = Profiler(config, workdir)  # profile.steps: a trace of a few steps
    bar = tqdm(total=total_steps, initial=start, disable=jax.process_index() != 0, unit="step",
               dynamic_ncols=True, desc=desc)
    window = LogWindow(start)  # losses average over it; throughput leaves out compiles and evals
    window.restore(window_state)
    # The schedule is jnp code; run eagerly it would copy its constants to the device and its
    # value back behind our back (tests run this loop under jax.transfer_guard("disallow")).
    lr_of = jax.jit(lr)

    def report_eval(step: int, params) -> dict[str, float]:
        results = evaluate(params, step)
        metrics.write(step, {**epoch(step), **results})
        for name, image in (pictures(params) if pictures else {}).items():
            metrics.image(step, name, image)
        if jax.process_index() == 0:  # tqdm.write prints even when the bar is disabled
            where = f"step {step}" + (f" (epoch {step / steps_per_epoch:.2f})" if steps_per_epoch else "")
            bar.write(f"{where}: " + ", ".join(f"{k}={v:.4f}" for k, v in results.items()))
            metrics.flush()  # the curves read metrics.jsonl
            draw_curves(read_metrics(workdir), workdir)
        if on_eval is not None:
            on_eval(step, results)
        return results

    step, stopping, last_eval, failed = start, False, {}, False
    try:
        with jax.set_mesh(mesh), mesh_lib.logical_rules():
            if eval_at_start and start == 0:  # where training starts from, for comparison
                last_eval = report_eval(0, state["params"])
            def one_step(state):
                batch = mesh_lib.global_batch(next(batches), mesh)
                rows = len(jax.tree.leaves(batch)[0])  # a batch-size warmup's steps differ
                window.batch_rows(rows)
                return (*train_step(state, batch), rows)

            while step < total_steps and not stopping:
                state, out, rows = profiler.run_step(step + 1, lambda: one_step(state))
                step += 1
                window.add(step, out)
                stopping = stop.should_stop(step)  # the same step on every process
                bar.update(1)

                if step % log_every == 0 or step == total_steps:
                    host, window_steps, steps_per_sec = window.take()
                    row = objective.summarize(host["sums"], "train")
                    if not math.isfinite(row["train/loss"]):
                        last = ckpt.latest_step()
                        rerun = (f"rerun to resume from the last good checkpoint (step {last})"
                                 if last is not None else
                                 "rerun: there is no checkpoint yet, so it starts from the beginning")
                        raise UserError(f"loss became {row['train/loss']} by step {step}; lower "
                                        f"optim.lr or raise optim.warmup_steps, then {rerun}")
                    row.update({f"train/{k}": float(v) / window_steps for k, v in host["means"].items()})
                    at = jax.device_put(np.int32(step - 1), NamedSharding(mesh, P()))
                    row["train/lr"] = float(jax.device_get(lr_of(at)))
                    row.update(epoch(step))
                    if warming:
                        row["train/batch_size"] = rows  # of the window's last step
                    if steps_per_sec:
                        batches_per_sec = window.rows_per_sec / batch_size  # full batches a second
                        row["perf/steps_per_sec"] = steps_per_sec
                        row[f"perf/{throughput.unit}_per_sec"] = batches_per_sec * throughput.items_per_step
                        if throughput.flops_per_step and throughput.peak_flops:
                            row["perf/mfu"] = batches_per_sec * throughput.flops_per_step / throughput.peak_flops
                    metrics.write(step, row)
                    bar.set_postfix(loss=f"{row['train/loss']:.3f}", refresh=False)
                    ckpt.check()  # a background save that failed stops the run here, in one line
                    if lease is not None:
                        lease.check()

                evaluated = step % eval_every == 0 or step == total_steps
                if evaluated:
                    last_eval = report_eval(step, state["params"])
                    window.restart_timer()

                if ckpt.maybe_save(step, state, {"iterator": batches.get_state(),
                                                 "log_window": window.state(), **data_state()},
                                   force=(save_at_eval and evaluated) or step == total_steps or stopping):
                    metrics.flush()  # a bucket's metrics.jsonl holds every step a rerun skips
    except BaseException:
        failed = True
        raise
    finally:
        profiler.close()
        stop.restore()
        bar.close()
        if not (failed and jax.process_count() > 1):  # a save's commit would wait for a lost peer
            ckpt.wait()
        try:
            metrics.close()
        except OSError:
            if not failed:
                raise
            # The run is stopping with its own line (a full disk, most likely the same cause).
    stopped = stopping and step < total_steps
    if stopped:
        print(f"{stop.reason}: stopped at step {step}, checkpoint saved in {ckpt.directory}; "
              f"run the same command again to resume")
    return Outcome(state, step, stopped, last_eval)
