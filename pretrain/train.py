"""BERT pretraining (MLM + NSP): the loop, top to bottom.

`train_and_evaluate(config, workdir)` builds the mesh, the data, the sharded train state (or
restores the latest checkpoint in the workdir), then runs jit-compiled steps with explicit
shardings and donated state, evaluating, logging and checkpointing as configured.
"""

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from flax.core import spmd
from tqdm import tqdm

from data.pretraining import PretrainingData
from models.bert import BertConfig, BertForPreTraining
from pretrain import objectives
from pretrain.prepare import prepare
from training import mesh as mesh_lib
from training.checkpoint import Checkpointer
from training.config import save_config
from training.errors import UserError
from training.loop import LogWindow
from training.metrics import MetricsWriter
from training.optim import learning_rate_schedule, make_optimizer
from training.preemption import StopRequest
from training.perf import peak_flops_per_device
from training.state import abstract_state, create_train_state


# ---------------------------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------------------------

def make_train_step(graphdef, tx, *, seed: int, grad_accum: int, nsp_weight: float = 1.0):
    """One optimizer update over the global batch, split into `grad_accum` microbatches.

    Each microbatch's loss is normalised by the *global* prediction counts, so the summed
    gradient equals the full-batch gradient. Dropout keys derive from (seed, step, microbatch).
    """

    def loss_fn(params, micro, norm, key):
        model = nnx.merge(graphdef, params)
        mlm_BPV, nsp_BC = model(micro["input_ids"], micro["token_type_ids"], micro["attention_mask"],
                                micro["masked_positions"], key=key)
        sums = objectives.mlm_nsp_sums(mlm_BPV, nsp_BC, micro)
        return objectives.total_loss(sums, norm, nsp_weight), sums

    grad_fn = jax.grad(loss_fn, has_aux=True)

    def train_step(state, batch):
        key = jax.random.fold_in(jax.random.key(seed), state["step"])
        norm = objectives.normalisers(batch)
        # Microbatch i takes rows i, i+A, i+2A...: every device keeps its own rows, no shuffle.
        micro = jax.tree.map(lambda x: x.reshape(-1, grad_accum, *x.shape[1:]).swapaxes(0, 1), batch)

        def accumulate(carry, i):
            grads, sums = carry
            mb = jax.tree.map(lambda x: x[i], micro)
            g, s = grad_fn(state["params"], mb, norm, jax.random.fold_in(key, i))
            return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, sums, s)), None

        zeros = jax.tree.map(jnp.zeros_like, state["params"])
        zero_sums = {k: jnp.zeros((), jnp.float32) for k in objectives.SUM_KEYS}
        (grads, sums), _ = jax.lax.scan(accumulate, (zeros, zero_sums), jnp.arange(grad_accum))
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new_state = {"params": optax.apply_updates(state["params"], updates),
                     "opt_state": opt_state, "step": state["step"] + 1}
        return new_state, {**sums, "grad_norm": optax.tree.norm(grads)}

    return train_step


def make_eval_step(graphdef):
    def eval_step(params, batch):
        model = nnx.merge(graphdef, params)
        mlm_BPV, nsp_BC = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
                                batch["masked_positions"])
        return objectives.mlm_nsp_sums(mlm_BPV, nsp_BC, batch)

    return eval_step


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

def train_and_evaluate(config, workdir: str | Path) -> dict[str, float]:
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tc = config.train
    lr = learning_rate_schedule(config.optim, tc.steps)  # checks optim.* before any work

    # ---- Mesh and data ----------------------------------------------------------------------
    mesh = mesh_lib.make_mesh(config.mesh)
    mesh_lib.check_divisible(tc.batch_size, mesh, grad_accum=tc.grad_accum)
    dc = config.data
    corpus = PretrainingData(prepare(dc))  # prepares the data once, then reuses it
    if jax.process_index() == 0:
        corpus.tokenizer.save(workdir / "tokenizer")
    nsp_weight = 0.0 if dc.objective == "mlm_packed" else 1.0  # packed rows have no sentence pair
    multiprocess = jax.process_count() > 1
    batch_kwargs = dict(seed=tc.seed, max_predictions=dc.max_predictions, mask_prob=dc.mask_prob,
                        whole_word=dc.whole_word, process_index=jax.process_index(),
                        process_count=jax.process_count())

    # ---- Model and train state --------------------------------------------------------------
    with config.unlocked():
        # Round the vocabulary up to a multiple of 128: it shards over `tensor` and tiles well.
        config.model.vocab_size = -(-corpus.tokenizer.vocab_size // 128) * 128
    model_cfg = BertConfig.from_model_config(config.model)
    model_fn = lambda rngs: BertForPreTraining(model_cfg, rngs)
    tx = make_optimizer(config.optim, tc.steps)
    target, shardings, graphdef = abstract_state(model_fn, tx, mesh)
    ckpt = Checkpointer(workdir, config.checkpoint.every_steps, config.checkpoint.keep,
                        config.checkpoint.every_seconds, poll_every=tc.log_every)
    start = ckpt.latest_step()
    train_batches = corpus.train_iterator(tc.batch_size, workers=dc.workers, prefetch=dc.prefetch,
                                          **batch_kwargs)
    if start is None:
        state, _, _ = create_train_state(model_fn, tx, mesh, tc.seed)
        start = 0
    else:
        state, data_state = ckpt.restore(start, target)
        train_batches.set_state(data_state["iterator"])  # grain's JSON state: the exact position
    if jax.process_index() == 0:
        save_config(config, workdir / "config.json")

    batch_sharding = mesh_lib.batch_sharding(mesh)
    train_step = jax.jit(make_train_step(graphdef, tx, seed=tc.seed, grad_accum=tc.grad_accum,
                                         nsp_weight=nsp_weight),
                         in_shardings=(shardings, batch_sharding),
                         out_shardings=(shardings, None), donate_argnums=0)
    eval_step = jax.jit(make_eval_step(graphdef), in_shardings=(shardings["params"], batch_sharding))

    def evaluate(params) -> dict[str, float]:
        totals = None
        for local in corpus.eval_batches(tc.batch_size, config.eval.max_batches, **batch_kwargs):
            sums = eval_step(params, mesh_lib.global_batch(local, mesh))
            totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
            if multiprocess:
                jax.block_until_ready(totals)  # see training.loop.LogWindow
        return objectives.summarize(jax.device_get(totals), "eval", nsp_weight) if totals else {}

    # ---- Loop -------------------------------------------------------------------------------
    metrics = MetricsWriter(workdir, config.wandb.project, config=config.to_dict(), after_step=start)
    flops = objectives.bert_train_flops(model_cfg, tc.batch_size, dc.max_seq_len, dc.max_predictions)
    peak = peak_flops_per_device(config.perf.peak_tflops) * jax.device_count()
    tokens_per_step = tc.batch_size * dc.max_seq_len
    stop = StopRequest()  # SIGTERM / Ctrl-C: every process stops at the same step, saves, exits
    bar = tqdm(total=tc.steps, initial=start, disable=jax.process_index() != 0, unit="step",
               dynamic_ncols=True, desc="pretrain")
    window = LogWindow(start)  # losses average over it; throughput leaves out compiles and evals
    final_eval = {}
    step = start
    stopping = False
    try:
        with jax.set_mesh(mesh), spmd.logical_axis_rules(mesh_lib.RULES):
            if start == 0:  # where training starts from, for comparison
                metrics.write(0, evaluate(state["params"]))
            while step < tc.steps and not stopping:
                local = next(train_batches)
                state, sums = train_step(state, mesh_lib.global_batch(local, mesh))
                step += 1
                window.add(step, sums)
                stopping = stop.should_stop(step)
                bar.update(1)

                if step % tc.log_every == 0 or step == tc.steps:
                    host, window_steps, steps_per_sec = window.take()
                    out = objectives.summarize(host, "train", nsp_weight)
                    if not math.isfinite(out["train/loss"]):
                        raise UserError(f"loss became {out['train/loss']} by step {step}; lower "
                                        f"optim.lr or raise optim.warmup_steps, then rerun to "
                                        f"resume from the last good checkpoint")
                    out["train/grad_norm"] = float(host["grad_norm"]) / window_steps
                    out["train/lr"] = float(lr(step - 1))
                    if steps_per_sec:
                        out["perf/steps_per_sec"] = steps_per_sec
                        out["perf/tokens_per_sec"] = steps_per_sec * tokens_per_step
                        if peak:
                            out["perf/mfu"] = steps_per_sec * flops / peak
                    metrics.write(step, out)
                    bar.set_postfix(loss=f"{out['train/loss']:.3f}",
                                    tok_s=f"{out.get('perf/tokens_per_sec', 0):.0f}", refresh=False)

                if step % config.eval.every_steps == 0 or step == tc.steps:
                    final_eval = evaluate(state["params"])
                    metrics.write(step, final_eval)
                    if jax.process_index() == 0:  # tqdm.write prints even when the bar is disabled
                        bar.write(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in final_eval.items()))
                    window.restart_timer()

                ckpt.maybe_save(step, state, {"iterator": train_batches.get_state()},
                                force=step == tc.steps or stopping)
    finally:
        stop.restore()
        train_batches.close()
        bar.close()
        ckpt.wait()
        ckpt.close()
        metrics.close()
    if stopping and step < tc.steps:
        print(f"{stop.reason}: stopped at step {step}, checkpoint saved in {ckpt.directory}; "
              f"run the same command again to resume")
    return final_eval
