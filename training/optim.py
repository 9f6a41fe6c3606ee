"""AdamW with the encoder-pretraining recipe: linear warmup, then linear or cosine decay; no decay on norms, biases.

One optimizer for every trainer: pretraining trains every parameter; fine-tuning passes a frozen
mask (zero updates, no optimizer state, no weight decay there) and per-parameter update scales
(layer-wise learning-rate decay).
"""

import jax
import optax

from training.errors import UserError


def learning_rate_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
    """Warmup to lr, then decay to lr * end_lr_ratio. With decay_steps > 0 the lr holds after
    warmup and decays only over the last decay_steps (warmup-stable-decay): small models on a
    small budget need a high lr for long enough to leave the MLM unigram plateau."""
    warmup = warmup_steps(optim_cfg, total_steps)
    after_warmup = max(total_steps - warmup, 1)
    decay_steps = optim_cfg.get("decay_steps", 0)
    if decay_steps < 0:
        raise UserError(f"optim.decay_steps={decay_steps}: use 0 (decay over all steps after warmup) "
                         "or the number of final steps to decay over")
    decay_steps = min(decay_steps, after_warmup) if decay_steps > 0 else after_warmup
    end = optim_cfg.lr * optim_cfg.end_lr_ratio
    if optim_cfg.decay == "linear":
        decay = optax.linear_schedule(optim_cfg.lr, end, decay_steps)
    elif optim_cfg.decay == "cosine":
        decay = optax.cosine_decay_schedule(optim_cfg.lr, decay_steps, alpha=optim_cfg.end_lr_ratio)
    elif optim_cfg.decay == "constant":
        decay = optax.constant_schedule(optim_cfg.lr)
    else:
        raise UserError(f"optim.decay={optim_cfg.decay!r}: choose linear, cosine or constant")
    warm = optax.linear_schedule(0.0, optim_cfg.lr, max(warmup, 1))
    hold = after_warmup - decay_steps
    if hold <= 0:
        return optax.join_schedules([warm, decay], [warmup])
    return optax.join_schedules([warm, optax.constant_schedule(optim_cfg.lr), decay],
                                [warmup, warmup + hold])


def warmup_steps(optim_cfg, total_steps: int) -> int:
    """optim.warmup_steps, or with -1 the fraction optim.warmup_ratio of all steps; at most all."""
    warmup = optim_cfg.warmup_steps
    if warmup < 0:
        warmup = round(optim_cfg.get("warmup_ratio", 0.0) * total_steps)
    return min(warmup, total_steps)


def decay_mask(params):
    """Weight decay on matrices only: LayerNorm scales, biases and other vectors (class and
    mask tokens) are exempt, as in the published recipes."""
    def keep(path, leaf):
        name = getattr(path[-1], "key", "")
        return leaf.ndim > 1 and name not in ("bias", "scale") and not str(name).endswith("_bias")
    return jax.tree_util.tree_map_with_path(keep, params)


def _scale_updates(scales) -> optax.GradientTransformation:
    return optax.GradientTransformation(
        lambda params: optax.EmptyState(),
        lambda updates, state, params=None: (jax.tree.map(lambda u, s: u * s, updates, scales), state))


def make_optimizer(optim_cfg, total_steps: int, *, frozen=None, scales=None) -> optax.GradientTransformation:
    """Clipped AdamW with the warmup/decay schedule.

    `frozen` (a tree of bools like the params): those get zero updates and no state
    (`optax.set_to_zero` in a `multi_transform`); the gradient clip then sees only the trained
    ones. `scales` (a tree of floats): each parameter's update is multiplied by its scale.
    """
    schedule = learning_rate_schedule(optim_cfg, total_steps)
    tx = optax.chain(
        optax.clip_by_global_norm(optim_cfg.clip_norm) if optim_cfg.clip_norm > 0 else optax.identity(),
        optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                    weight_decay=optim_cfg.weight_decay, mask=decay_mask),
    )
    if frozen is not None:
        labels = jax.tree.map(lambda f: "frozen" if f else "train", frozen)
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    if scales is not None:
        tx = optax.chain(tx, _scale_updates(scales))
    return tx
