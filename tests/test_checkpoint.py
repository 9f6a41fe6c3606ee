"""Orbax checkpoints restore into other mesh shapes and give the identical next step."""

import jax
import numpy as np
import pytest
from flax.core import spmd

from conftest import random_batch, tiny_config
from pretrain.bert import objective
from test_train_step import PREDS, SEQ, VOCAB, mesh_of, model_fn
from training import mesh as mesh_lib
from training.checkpoint import Checkpointer
from training.checkpoint_reader import read_params
from training.optim import make_optimizer
from training.state import abstract_state, create_train_state
from training.step import make_train_step


def next_step_loss(state, shardings, graphdef, tx, mesh, batch):
    step = jax.jit(make_train_step(graphdef, tx, objective(), seed=0, grad_accum=1),
                   in_shardings=(shardings, mesh_lib.batch_sharding(mesh)), out_shardings=(shardings, None))
    with jax.set_mesh(mesh), spmd.logical_axis_rules(mesh_lib.RULES):
        sums = step(state, mesh_lib.global_batch(batch, mesh))[1]["sums"]
    return float(sums["mlm_loss"] / sums["mlm_count"] + sums["nsp_loss"] / sums["nsp_count"])


@pytest.fixture(scope="module")
def saved_on_2_2_2(tmp_path_factory):
    """A state trained 2 steps on mesh (2,2,2) and saved; the loss of its third step there."""
    workdir = tmp_path_factory.mktemp("ckpt")
    tx = make_optimizer(tiny_config().optim, 10)
    mesh = mesh_of((2, 2, 2))
    rng = np.random.default_rng(0)
    batches = [random_batch(rng, 16, SEQ, VOCAB, PREDS) for _ in range(3)]
    state, shardings, graphdef = create_train_state(model_fn(), tx, mesh, seed=0)
    step = jax.jit(make_train_step(graphdef, tx, objective(), seed=0, grad_accum=1),
                   in_shardings=(shardings, mesh_lib.batch_sharding(mesh)), out_shardings=(shardings, None))
    with jax.set_mesh(mesh), spmd.logical_axis_rules(mesh_lib.RULES):
        for b in batches[:2]:
            state, _ = step(state, mesh_lib.global_batch(b, mesh))
    ckpt = Checkpointer(workdir, every_steps=2, keep=1)
    assert ckpt.maybe_save(2, state, {"next_step": 2})
    ckpt.wait()
    ckpt.close()
    loss = next_step_loss(state, shardings, graphdef, tx, mesh, batches[2])
    return workdir, batches[2], loss, jax.device_get(state["params"])


@pytest.mark.parametrize("shape", [(2, 2, 2), (8, 1, 1), (1, 1, 1)])
def test_restore_on_another_mesh_gives_the_same_next_step(shape, saved_on_2_2_2):
    workdir, batch, expected_loss, _ = saved_on_2_2_2
    tx = make_optimizer(tiny_config().optim, 10)
    mesh = mesh_of(shape)
    target, shardings, graphdef = abstract_state(model_fn(), tx, mesh)
    ckpt = Checkpointer(workdir, every_steps=2, keep=1)
    assert ckpt.latest_step() == 2
    state, data_state = ckpt.restore(2, target)
    ckpt.close()
    assert data_state == {"next_step": 2} and int(state["step"]) == 2
    assert state["params"]["encoder"]["layers"][0]["query"]["kernel"].sharding.mesh.shape == mesh.shape
    loss = next_step_loss(state, shardings, graphdef, tx, mesh, batch)
    # Same mesh: bitwise. Another mesh: reductions are split differently, so within float32 noise.
    if shape == (2, 2, 2):
        assert loss == expected_loss
    else:
        np.testing.assert_allclose(loss, expected_loss, atol=1e-6, rtol=0)


def test_read_params_gives_host_arrays_equal_to_saved(saved_on_2_2_2):
    workdir, _, _, params = saved_on_2_2_2
    restored, step = read_params(workdir)
    assert step == 2
    assert jax.tree.structure(restored) == jax.tree.structure(params)  # int layer keys too
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params)):
        assert isinstance(a, np.ndarray)
        np.testing.assert_array_equal(a, b)
