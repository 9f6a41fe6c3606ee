"""Pretraining distillation, DistilBERT style (Sanh et al. 2019), for the text families.

`distill.teacher` names a pretraining workdir (or one of its checkpoints/<step> folders). The
student is the teacher's shape with `distill.student_layers` layers (0: half), starts from every
other teacher layer (layer i from teacher layer i * L_t / L_s; embeddings and heads copied) unless
`distill.init_from_teacher` is false, reads the teacher's tokenizer, and learns from

    alpha_soft * T^2 * KL(teacher || student) at the masked positions   (the MLM distribution)
  + alpha_mlm  * the family's own loss on the labels
  + alpha_cos  * (1 - cos(student hidden, teacher hidden)) over the real tokens

DistilBERT's weights are the defaults (5, 2, 1). The teacher runs in the same jit step, outside
the state (training/distill.py); run.json pins its checkpoint and a rerun reloads it. A family
takes part by giving its pretrain module `pretraining_model(cfg)` and `distill_outputs(model,
batch, key) -> {"mlm", "hidden", "sums"}`.
"""

from __future__ import annotations

import dataclasses
import importlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import family as families
from models.layers import unstack_layers
from training import distill as shared
from training import run_record, storage
from training.errors import UserError
from training.init_source import init_key, model_record, load_params, resolve_source, take_params
from training.mesh import shardings_of
from training.state import graphdef_and_specs, init_params
from training.step import Objective

USAGE = "pass a pretraining workdir or one of its checkpoints/<step> folders"


@dataclasses.dataclass
class Teacher:
    params: dict
    outputs: object          # (teacher params, batch) -> the batch entries the objective reads
    objective: Objective
    initial_params: object   # fresh student params -> the student's first weights


def prepare(config, workdir, init, explicit) -> tuple["Source | None", dict]:
    """The teacher's source (None without distill.teacher), checked before anything is written,
    and what it resolves of the config: the student's shape (model) and tokenizer (data)."""
    dc = config.get("distill")
    if dc is None or not dc.teacher:
        return None, {}
    given, where = dc.teacher, f"distill.teacher={dc.teacher}"
    spec = families.of_config(config)
    if not hasattr(importlib.import_module(spec.pretrain), "distill_outputs"):
        raise UserError(f"{where}: pretraining distillation is not supported for the {spec.name} family")
    if init is not None:
        raise UserError(f"--init and {where} both choose the student's first weights; drop --init")
    path = shared.pinned(workdir, "distill.teacher", given) or given
    if not storage.absolute(path).is_dir():
        raise UserError(f"{where}: no such folder; {USAGE}")
    try:
        source = resolve_source(path, USAGE, family=spec.name)
    except UserError as e:
        raise UserError(str(e).replace(f"--init {path}", where)) from None
    if source.kind != "checkpoint" or run_record.read(storage.as_path(source.path).parent.parent)[1]["trainer"] != "pretrain":
        raise UserError(f"{where} is not a pretraining run; {USAGE}")
    if "data.tokenizer" in explicit and init_key(config.data.tokenizer) != init_key(source.tokenizer_dir):
        raise UserError(f"--config.data.tokenizer contradicts {where}: the student reads the teacher's "
                        f"tokenizer ({source.tokenizer_dir}); drop the flag")
    if "model.size" in explicit:
        raise UserError(f"--config.model.size with {where}: the student is the teacher's shape with "
                        f"distill.student_layers layers; drop the flag")
    teacher = source.model_config()
    layers = dc.student_layers or teacher.num_layers // 2
    if not 1 <= layers <= teacher.num_layers:
        raise UserError(f"distill.student_layers={layers}: the teacher has {teacher.num_layers} layers; "
                        f"choose 1 to {teacher.num_layers}")
    student = dataclasses.replace(teacher, num_layers=layers)
    # The student's shape and tokenizer, and the teacher's step pinned for a rerun (run.json).
    return source, {"model": model_record(spec, student),
                    "data": {"tokenizer": init_key(source.tokenizer_dir)},
                    "distill": {"teacher": source.path}}


def load(config, source, mesh, base: Objective) -> Teacher:
    """The teacher on `mesh` in distill.dtype, and the student's objective (the family's `base`
    plus the teacher's terms) and first weights."""
    dc, spec = config.distill, source.spec()
    module = importlib.import_module(spec.pretrain)
    cfg = dataclasses.replace(source.model_config(), dropout=0.0, attention_dropout=0.0,
                              dtype=dc.dtype, scan_layers=False)
    model_fn = module.pretraining_model(cfg)
    loaded = load_params(source)
    params, _ = take_params(loaded, jax.eval_shape(lambda: init_params(model_fn, 0)), where := f"distill.teacher={source.init}")
    graphdef, specs = graphdef_and_specs(model_fn)
    params = jax.device_put(jax.tree.map(lambda x: np.asarray(x).astype(jnp.dtype(dc.dtype)), params),
                            shardings_of(specs, mesh))
    if jax.process_index() == 0:
        print(f"distill: teacher {spec.size_of(cfg)} ({cfg.num_layers} layers, "
              f"{shared.param_bytes(params) / 1e6:.1f} MB in {dc.dtype}) from {source.path}")

    def outputs(teacher_params, batch):
        out = module.distill_outputs(nnx.merge(graphdef, teacher_params), batch, None)
        return {"teacher_mlm": out["mlm"].astype(jnp.float32), "teacher_hidden": out["hidden"].astype(jnp.float32)}

    def initial_params(fresh):
        if not dc.init_from_teacher:
            return fresh
        return take_params(every_other_layer(unstack_layers(loaded), spec.encoder, fresh), fresh, where)[0]

    return Teacher(params, outputs, objective(base, module.distill_outputs, dc), initial_params)


def every_other_layer(teacher: dict, encoder: str, student: dict) -> dict:
    """The teacher's params with its layers thinned to the student's count: student layer i is
    teacher layer i * L_t // L_s (DistilBERT: every other one), the rest as they are."""
    theirs, ours = teacher[encoder]["layers"], unstack_layers(student)[encoder]["layers"]
    step = len(theirs) // len(ours)
    return {**teacher, encoder: {**teacher[encoder], "layers": {i: theirs[i * step] for i in range(len(ours))}}}


def objective(base: Objective, distill_outputs, dc) -> Objective:
    """The family's objective `base` plus the soft MLM and cosine terms where the batch carries
    the teacher's outputs (training); evaluation scores the family's own sums."""
    T = dc.temperature

    def sums(model, batch, key):
        if "teacher_mlm" not in batch:
            return base.sums(model, batch, key)
        out = distill_outputs(model, batch, key)
        real_BT = (batch["attention_mask"] != 0).astype(jnp.float32)
        s_BTD, t_BTD = out["hidden"].astype(jnp.float32), batch["teacher_hidden"]
        cos_BT = jnp.sum(s_BTD * t_BTD, -1) / jnp.maximum(
            jnp.linalg.norm(s_BTD, axis=-1) * jnp.linalg.norm(t_BTD, axis=-1), 1e-8)
        return {**out["sums"], "soft": shared.soft_sums(out["mlm"], batch["teacher_mlm"], batch["masked_weights"], T),
                "cos": jnp.sum((1.0 - cos_BT) * real_BT), "tokens": jnp.sum(real_BT),
                "masked": jnp.sum(batch["masked_weights"].astype(jnp.float32))}

    def normalisers(batch):
        return {**base.normalisers(batch), "masked": jnp.maximum(jnp.sum(batch["masked_weights"]), 1.0),
                "tokens": jnp.maximum(jnp.sum(batch["attention_mask"] != 0), 1).astype(jnp.float32)}

    def loss(sums, norm):
        if "soft" not in sums:
            return base.loss(sums, norm)
        return (dc.alpha_mlm * base.loss(sums, norm) + dc.alpha_soft * sums["soft"] / norm["masked"]
                + dc.alpha_cos * sums["cos"] / norm["tokens"])

    def summarize(sums, prefix):
        out = base.summarize(sums, prefix)
        if "soft" in sums:  # per masked position and per token, as the loss weighs them
            out[f"{prefix}/soft"] = float(sums["soft"]) / max(float(sums["masked"]), 1.0)
            out[f"{prefix}/cos"] = float(sums["cos"]) / max(float(sums["tokens"]), 1.0)
        return out

    return Objective(sums, normalisers, loss, summarize)
