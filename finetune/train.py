"""Fine-tuning, top to bottom: any model family's encoder on a labelled task, on the shared loop.

`train_and_evaluate(config, workdir, init)` asks the family named by `config.family`
(its spec, models/family.py) for the task's data, the model (the source's encoder and a fresh head)
and where the encoder comes from, then trains with the method in `config.method` (full
fine-tuning, frozen encoder or bottom layers, L2-SP, layer-wise LR decay, label smoothing,
magnitude and head pruning from training/pruning.py) on training/loop.py. A pruned run picks its
best dev checkpoint only once the final sparsity is reached. It evaluates on dev every epoch, keeps the best dev checkpoint in `best/`, and
at the end scores that checkpoint on dev and test into `results.json` and
`predictions_<split>.tsv` (a token task: `predictions_<split>.conll`). A stopped run (SIGTERM,
Ctrl-C) saves and resumes bitwise on rerun.

Frozen parameters get zero updates (training/optim.py) and the step passes them through
untouched (training/step.py): they stay bitwise equal to the source.
"""

from __future__ import annotations

import contextlib
import json
import math
import jax
import numpy as np
from flax import nnx

from data import labelled
from finetune import distill, quantize, tasks
from models import family as families
from finetune.methods import frozen_mask, l2sp_penalty, layer_scales
from models.layers import is_stacked
from training import distill as shared_distill
from training import mesh as mesh_lib
from training import pruning
from training import storage
from training.checkpoint import Checkpointer
from training import run_record
from training.lease import WorkdirLease
from training.errors import UserError
from training.loop import Throughput, restore_or_init, run
from training.optim import learning_rate_schedule, make_optimizer
from training.state import abstract_params, create_train_state, init_params, plan_state
from training.step import make_eval_step, make_train_step
from training.validate import validate


def train_and_evaluate(config, workdir, init: str = "none", explicit=(), on_eval=None) -> dict | None:
    """Fine-tune per `config`; returns the results (as in results.json), or None if stopped.

    `explicit`: the config keys the user set on the command line; with a source, those that
    contradict its encoder or tokenizer are refused. `on_eval(step, dev metrics)`: see
    training.loop.run (a search's pruning)."""
    validate(config)
    workdir = storage.check_writable(workdir, "--workdir")  # local or gs://: one line, in seconds
    with WorkdirLease(workdir) as lease:  # one run per workdir (best/ too), before anything is written
        return _train(config, workdir, init, explicit, lease, on_eval)


def _train(config, workdir, init: str, explicit, lease, on_eval=None) -> dict | None:
    tc, method = config.train, config.method
    try:
        task = tasks.get_task(config.data.task)
    except KeyError as e:
        raise UserError(e.args[0]) from None
    if task.kind in (tasks.REGRESSION, tasks.SPAN) and method.label_smoothing:
        raise UserError(f"method.label_smoothing={method.label_smoothing} applies to classification; "
                        f"{task.name} is a {task.kind} task")

    # ---- Family: data, model, source ---------------------------------------------------------
    given = config.to_dict()  # config.json: as given; what the setup resolves goes to run.json
    teacher_source = distill.teacher_source(config, workdir, init)  # checked before anything is written
    family = families.of_config(config).setup("finetune")(config, workdir, init, set(explicit))
    mesh = mesh_lib.make_mesh(config.mesh)
    mesh_lib.check_divisible(tc.batch_size, mesh, grad_accum=tc.grad_accum)
    eval_batch = config.eval.batch_size or tc.batch_size
    mesh_lib.check_divisible(eval_batch, mesh, "eval.batch_size")
    steps_per_epoch = max(1, len(family.splits["train"]) // tc.batch_size)
    total = tc.steps or max(1, math.ceil(tc.epochs * steps_per_epoch))
    eval_every = config.eval.every_steps or steps_per_epoch

    # ---- Method, optimizer, steps ------------------------------------------------------------
    # the model's one abstract trace; with method.quantize the step runs its QAT graph
    abstract = abstract_params(family.model_fn, quantize.qat_transform(method))
    shapes = abstract.params
    if is_stacked(shapes) and (method.freeze_bottom >= 0 or method.layer_decay != 1.0):
        raise UserError("method.freeze_bottom and method.layer_decay treat each layer on its own, "
                        "which a scanned stack's stacked weights cannot; set "
                        "model.scan_layers=false (the source's weights are converted)")
    if method.freeze_bottom > family.num_layers:
        raise UserError(f"method.freeze_bottom={method.freeze_bottom} but the encoder has "
                        f"{family.num_layers} layers")
    frozen = frozen_mask(shapes, method, family.depth, family.fixed)
    scales = (layer_scales(shapes, method.layer_decay, family.num_layers, family.depth)
              if method.layer_decay != 1.0 else None)
    tx = make_optimizer(config.optim, total, frozen=frozen, scales=scales)
    plan = plan_state(abstract, tx, mesh)
    target, shardings, graphdef = dict(plan.target), dict(plan.shardings), plan.graphdef  # copies: L2-SP adds its anchor
    penalties = {}
    if method.l2sp_alpha > 0:  # the anchor w0 lives in the state, so a resumed run keeps it
        target["anchor"], shardings["anchor"] = target["params"]["encoder"], shardings["params"]["encoder"]
        penalties["l2sp"] = l2sp_penalty(method.l2sp_alpha, frozen)
    prune = pruning.pruner(method, abstract.specs, total)
    if prune is not None:  # the masks live in the state, so a resumed run keeps them
        shardings["masks"] = prune.mask_shardings(shardings["params"])
        target["masks"] = {k: jax.ShapeDtypeStruct(m.shape, bool, sharding=shardings["masks"][k])
                           for k, m in prune.init_masks(shapes).items()}
    kind = tasks.kind_module(task)  # None: one label per example
    objective = (kind or tasks).objective(task, family.predict, method.label_smoothing, family.mix)
    teacher = None
    if teacher_source is not None:
        teacher = distill.load_teacher(config, teacher_source, len(family.label_names or [0]), mesh)
        objective = distill.objective(task, family.predict, method.label_smoothing,
                                      method.distill_temperature, method.distill_alpha)
        # run.json pins the teacher's checkpoint for a rerun
        family.resolved.setdefault("method", {})["distill_from"] = teacher_source.path
    batch_sharding = mesh_lib.batch_sharding(mesh)
    step_fn = make_train_step(graphdef, tx, objective, seed=tc.seed, grad_accum=tc.grad_accum,
                              frozen=frozen, penalties=penalties, pruner=prune)
    train_step = (shared_distill.jit_step(step_fn, distill.teacher_logits(teacher), teacher.params, shardings,
                                          batch_sharding) if teacher else
                  jax.jit(step_fn, in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None),
                          donate_argnums=0))
    predict_step = jax.jit(make_eval_step(graphdef, lambda model, batch: family.predict(model, batch, None)),
                           in_shardings=(shardings["params"], batch_sharding))
    share = dict(process_index=jax.process_index(), process_count=jax.process_count())

    def predict(params, split: str, step=predict_step) -> np.ndarray:
        n = len(family.splits[split])
        encode = lambda rows, positions: family.encode(split, rows, positions)
        outputs = [mesh_lib.to_host(step(params, mesh_lib.global_batch(b, mesh)))
                   for b in labelled.eval_batches(n, encode, eval_batch, **share)]
        return np.concatenate(outputs)[:n]

    def score(params, split: str, step=predict_step) -> tuple[dict[str, float], object]:
        """The split's metrics ({} where its labels are hidden) and its predictions."""
        logits = predict(params, split, step)
        if family.score is not None:
            return family.score(split, logits)
        data = family.splits[split]
        if not data.labelled:
            return {}, task.predictions(logits)
        labels = np.asarray(data.labels, np.float32 if task.regression else np.int64)
        return {**task.evaluate(labels, task.predictions(logits)),
                "loss": tasks.mean_loss(task, logits, labels)}, task.predictions(logits)

    # ---- Train state, then the loop ------------------------------------------------------------
    train_batches = labelled.train_iterator(
        len(family.splits["train"]), lambda rows, positions: family.encode("train", rows, positions), tc.batch_size,
        seed=tc.seed, **share)

    def fresh_state():
        params = family.initial_params(init_params(family.model_fn, tc.seed))  # a fresh head
        state = create_train_state(family.model_fn, tx, mesh, tc.seed, params=params, plan=plan)[0]
        if "anchor" in target:
            state["anchor"] = jax.device_put(params["encoder"], shardings["anchor"])
        if prune is not None:
            state["masks"] = jax.device_put(prune.init_masks(shapes), shardings["masks"])
        return state

    with contextlib.closing(train_batches), \
            Checkpointer(workdir, config.checkpoint.every_steps, config.checkpoint.keep,
                         config.checkpoint.every_seconds, poll_every=tc.log_every) as ckpt, \
            Checkpointer(workdir / "best", 0, 1) as best_ckpt:
        state, start, resumed = restore_or_init(ckpt, target, fresh_state, train_batches)
        progress = {"best_step": resumed.get("best_step"), "best": resumed.get("best")}
        if jax.process_index() == 0:  # only now: a run refused above leaves no trace to resume
            # best/ is a run folder of its own: `--init WORKDIR/best` and `python -m models.hf
            # export --checkpoint WORKDIR/best` read the best dev checkpoint with its config.
            for folder in (workdir, workdir / "best"):
                run_record.write(folder, given, family.resolved, "finetune", family.source)
            family.save_assets(workdir / "best")

        def evaluate(params, step: int) -> dict[str, float]:
            dev, _ = score(params, "dev")
            final = prune is None or step >= prune.end  # best dev only at the final sparsity
            if final and _better(dev[task.primary], progress["best"] and progress["best"][task.primary]):
                progress["best_step"], progress["best"] = step, dev
                best_ckpt.maybe_save(step, {"params": params}, {"dev": dev}, force=True)
            return {f"dev/{k}": v for k, v in dev.items()}

        outcome = run(config, workdir, mesh=mesh, state=state, start=start, total_steps=total,
                      train_step=train_step, batches=train_batches, ckpt=ckpt, objective=objective,
                      evaluate=evaluate, lr=learning_rate_schedule(config.optim, total),
                      throughput=Throughput(tc.batch_size, "examples"), eval_every=eval_every,
                      save_at_eval=True, steps_per_epoch=steps_per_epoch,
                      data_state=lambda: dict(progress), window_state=resumed.get("log_window"),
                      lease=lease, desc=f"finetune {task.name}", on_eval=on_eval)
        if outcome.stopped:
            return None

        # ---- The best dev checkpoint on dev and test -------------------------------------------
        best_step = progress["best_step"]
        if best_step is None:
            raise UserError(f"dev {task.primary} was never finite; no checkpoint to report")
        params = best_ckpt.restore(best_step, {"params": target["params"]})[0]["params"]
    results = {"task": task.name, "metric": task.primary, "best_step": best_step,
               "best_epoch": best_step / steps_per_epoch, "steps": total,
               "steps_per_epoch": steps_per_epoch}
    with jax.set_mesh(mesh), mesh_lib.logical_rules():
        for split in [s for s in family.splits if s != "train"]:
            scores, predictions = score(params, split)
            results[split] = scores or None  # None: labels hidden (GLUE test)
            if jax.process_index() == 0 and family.write_predictions is not None:
                family.write_predictions(workdir, split, predictions)
            elif jax.process_index() == 0:
                _write_predictions(workdir / f"predictions_{split}.tsv", family.splits[split], task,
                                   family.label_names, predictions)
        if qtype := quantize.qtype(method):  # the int8 weights, scored by the same eval
            qparams, results["quantized"] = quantize.post_training(abstract.model, params, qtype)
            # the float graph scores the int8 weights: the step's, unless it trained QAT's
            float_step = predict_step if quantize.qat_transform(method) is None else jax.jit(
                make_eval_step(nnx.graphdef(abstract.model), lambda model, batch: family.predict(model, batch, None)),
                in_shardings=(shardings["params"], batch_sharding))
            for split in [s for s in family.splits if s != "train"]:
                results["quantized"][split] = score(qparams, split, float_step)[0] or None
    results["examples"] = {name: len(s) for name, s in family.splits.items()}
    results.update(family.results)
    if prune is not None:
        results["pruning"] = {**prune.record(), **pruning.report(prune.axes, jax.tree.map(mesh_lib.to_host, params))}
    if teacher is not None:
        results["distill"] = {**teacher.record, "student_bytes": shared_distill.param_bytes(params)}
    results["config"] = run_record.merged(given, family.resolved)
    if jax.process_index() == 0:
        (workdir / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    summary = ", ".join(f"{split}/{task.primary}={results[split][task.primary]:.4f}"
                        for split in ("dev", "test") if results.get(split))
    print(f"best dev checkpoint: step {best_step}; {summary}; see {workdir / 'results.json'}")
    return results


def _better(value: float, best: float | None) -> bool:
    return math.isfinite(value) and (best is None or value > best)


def _write_predictions(path, split, task: tasks.Task, label_names, predictions) -> None:
    """index, prediction (label name or score) and label (empty where hidden), one row each."""
    lines = ["index\tprediction\tlabel"]
    name = (lambda v: f"{float(v):.9g}") if task.regression else (lambda v: label_names[int(v)])
    for i, p, y in zip(split.index, predictions, split.labels):
        lines.append(f"{int(i)}\t{name(p)}\t{name(y) if y >= 0 else ''}")
    path.write_text("\n".join(lines) + "\n")
