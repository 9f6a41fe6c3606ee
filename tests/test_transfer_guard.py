"""No hidden host<->device copies in the loop: real train steps, and the whole pretraining loop
(logging, evaluation, checkpoints, a resume mid-window), under jax.transfer_guard("disallow").

Explicit copies (jax.device_put, jax.device_get, make_array_from_process_local_data) are
allowed; an implicit one (a numpy array fed to a jitted function, float() of a device array)
raises, which is what this test looks for."""

import json

import jax
import numpy as np
from flax.core import spmd

from conftest import random_batch, tiny_config, tiny_flags
from pretrain.__main__ import main as pretrain
from pretrain.bert import objective
from test_train_step import mesh_of, model_fn
from training import loop, mesh as mesh_lib
from training.optim import make_optimizer
from training.state import create_train_state
from training.step import make_train_step


def test_train_steps_make_no_implicit_transfers():
    mesh = mesh_of((2, 2, 2))
    tx = make_optimizer(tiny_config().optim, 10)
    state, shardings, graphdef = create_train_state(model_fn(0.1), tx, mesh, seed=0)
    step = jax.jit(make_train_step(graphdef, tx, objective(), seed=0, grad_accum=2),
                   in_shardings=(shardings, mesh_lib.batch_sharding(mesh)),
                   out_shardings=(shardings, None), donate_argnums=0)
    rng = np.random.default_rng(0)
    with jax.set_mesh(mesh), spmd.logical_axis_rules(mesh_lib.RULES), jax.transfer_guard("disallow"):
        for _ in range(3):
            state, out = step(state, mesh_lib.global_batch(random_batch(rng, 16, 16, 256, 4), mesh))
        loss = jax.device_get(out["sums"]["mlm_loss"])
    assert np.isfinite(loss) and int(jax.device_get(state["step"])) == 3


def test_pretraining_loop_makes_no_implicit_transfers(tmp_path, data_dir, monkeypatch):
    """Setup (data, state creation, restore) may copy; the loop itself may not."""
    def guarded(*args, **kwargs):
        with jax.transfer_guard("disallow"):
            return run(*args, **kwargs)
    run = loop.run
    monkeypatch.setattr("pretrain.train.run", guarded)
    workdir = tmp_path / "run"
    # Logs at steps 2 and 3, evaluates at 0 and 2, checkpoints at 3, all under the guard.
    pretrain(["--workdir", str(workdir), *tiny_flags(data_dir, train__steps=3, train__log_every=2,
                                                      eval__every_steps=2)])
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [2, 3]
    assert [r["step"] for r in rows if "eval/loss" in r] == [0, 2, 3]
    assert (workdir / "checkpoints" / "3").is_dir()


def test_a_log_window_resumed_from_a_checkpoint_adds_on_device():
    """A run stopped mid-window resumes with the window's sums from the checkpoint's JSON."""
    window = loop.LogWindow(start_step=4)
    window.restore({"steps": 1, "sums": {"loss": 2.5}})
    with jax.transfer_guard("disallow"):
        window.add(5, {"loss": jax.device_put(np.float32(1.0))})
        host, steps, _ = window.take()
    assert (float(host["loss"]), steps) == (3.5, 2)
