"""Magnitude pruning during training, for every family: masks, the gradual schedule, the step's hook.

Zhu & Gupta (2017) prune to a final sparsity s_f on a cubic ramp: at step t in [t0, t0 + n*dt],
every dt steps, s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n*dt))^3, and each matrix keeps its
largest-magnitude weights. optax has the pieces around it (optax.masked picks parameters, the
schedules are functions of the count) but no masks that change with the weights and live in the
state, and jaxpruner (the optax wrapper that has them) is unmaintained and has no NNX code; so
the masks and the cubic schedule are written here, and the rest is the shared step and optimizer.

Which weights: a family names logical axes on its weights (models/layers.py), and every family's
transformer layers name `heads` on the attention projections and `mlp` on the feed-forward ones,
so those kernels are pruned unstructured, each matrix on its own (each layer's slice of a scanned
stack on its own); embeddings, pooler and task head are not. Heads: every parameter with a `heads`
axis (query/key/value kernels and biases, the output projection) in one module (its path less the
last two keys: layer/query/kernel -> layer) is one attention block, and a head's score is the L2
norm of all its weights there; the lowest-scoring fraction of heads of each block is zeroed whole.

The masks are `state["masks"]`, {"a/b/kernel": bool array like the weight}, saved and restored with
the rest of the state, so a resumed run redraws nothing and continues bitwise. Gradients of pruned
weights are zeroed before the optimizer (its moments and the clip see only live weights), and after
each update the weights are zeroed where masked (`jnp.where`: exact +0.0), so they stay zero.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from training.errors import UserError

HEADS, FEEDFORWARD, LAYERS = "heads", "mlp", "layers"


def cubic_sparsity(step, final: float, start: int, end: int, initial: float = 0.0):
    """Zhu & Gupta's s_t: `initial` before `start`, `final` from `end` on, cubic in between. (`step`
    may be traced.)"""
    span = max(end - start, 1)
    frac = jnp.clip((jnp.asarray(step, jnp.float32) - start) / span, 0.0, 1.0)
    return final + (initial - final) * (1.0 - frac) ** 3


def name(path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


@dataclasses.dataclass(frozen=True)
class Pruner:
    """What the train step needs: which params have masks, their logical axes, the schedule.

    `sparsity`: the final unstructured sparsity of each pruned matrix; `heads`: the final fraction
    of each attention block's heads removed; both ramp on the cubic schedule from `start` to
    `end`, with new masks every `every` steps (and at `end`)."""
    axes: dict            # mask name -> logical axes of the weight (a tuple of names / None)
    sparsity: float
    heads: float
    start: int
    end: int
    every: int

    # ---- the masks -------------------------------------------------------------------------
    def init_masks(self, params) -> dict:
        """Nothing pruned yet (host arrays; `params` may be shapes)."""
        flat = {name(p): v for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
        return {k: np.ones(flat[k].shape, bool) for k in self.axes}

    def record(self) -> dict:
        return {"sparsity": self.sparsity, "prune_heads": self.heads, "start": self.start,
                "end": self.end, "every": self.every}

    def mask_shardings(self, param_shardings) -> dict:
        flat = {name(p): s for p, s in jax.tree_util.tree_flatten_with_path(param_shardings)[0]}
        return {k: flat[k] for k in self.axes}

    def apply(self, masks: dict, tree):
        """`tree` (params or gradients) with zeros where masked."""
        def one(path, x):
            m = masks.get(name(path))
            return x if m is None else jnp.where(m, x, jnp.zeros((), x.dtype))
        return jax.tree_util.tree_map_with_path(one, tree)

    def redraw(self, masks: dict, params, step) -> dict:
        """New masks for (traced) `step`: whole heads by norm, then each matrix's smallest weights;
        never un-pruning a weight (masks only shrink)."""
        flat = {name(p): v for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
        new = dict(masks)
        if self.heads > 0:
            frac = cubic_sparsity(step, self.heads, self.start, self.end)
            for group in _head_groups(self.axes):
                new.update(_head_masks(group, flat, self.axes, frac, new))
        if self.sparsity > 0:
            s = cubic_sparsity(step, self.sparsity, self.start, self.end)
            for k, axes in self.axes.items():
                if k.endswith("/kernel"):
                    w = jnp.where(new[k], flat[k], 0)
                    keep = (jax.vmap(_magnitude_mask, (0, None)) if axes[0] == LAYERS else _magnitude_mask)(w, s)
                    new[k] = new[k] & keep
        return new

    def due(self, step):
        """Whether masks are redrawn after `step` updates: every `every` steps of the ramp and at its end."""
        on_grid = (step - self.start) % self.every == 0
        return (step > self.start) & (step <= self.end) & (on_grid | (step == self.end))

    def update(self, state: dict) -> dict:
        """After an optimizer update: redraw the masks when due, then zero the masked weights."""
        masks = jax.lax.cond(self.due(state["step"]),
                             lambda: self.redraw(state["masks"], state["params"], state["step"]),
                             lambda: state["masks"])
        return {**state, "masks": masks, "params": self.apply(masks, state["params"])}


def _magnitude_mask(w, sparsity):
    """Keep all but the floor(sparsity * n) smallest |w| of one matrix (ties: lower index first)."""
    n = w.size
    k = jnp.floor(sparsity * n).astype(jnp.int32)
    order = jnp.argsort(jnp.abs(w).reshape(-1), stable=True)
    rank = jnp.zeros(n, jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
    return (rank >= k).reshape(w.shape)


def _head_groups(axes: dict) -> list[list[str]]:
    groups: dict[str, list[str]] = {}
    for k, a in axes.items():
        if HEADS in a:
            groups.setdefault(k.rsplit("/", 2)[0], []).append(k)
    return list(groups.values())


def _head_masks(group, flat, axes, fraction, masks) -> dict:
    """Masks zeroing the lowest-norm floor(fraction * H) heads of one attention block."""
    scanned = axes[group[0]][0] == LAYERS

    def per_head(k):  # squared norm per head: [L,] H
        w = jnp.where(masks[k], flat[k], 0).astype(jnp.float32)
        h = axes[k].index(HEADS)
        keep = (0, h) if scanned else (h,)
        return jnp.sum(jnp.square(w), axis=tuple(i for i in range(w.ndim) if i not in keep))

    norms = sum(per_head(k) for k in group)  # [L,] H
    H = norms.shape[-1]
    kill = jnp.floor(fraction * H).astype(jnp.int32)
    order = jnp.argsort(norms, axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1)
    alive = rank >= kill  # [L,] H
    out = {}
    for k in group:
        h = axes[k].index(HEADS)
        shape = [1] * flat[k].ndim
        shape[h] = H
        if scanned:
            shape[0] = flat[k].shape[0]
        out[k] = masks[k] & alive.reshape(shape)
    return out


def pruner(method, specs, total_steps: int) -> Pruner | None:
    """The Pruner of a fine-tuning config's `method` group, or None when it prunes nothing.

    `specs`: the params' logical PartitionSpecs (training/state.py graphdef_and_specs); only the
    encoder (`params["encoder"]`) is pruned."""
    sparsity, heads = method.sparsity, method.prune_heads
    for key, value in (("sparsity", sparsity), ("prune_heads", heads)):
        if not 0.0 <= value < 1.0:  # validate.py refuses it first; this guards direct callers
            raise UserError(f"method.{key}={value}: expected a number in [0, 1); fix "
                            f"--config.method.{key} or the config file")
    if sparsity == 0 and heads == 0:
        return None
    if method.freeze_encoder:
        raise UserError("method.sparsity / method.prune_heads prune the encoder, which "
                        "method.freeze_encoder=true keeps as it is; set one of them off")
    start = method.prune_start
    end = method.prune_end if method.prune_end >= 0 else round(2 * total_steps / 3)
    if not start < end <= total_steps:
        raise UserError(f"method.prune_start={start} and method.prune_end={end}: the ramp needs "
                        f"prune_start < prune_end <= the run's {total_steps} steps")
    axes = {}
    for path, spec in jax.tree_util.tree_flatten_with_path(
            specs["encoder"], is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0]:
        names = tuple(spec)
        if (HEADS in names and heads > 0) or ((HEADS in names or FEEDFORWARD in names) and sparsity > 0
                                              and str(getattr(path[-1], "key", "")) == "kernel"):
            axes["encoder/" + name(path)] = names
    if not axes:
        raise UserError("method.sparsity / method.prune_heads: this model has no weights with "
                        "'heads' or 'mlp' axes to prune")
    return Pruner(axes, sparsity, heads, start, end, method.prune_every)


def report(pruned, params) -> dict:
    """What results.json records: the sparsity reached per pruned weight (the share of exact
    zeros in `params`, host values), and the model's bytes dense and counting nonzeros only."""
    flat = {name(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    per = {k: float(np.mean(flat[k] == 0)) for k in pruned}
    total = sum(v.size for v in flat.values())
    zeros = sum(int(np.sum(flat[k] == 0)) for k in pruned)
    pruned_size = sum(flat[k].size for k in pruned)
    return {"sparsity_per_matrix": per,
            "sparsity_of_pruned": zeros / max(pruned_size, 1),
            "params": total, "nonzero_params": total - zeros,
            "bytes_dense": sum(v.nbytes for v in flat.values()),
            "bytes_nonzero": sum(v.nbytes for v in flat.values()) - sum(
                int(np.sum(flat[k] == 0)) * flat[k].itemsize for k in pruned)}

