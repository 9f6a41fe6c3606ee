"""Pretraining, top to bottom: any model family on the shared step and loop.

`train_and_evaluate(config, workdir, init)` builds the mesh, asks the family named by
`config.family` (its spec, models/family.py) for its model, objective and data, creates the sharded
train state (from random weights, or from `--init` SRC's with a fresh optimizer and step) or
restores the latest checkpoint in the workdir, then runs training/loop.py: jit-compiled steps
with explicit shardings and donated state, evaluating, logging and checkpointing as configured.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax

from data.pipeline import BatchWarmup
from models import family as families
from pretrain import distill
from training import distill as shared_distill
from training import mesh as mesh_lib
from training import storage
from training.checkpoint import Checkpointer
from training.errors import UserError
from training import run_record
from training.lease import WorkdirLease
from training.loop import evaluate_objective, restore_or_init, run
from training.optim import learning_rate_schedule, make_optimizer
from training.state import abstract_params, create_train_state, init_params, plan_state
from training.step import make_eval_step, make_train_step, microbatch_count
from training.validate import validate


def train_and_evaluate(config, workdir, init: str | None = None,
                       explicit=(), on_eval=None) -> dict[str, float]:
    """Returns the last evaluation's metrics. `init`: continue from SRC's weights (None: random);
    `explicit`: the config keys set on the command line; `on_eval(step, metrics)`: see
    training.loop.run (a search's pruning)."""
    validate(config)
    workdir = storage.check_writable(workdir, "--workdir")  # local or gs://: one line, in seconds
    data_dir = config.get("data", {}).get("data_dir", "")  # a family may read no data folder
    if storage.is_remote(data_dir):
        storage.check_writable(data_dir, "data.data_dir")
    with WorkdirLease(workdir) as lease:  # one run per workdir, before anything is written
        return _train(config, workdir, init, explicit, lease, on_eval)


def _train(config, workdir, init: str | None, explicit, lease, on_eval=None) -> dict[str, float]:
    tc = config.train
    lr = learning_rate_schedule(config.optim, tc.steps)  # checks optim.* before any work
    spec = families.of_config(config)
    setup_family = spec.setup("pretrain")

    # ---- Mesh, family (model, objective, data) ----------------------------------------------
    mesh = mesh_lib.make_mesh(config.mesh)
    mesh_lib.check_divisible(tc.batch_size, mesh, grad_accum=tc.grad_accum)
    warmup = BatchWarmup.of(tc)  # the families' train iterators take each step's rows from it
    grad_accum = tc.grad_accum
    if warmup.on:  # every size splits over the data-parallel devices; microbatches stay in memory
        mesh_lib.check_divisible(warmup.unit, mesh, "train.batch_warmup_start")
        grad_accum = functools.partial(microbatch_count, max_rows=tc.batch_size // tc.grad_accum,
                                       granule=mesh_lib.data_parallel_size(mesh))
    given = config.to_dict()  # config.json: as given; what the setup resolves goes to run.json
    teacher_source, student = distill.prepare(config, workdir, init, set(explicit))  # before anything is written
    if student:  # the family builds the student the teacher's distillation resolved
        config = run_record.view(config, student)
    family = setup_family(config, workdir, init, set(explicit))
    if init is not None and family.initial_params is None:
        family.train_batches.close()
        raise UserError(f"the {spec.name} family cannot start from --init yet; drop --init")

    # ---- Train state: restored, or created in its shardings ---------------------------------
    tx = make_optimizer(config.optim, tc.steps)
    plan = plan_state(abstract_params(family.model_fn), tx, mesh)  # the model's one abstract trace
    target, shardings, graphdef = plan.target, plan.shardings, plan.graphdef
    batch_sharding = mesh_lib.batch_sharding(mesh)
    teacher = None
    if teacher_source is not None:
        teacher = distill.load(config, teacher_source, mesh, family.objective)
        family.objective, family.initial_params = teacher.objective, teacher.initial_params
    step_fn = make_train_step(graphdef, tx, family.objective, seed=tc.seed, grad_accum=grad_accum)
    train_step = (shared_distill.jit_step(step_fn, teacher.outputs, teacher.params, shardings, batch_sharding)
                  if teacher else jax.jit(step_fn, in_shardings=(shardings, batch_sharding),
                                          out_shardings=(shardings, None), donate_argnums=0))
    eval_step = jax.jit(make_eval_step(graphdef, lambda model, batch: family.objective.sums(model, batch, None)),
                        in_shardings=(shardings["params"], batch_sharding))
    pictures = None
    if family.pictures is not None:
        picture_step = jax.jit(make_eval_step(graphdef, family.pictures),
                               in_shardings=(shardings["params"], batch_sharding))
        first = next(iter(family.eval_batches()))
        pictures = lambda params: {name: mesh_lib.to_host(x) for name, x in
                                   picture_step(params, mesh_lib.global_batch(first, mesh)).items()}

    with contextlib.closing(family.train_batches), \
            Checkpointer(workdir, config.checkpoint.every_steps, config.checkpoint.keep,
                         config.checkpoint.every_seconds, poll_every=tc.log_every) as ckpt:
        def fresh_state():
            params = None
            if family.initial_params is not None:
                params = family.initial_params(init_params(family.model_fn, tc.seed))
            return create_train_state(family.model_fn, tx, mesh, tc.seed, params=params, plan=plan)[0]

        state, start, resumed = restore_or_init(ckpt, target, fresh_state, family.train_batches)
        if jax.process_index() == 0:
            source = family.source and dataclasses.asdict(family.source)
            run_record.write(workdir, given, run_record.merged(student, family.resolved), "pretrain", source)
        outcome = run(
            config, workdir, mesh=mesh, state=state, start=start, total_steps=tc.steps,
            train_step=train_step, batches=family.train_batches, ckpt=ckpt,
            objective=family.objective, lr=lr, throughput=family.throughput,
            evaluate=lambda params, step: evaluate_objective(
                eval_step, params, family.eval_batches(), mesh, family.objective),
            eval_every=config.eval.every_steps, eval_at_start=True, pictures=pictures,
            window_state=resumed.get("log_window"), lease=lease, desc="pretrain", on_eval=on_eval)
    return outcome.last_eval


def search_trainer(init: str | None, explicit=(), train_fn=train_and_evaluate):
    """What `--search N` (training/search.py) needs to pretrain: each trial a pretraining run,
    scored and pruned by its eval loss (every family logs one)."""
    from training.search import Trainer
    seen = {}

    def train(cfg, run_dir, on_eval):
        def watch(step, metrics):
            seen["step"] = step
            on_eval(step, metrics)
        seen.clear()
        last_eval = train_fn(cfg, run_dir, init, explicit, on_eval=watch)
        # The loop evaluates at the last step; a run stopped before it returns early.
        return last_eval if seen.get("step") == cfg.train.steps else None

    return Trainer(train=train, score=lambda last_eval: (last_eval["eval/loss"], last_eval),
                   metric="eval/loss", direction="minimize")
