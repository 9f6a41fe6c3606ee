"""AdamW with the encoder-pretraining recipe: linear warmup, then linear or cosine decay; no decay on norms, biases.

ModernBERT's recipe (Warner et al. 2024) from the same pieces, chosen by optional config fields
that the original recipe's configs do not have: a 1-sqrt decay tail (`optim.decay = "1-sqrt"`), StableAdamW-style
per-tensor update clipping (`optim.update_clip`) and weight decay decoupled from the learning rate
(`optim.decoupled_decay`).

One optimizer for every trainer: pretraining trains every parameter; fine-tuning passes a frozen
mask (zero updates, no optimizer state, no weight decay there) and per-parameter update scales
(layer-wise learning-rate decay).
"""

import jax
import jax.numpy as jnp
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
    elif optim_cfg.decay == "1-sqrt":
        decay = one_minus_sqrt_schedule(optim_cfg.lr, end, decay_steps)
    else:
        raise UserError(f"optim.decay={optim_cfg.decay!r}: choose linear, cosine, constant or 1-sqrt")
    warm = optax.linear_schedule(0.0, optim_cfg.lr, max(warmup, 1))
    hold = after_warmup - decay_steps
    if hold <= 0:
        return optax.join_schedules([warm, decay], [warmup])
    return optax.join_schedules([warm, optax.constant_schedule(optim_cfg.lr), decay],
                                [warmup, warmup + hold])


def one_minus_sqrt_schedule(start: float, end: float, steps: int) -> optax.Schedule:
    """start -> end over `steps` as 1 - sqrt(t / steps): the cooldown of warmup-stable-decay runs
    (Hägele et al. 2024) that ModernBERT uses; it drops fast at first and flattens at the end."""
    def schedule(count):
        frac = jnp.clip(count / steps, 0.0, 1.0)
        return end + (start - end) * (1.0 - jnp.sqrt(frac))
    return schedule


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


def _adamw(optim_cfg, schedule) -> optax.GradientTransformation:
    """optax.adamw unless the config asks for update clipping or decoupled decay (the original recipe's state
    and updates stay what they were); else the same three steps with those two changes:

    - `optim.update_clip` > 0 divides each tensor's Adam update by max(1, rms(update) / clip)
      (`optax.clip_by_block_rms`), StableAdamW's per-tensor clipping, taken on the Adam update
      m/(sqrt(v)+eps) rather than on g/sqrt(v), so it is made of optax pieces only;
    - `optim.decoupled_decay` shrinks weights by weight_decay * lr(t) / lr, i.e. independently of
      the peak lr (optimi's decoupled form that ModernBERT's 1e-5 refers to), not weight_decay * lr(t).
    """
    update_clip = optim_cfg.get("update_clip", 0.0)
    decoupled = optim_cfg.get("decoupled_decay", False)
    if not update_clip and not decoupled:
        return optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                           weight_decay=optim_cfg.weight_decay, mask=decay_mask)
    weight_decay = optim_cfg.weight_decay / optim_cfg.lr if decoupled and optim_cfg.lr > 0 \
        else optim_cfg.weight_decay
    return optax.chain(
        optax.scale_by_adam(b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps),
        optax.clip_by_block_rms(update_clip) if update_clip else optax.identity(),
        optax.add_decayed_weights(weight_decay, mask=decay_mask),
        optax.scale_by_learning_rate(schedule),
    )


def make_optimizer(optim_cfg, total_steps: int, *, frozen=None, scales=None) -> optax.GradientTransformation:
    """Clipped AdamW with the warmup/decay schedule.

    `frozen` (a tree of bools like the params): those get zero updates and no state
    (`optax.set_to_zero` in a `multi_transform`); the gradient clip then sees only the trained
    ones. `scales` (a tree of floats): each parameter's update is multiplied by its scale.
    """
    schedule = learning_rate_schedule(optim_cfg, total_steps)
    tx = optax.chain(
        optax.clip_by_global_norm(optim_cfg.clip_norm) if optim_cfg.clip_norm > 0 else optax.identity(),
        _adamw(optim_cfg, schedule),
    )
    if frozen is not None:
        labels = jax.tree.map(lambda f: "frozen" if f else "train", frozen)
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    if scales is not None:
        tx = optax.chain(tx, _scale_updates(scales))
    return tx
