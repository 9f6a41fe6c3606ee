"""What both kinds of knowledge distillation share: the temperature-scaled KL term, the train step
that runs a frozen teacher beside the student, and where a rerun finds its teacher.

The teacher's weights are sharded on the student's mesh but live outside the train state: its
outputs are computed inside the same jit-compiled step, under stop_gradient, on the whole batch
before it is split into microbatches, and reach the objective as extra batch entries. So no
optimizer moment or checkpoint ever holds the teacher, and the one train step (training/step.py)
does not change. Task distillation: finetune/distill.py; pretraining distillation: pretrain/distill.py.
"""

from __future__ import annotations

import json
from typing import Callable

import jax
import jax.numpy as jnp

from training import storage
from training.errors import UserError
from training.init_source import init_key


def soft_sums(student_NC, teacher_NC, weights_N, temperature: float):
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), summed over the weighted rows (any
    leading shape: examples, or masked positions). T^2 keeps the term's gradient on the scale of
    the hard loss's as T grows (Hinton et al. 2015)."""
    log_p = jax.nn.log_softmax(teacher_NC.astype(jnp.float32) / temperature)
    log_q = jax.nn.log_softmax(student_NC.astype(jnp.float32) / temperature)
    kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
    return temperature ** 2 * jnp.sum(kl * weights_N.astype(jnp.float32))


def jit_step(train_step, teacher_outputs: Callable[[dict, dict], dict], teacher_params,
             shardings, batch_sharding):
    """`train_step(state, batch)` of training/step.py, jit-compiled, with
    `teacher_outputs(teacher_params, batch)` (a dict) added to the batch first, without gradient.
    The teacher's params are an argument of the compiled step, never a constant or in the state."""
    def step(state, batch, params):
        extra = jax.lax.stop_gradient(teacher_outputs(params, batch))
        return train_step(state, {**batch, **extra})

    teacher_shardings = jax.tree.map(lambda x: x.sharding, teacher_params)
    jitted = jax.jit(step, in_shardings=(shardings, batch_sharding, teacher_shardings),
                     out_shardings=(shardings, None), donate_argnums=0)
    return lambda state, batch: jitted(state, batch, teacher_params)


def param_bytes(params) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params)))


def pinned(workdir, key: str, given: str) -> str | None:
    """The teacher checkpoint a run in `workdir` resolved when it started (run.json's resolved
    `key`, e.g. "method.distill_from"), if it was given the same teacher; another is refused."""
    workdir = storage.as_path(workdir)
    if not (workdir / "run.json").is_file():
        return None
    group, field = key.split(".")
    first = json.loads((workdir / "config.json").read_text()).get(group, {}).get(field)
    if first and init_key(first) != init_key(given):
        raise UserError(f"{workdir} was distilled from {key}={first}; pass the same teacher to "
                        f"resume, or another --workdir")
    return json.loads((workdir / "run.json").read_text()).get("resolved", {}).get(group, {}).get(field)
