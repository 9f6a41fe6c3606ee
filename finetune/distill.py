"""Task distillation: a fine-tuned teacher's soft targets supervise the student (Hinton et al. 2015).

`method.distill_from` names the teacher: one of our fine-tuning workdirs (its latest checkpoint,
or `WORKDIR/best`, or one `checkpoints/<step>` folder) or a HuggingFace `...ForSequenceClassification`
folder. The student's loss is

    alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(hard labels)

The teacher runs beside the student in the same jit-compiled step, outside the train state
(training/distill.py). run.json pins the teacher's checkpoint folder; a rerun reloads it from there.

Everything a teacher can get wrong (a missing folder, another task or label set, another
tokenizer) is checked here before the family's setup writes anything to the workdir.
"""

from __future__ import annotations

import dataclasses
import importlib
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from finetune import tasks
from training import distill as shared
from training import storage
from training.errors import UserError
from training.init_source import load_params, load_tokenizer, resolve_source, take_params
from training.mesh import shardings_of
from training.state import graphdef_and_specs, init_params
from training.step import Objective

USAGE = ("pass a fine-tuning workdir (or its best/ folder, or one of its checkpoints/<step> folders) "
         "or a HuggingFace ...ForSequenceClassification folder")
PROBE = "Distillation: the Teacher's tokens, ünïcode and 1,234 numbers."


@dataclasses.dataclass
class Teacher:
    """A loaded teacher: its params on the mesh (outside the train state) and what results.json says."""
    graphdef: object
    params: dict
    predict: object
    record: dict


# ---------------------------------------------------------------------------------------------
# Where the teacher comes from, checked before anything is written
# ---------------------------------------------------------------------------------------------

def teacher_source(config, workdir, init: str):
    """The teacher's Source (None without method.distill_from), its labels and its tokenizer
    checked against the student's. A rerun reads the teacher from the folder run.json pinned."""
    given = config.method.distill_from
    if not given:
        return None
    where = f"method.distill_from={given}"
    pinned = shared.pinned(workdir, "method.distill_from", given)
    if not storage.absolute(pinned or given).is_dir():
        raise UserError(f"{where}: no such folder; {USAGE}")
    try:
        source = resolve_source(pinned or given, USAGE)
    except UserError as e:
        raise UserError(str(e).replace(f"--init {pinned or given}", where)) from None
    if source.kind == "none":
        raise UserError(f"{where}: {USAGE}")
    if config.method.get("mixup_alpha") or config.method.get("cutmix_alpha"):
        raise UserError("method.distill_from with mixup or cutmix: the teacher sees the unmixed "
                        "batch; set method.mixup_alpha=0 and method.cutmix_alpha=0")
    _check_labels(config, source, where)
    if source.spec().tokenizer != "none":
        _check_tokenizer(config, workdir, init, source, where)
    return source


def _check_labels(config, source, where: str) -> None:
    """Same task (our workdirs) or the same labels in the same order (HuggingFace's id2label)."""
    task = config.data.task
    if source.kind == "checkpoint":
        from training import run_record
        run_dir = storage.as_path(source.path).parent.parent
        teacher_config, record = run_record.read(run_dir)
        if record["trainer"] != "finetune":
            raise UserError(f"{where} is a pretraining run; the teacher must be fine-tuned on {task}")
        theirs = teacher_config.get("data", {}).get("task")
        if theirs != task:
            raise UserError(f"{where} was fine-tuned on {theirs}, the student on {task}: the "
                            f"teacher's label set must be the student's")
        return
    if not (source.architecture or "").endswith("ForSequenceClassification"):
        raise UserError(f"{where} holds a {source.architecture}, not a sequence classifier; {USAGE}")
    hf = json.loads((storage.as_path(source.path) / "config.json").read_text())
    labels = [hf["id2label"][k] for k in sorted(hf.get("id2label") or {}, key=int)]
    from data.tasks import load_task
    from data.wheels import DataError
    try:
        tfds = [task] if task.startswith("glue/") else []
        ours = load_task(task, storage.local_data_dir(config.data.data_dir, tfds)).label_names or ["score"]
    except DataError as e:
        raise UserError(str(e)) from None
    generic = all(label == f"LABEL_{i}" for i, label in enumerate(labels))
    if len(labels) != len(ours) or not (generic or labels == ours):
        raise UserError(f"{where} predicts labels {labels}, the student's {task} has {ours}: the "
                        f"teacher's label set must be the student's")


def _check_tokenizer(config, workdir, init: str, source, where: str) -> None:
    """The teacher's soft targets are per example, so both must read the same tokens."""
    saved = storage.as_path(workdir) / "tokenizer"
    student = (saved if (saved / "tokenizer.json").is_file() else
               (resolve_source(init).tokenizer_dir if init != "none" else None) or config.data.tokenizer)
    if not student:
        raise UserError(f"{where} with --init none: the student needs the teacher's tokenizer; add "
                        f"--config.data.tokenizer={source.tokenizer_dir}")
    ours, theirs = load_tokenizer(student), load_tokenizer(source.tokenizer_dir)
    same = ours.vocab_size == theirs.vocab_size and ours.encode(PROBE) == theirs.encode(PROBE) and all(
        ours.id_to_token(i) == theirs.id_to_token(i) for i in range(ours.vocab_size))
    if not same:
        raise UserError(f"{where} has another tokenizer ({theirs.vocab_size} tokens, "
                        f"{source.tokenizer_dir}) than the student ({ours.vocab_size} tokens, {student}); "
                        f"distill into a student with the teacher's tokenizer")


# ---------------------------------------------------------------------------------------------
# The teacher on the mesh, and the step that runs it
# ---------------------------------------------------------------------------------------------

def load_teacher(config, source, num_outputs: int, mesh) -> Teacher:
    """The teacher's classifier from its family's finetune module (`teacher_model`), its weights
    shape-checked, cast to method.distill_dtype and sharded like the student's on `mesh`."""
    spec = source.spec()
    module = importlib.import_module(spec.finetune)
    if not hasattr(module, "teacher_model"):
        raise UserError(f"method.distill_from: a {spec.name} teacher is not supported yet")
    dtype = config.method.distill_dtype
    teacher_config = {}
    if source.kind == "checkpoint":
        from training import run_record
        teacher_config = run_record.read(storage.as_path(source.path).parent.parent)[0]
    model_fn = module.teacher_model(source.model_config(), teacher_config.get("model", {}), num_outputs, dtype)
    loaded = load_params(source, architecture=source.architecture)
    shapes = jax.eval_shape(lambda: init_params(model_fn, 0))
    params, _ = take_params(loaded, shapes, f"method.distill_from={source.init}")
    graphdef, specs = graphdef_and_specs(model_fn)
    cast = jnp.dtype(dtype)
    params = jax.device_put(jax.tree.map(lambda x: np.asarray(x).astype(cast), params),
                            shardings_of(specs, mesh))
    record = {"teacher": source.path, "teacher_kind": source.kind, "teacher_family": spec.name,
              "teacher_size": spec.size_of(source.model_config()), "teacher_step": source.step,
              "temperature": config.method.distill_temperature, "alpha": config.method.distill_alpha,
              "teacher_dtype": dtype, "teacher_bytes": shared.param_bytes(params)}
    return Teacher(graphdef, params, module.predict, record)


def teacher_logits(teacher: Teacher):
    """The batch entries the student's objective reads: the teacher's logits (training/distill.py)."""
    return lambda params, batch: {"teacher_logits": teacher.predict(
        nnx.merge(teacher.graphdef, params), batch, None).astype(jnp.float32)}


# ---------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------

def objective(task, predict, label_smoothing: float, temperature: float, alpha: float) -> Objective:
    """finetune/tasks.py's objective on the hard labels, mixed with the teacher's soft targets
    where the batch carries them (training); for regression the soft term is the squared
    distance to the teacher's score."""
    base = tasks.objective(task, predict, label_smoothing)

    def sums(model, batch, key):
        if "teacher_logits" not in batch:  # evaluation: the task's own loss
            return base.sums(model, batch, key)
        logits = predict(model, batch, key)
        hard = tasks.loss_sums(logits, batch["labels"], batch["weights"], regression=task.regression,
                               label_smoothing=label_smoothing)
        if task.regression:
            kd = jnp.sum((logits[:, 0] - batch["teacher_logits"][:, 0]) ** 2 * batch["weights"])
        else:
            kd = shared.soft_sums(logits, batch["teacher_logits"], batch["weights"], temperature)
        return {**hard, "loss": alpha * kd + (1.0 - alpha) * hard["loss"], "ce": hard["loss"], "kd": kd}

    def summarize(sums, prefix):
        out = base.summarize(sums, prefix)
        count = max(float(sums["count"]), 1.0)
        out.update({f"{prefix}/{name}": float(sums[name]) / count for name in ("ce", "kd") if name in sums})
        return out

    return Objective(sums, base.normalisers, base.loss, summarize)
