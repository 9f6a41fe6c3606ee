"""Fine-tuning methods every family shares: which parameters train, at which learning rate, and
the L2-SP penalty.

A model's params are `{"encoder": what comes from the source, ...the task head}`. The family
says how deep each encoder parameter sits (`depth(keys)`, keys relative to the encoder):
0 for the embeddings, i + 1 for layer i, num_layers + 1 above the layers (e.g. BERT's pooler);
the head is always at num_layers + 1. A scanned stack (`model.scan_layers`) keeps all layers in
one array per weight, so finetune/train.py refuses freezing the bottom layers and layer decay
with it.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

Depth = Callable[[tuple], int]


def _keys(path) -> tuple:
    return tuple(k.key for k in path)  # params are pure dicts: every entry is a DictKey


def frozen_mask(params, method, depth: Depth, fixed: Callable[[tuple], bool] | None = None) -> dict:
    """True for parameters that never change: the encoder (method.freeze_encoder), or the
    embeddings and the bottom k layers (method.freeze_bottom = k >= 0). The head trains, but for
    what `fixed(keys)` marks (statistics, not weights)."""
    def frozen(path, _):
        keys = _keys(path)
        if keys[0] != "encoder":
            return bool(fixed and fixed(keys))
        return method.freeze_encoder or 0 <= method.freeze_bottom and depth(keys[1:]) <= method.freeze_bottom
    return jax.tree_util.tree_map_with_path(frozen, params)


def layer_scales(params, decay: float, num_layers: int, depth: Depth) -> dict:
    """Layer-wise LR decay: a parameter at depth d learns at lr * decay^(L + 1 - d)."""
    def scale(path, _):
        keys = _keys(path)
        d = depth(keys[1:]) if keys[0] == "encoder" else num_layers + 1
        return decay ** (num_layers + 1 - d)
    return jax.tree_util.tree_map_with_path(scale, params)


def l2sp_penalty(alpha: float, frozen) -> Callable:
    """alpha/2 * ||w - w0||^2 over the trained encoder weights, against `state["anchor"]` (w0, the
    source's encoder, kept in the train state so a resumed run keeps it). For make_train_step."""
    def penalty(params, state):
        terms = [jnp.sum(jnp.square(w - w0)) for f, w, w0 in
                 zip(jax.tree.leaves(frozen["encoder"]), jax.tree.leaves(params["encoder"]),
                     jax.tree.leaves(state["anchor"])) if not f]
        return 0.5 * alpha * sum(terms, jnp.zeros((), jnp.float32))
    return penalty
