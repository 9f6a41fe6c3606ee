"""The one train step and eval step that every model family and both trainers run.

A family says what it trains with an `Objective`: four plain functions, no hooks. Losses are
returned as sums and counts, and normalised by *global* counts taken on the whole batch before it
is split into microbatches, so gradient accumulation leaves the update unchanged and evaluation
can add sums over any number of batches.

The step's output is `{"sums": the objective's sums over the batch, "means": per-step values}`;
the run loop adds both up over a log window, summarises the sums with the objective and averages
the means (`grad_norm`, and one entry per penalty such as `l2sp`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

Sums = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Objective:
    """What a family trains.

    sums(model, batch, key) -> Sums: the forward pass and summed losses and counts (float32
        scalars) of one (micro)batch; `key=None` means no dropout (evaluation).
    normalisers(batch) -> dict: global normalisers (e.g. the number of masked tokens), taken on
        the whole batch before microbatching.
    loss(sums, normalisers) -> the scalar that is differentiated.
    summarize(sums, prefix) -> {"prefix/name": float}: means on the host, from sums that may have
        been added over many steps or batches.
    """
    sums: Callable[[nnx.Module, dict, jax.Array | None], Sums]
    normalisers: Callable[[dict], dict]
    loss: Callable[[Sums, dict], jax.Array]
    summarize: Callable[[dict, str], dict[str, float]]


def microbatches(batch: dict, grad_accum: int) -> dict:
    """B... -> (A, B/A, ...). Microbatch i takes rows i, i+A, i+2A...: every device keeps its
    own rows, no shuffle across devices."""
    return jax.tree.map(lambda x: x.reshape(-1, grad_accum, *x.shape[1:]).swapaxes(0, 1), batch)


def microbatch_count(rows: int, max_rows: int, granule: int) -> int:
    """The fewest equal microbatches of at most `max_rows` rows that a step of `rows` rows splits
    into, each a multiple of `granule` (the data-parallel size: every device keeps its rows).
    A run with batch-size warmup (data.pipeline.BatchWarmup) gives the step this for every size;
    the full batch then gets train.grad_accum, the smaller ones fewer."""
    per_device = rows // granule
    return next(n for n in range(-(-rows // max_rows), per_device + 1) if per_device % n == 0)


def make_train_step(graphdef, tx: optax.GradientTransformation, objective: Objective, *,
                    seed: int, grad_accum: int | Callable[[int], int] = 1, frozen=None,
                    penalties: dict[str, Callable] | None = None, pruner=None):
    """One optimizer update over the global batch, split into `grad_accum` microbatches (or
    `grad_accum(rows)` of them: a batch-size warmup's steps have several sizes, one compile each).

    `frozen`: a tree of bools like the params; frozen weights get no gradient and are passed
    through bitwise (pair it with an optimizer that gives them zero updates).
    `penalties`: name -> f(params, state) -> scalar, added to the loss once per step (e.g. L2-SP
    against an anchor kept in the state); each value is reported under its name.
    `pruner` (training/pruning.py): masks in `state["masks"]` zero the pruned weights' gradients
    before the optimizer and the weights after the update, and are redrawn on its schedule.
    Dropout keys derive from (seed, step, microbatch), so a resumed run replays exactly.
    """
    penalties = penalties or {}

    def loss_fn(params, micro, norm, key):
        if frozen is not None:  # XLA then drops the frozen weights' part of the backward pass
            params = jax.tree.map(lambda f, p: jax.lax.stop_gradient(p) if f else p, frozen, params)
        sums = objective.sums(nnx.merge(graphdef, params), micro, key)
        return objective.loss(sums, norm), sums

    grad_fn = jax.grad(loss_fn, has_aux=True)

    def train_step(state, batch):
        key = jax.random.fold_in(jax.random.key(seed), state["step"])
        norm = objective.normalisers(batch)
        count = grad_accum(len(jax.tree.leaves(batch)[0])) if callable(grad_accum) else grad_accum
        micro = microbatches(batch, count)

        def accumulate(carry, i):
            grads, sums = carry
            g, s = grad_fn(state["params"], jax.tree.map(lambda x: x[i], micro), norm,
                           jax.random.fold_in(key, i))
            return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, sums, s)), None

        # The accumulators take the objective's own output structure.
        shapes = jax.eval_shape(lambda p, mb: loss_fn(p, mb, norm, key)[1], state["params"],
                                jax.tree.map(lambda x: x[0], micro))
        zero_sums = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        zero_grads = jax.tree.map(jnp.zeros_like, state["params"])
        (grads, sums), _ = jax.lax.scan(accumulate, (zero_grads, zero_sums), jnp.arange(count))
        means = {}
        for name, penalty in penalties.items():
            means[name], g = jax.value_and_grad(penalty)(state["params"], state)
            grads = jax.tree.map(jnp.add, grads, g)
        if pruner is not None:
            grads = pruner.apply(state["masks"], grads)
        means["grad_norm"] = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        if frozen is not None:  # as they were, not w + 0 (which turns -0.0 into 0.0)
            params = jax.tree.map(lambda f, new, old: old if f else new, frozen, params, state["params"])
        new_state = {**state, "params": params, "opt_state": opt_state, "step": state["step"] + 1}
        if pruner is not None:
            new_state = pruner.update(new_state)
        return new_state, {"sums": sums, "means": means}

    return train_step


def make_eval_step(graphdef, fn: Callable[[nnx.Module, dict], object]):
    """params, batch -> fn(model, batch): an objective's sums (`objective.sums(m, b, None)`) or a
    head's outputs for predictions."""
    def eval_step(params, batch):
        return fn(nnx.merge(graphdef, params), batch)
    return eval_step
