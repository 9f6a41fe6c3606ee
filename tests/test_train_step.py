"""The jit-compiled train step: equal across mesh shapes, gradient accumulation, shardings."""

import jax
import ml_collections
import numpy as np
import pytest
from flax.core import spmd
from jax.sharding import PartitionSpec as P

from conftest import random_batch, tiny_config
from models.bert import BertConfig, BertForPreTraining
from pretrain.bert import objective
from training import mesh as mesh_lib
from training.optim import make_optimizer
from training.state import create_train_state
from training.step import make_train_step

VOCAB, SEQ, PREDS = 256, 16, 4


def model_fn(dropout=0.0):
    cfg = BertConfig.of_size("tiny", VOCAB, max_position=SEQ, dropout=dropout, attention_dropout=dropout)
    return lambda rngs: BertForPreTraining(cfg, rngs)


def mesh_of(shape):
    data, fsdp, tensor = shape
    devices = jax.devices()[: data * fsdp * tensor]
    return mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor)), devices)


def run_steps(shape, batches, grad_accum=1, dropout=0.1, *, cfg=None, params=None):
    """Losses (and final params) of len(batches) steps from the same seed on a mesh of `shape`:
    BERT-tiny with `dropout`, or the model of `cfg`, from its seed-0 init or from `params`."""
    config = tiny_config()
    mesh = mesh_of(shape)
    tx = make_optimizer(config.optim, 10)
    make = model_fn(dropout) if cfg is None else (lambda rngs: BertForPreTraining(cfg, rngs))
    state, shardings, graphdef = create_train_state(make, tx, mesh, seed=0, params=params)
    step = jax.jit(make_train_step(graphdef, tx, objective(), seed=0, grad_accum=grad_accum),
                   in_shardings=(shardings, mesh_lib.batch_sharding(mesh)),
                   out_shardings=(shardings, None), donate_argnums=0)
    losses = []
    with jax.set_mesh(mesh), spmd.logical_axis_rules(mesh_lib.RULES):
        for b in batches:
            state, out = step(state, mesh_lib.global_batch(b, mesh))
            sums = out["sums"]
            losses.append(float(sums["mlm_loss"] / sums["mlm_count"] + sums["nsp_loss"] / sums["nsp_count"]))
    return np.array(losses), jax.device_get(state["params"])


@pytest.fixture(scope="module")
def batches():
    rng = np.random.default_rng(0)
    return [random_batch(rng, 16, SEQ, VOCAB, PREDS) for _ in range(3)]


@pytest.fixture(scope="module")
def single_device_run(batches):
    return run_steps((1, 1, 1), batches)


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_losses_equal_across_meshes(shape, batches, single_device_run):
    losses, _ = run_steps(shape, batches)
    reference, _ = single_device_run
    assert losses[0] > 1.0 and not np.allclose(losses[0], losses[2])  # it trains, with dropout on
    np.testing.assert_allclose(losses, reference, atol=1e-5, rtol=0)


def test_grad_accum_equals_full_batch(batches):
    full_losses, full_params = run_steps((2, 2, 2), batches, grad_accum=1, dropout=0.0)
    accum_losses, accum_params = run_steps((2, 2, 2), batches, grad_accum=4, dropout=0.0)
    np.testing.assert_allclose(accum_losses, full_losses, atol=1e-5, rtol=0)
    for a, b in zip(jax.tree.leaves(accum_params), jax.tree.leaves(full_params)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_parameter_shardings_follow_rules():
    config = tiny_config()
    mesh = mesh_of((2, 2, 2))
    state, _, _ = create_train_state(model_fn(), make_optimizer(config.optim, 10), mesh, seed=0)
    p = state["params"]
    layer = p["encoder"]["layers"][0]
    expected = {
        "word embeddings (vocab, embed)": (p["encoder"]["embed"]["word"]["embedding"], P("tensor", "fsdp")),
        "query (embed, heads, kv)": (layer["query"]["kernel"], P("fsdp", "tensor", None)),
        "attn_out (heads, kv, embed)": (layer["attn_out"]["kernel"], P("tensor", None, "fsdp")),
        "mlp_in (embed, mlp)": (layer["mlp_in"]["kernel"], P("fsdp", "tensor")),
        "mlp_out (mlp, embed)": (layer["mlp_out"]["kernel"], P("tensor", "fsdp")),
        "layer norm (embed,)": (layer["attn_norm"]["scale"], P("fsdp")),
        "position (None, embed)": (p["encoder"]["embed"]["position"]["embedding"], P(None, "fsdp")),
    }
    for name, (array, spec) in expected.items():
        assert array.sharding.spec == spec, name
        # Each device holds 1/(shards) of the weight: no replicated full copy.
        shards = np.prod([mesh.shape[a] for a in spec if a is not None])
        assert array.addressable_shards[0].data.size == array.size // shards, name


# ---- gradients themselves: losses hardly see a gradient scaled by a constant under AdamW -----

def one_step_gradients(shape, batch, grad_accum=1, scale=1.0):
    """grad_norm and the gradients of one real train step on a mesh of `shape`. With plain SGD
    at rate 1 the update is the gradient: params before minus params after. `scale` multiplies
    the objective's loss (the negative control: gradients scaled, logged losses unchanged)."""
    import dataclasses

    import optax
    mesh = mesh_of(shape)
    tx = optax.sgd(1.0)
    state, shardings, graphdef = create_train_state(model_fn(0.0), tx, mesh, seed=0)
    before = jax.device_get(state["params"])
    loss = objective().loss
    scaled = dataclasses.replace(objective(), loss=lambda sums, norms: scale * loss(sums, norms))
    step = jax.jit(make_train_step(graphdef, tx, scaled, seed=0, grad_accum=grad_accum),
                   in_shardings=(shardings, mesh_lib.batch_sharding(mesh)),
                   out_shardings=(shardings, None), donate_argnums=0)
    with jax.set_mesh(mesh), spmd.logical_axis_rules(mesh_lib.RULES):
        state, out = step(state, mesh_lib.global_batch(batch, mesh))
    grads = jax.tree.map(lambda b, a: b - a, before, jax.device_get(state["params"]))
    return float(out["means"]["grad_norm"]), grads


def assert_same_gradients(got, want, atol=1e-5):
    (norm, grads), (want_norm, want_grads) = got, want
    assert abs(norm - want_norm) <= atol, (norm, want_norm)
    for (path, w), g in zip(jax.tree_util.tree_leaves_with_path(want_grads), jax.tree.leaves(grads)):
        np.testing.assert_allclose(g, w, atol=atol, rtol=0, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def reference_gradients(batches):
    norm, grads = one_step_gradients((1, 1, 1), batches[0])
    # The tolerance can see a scaled gradient: the norm and the largest entries are far above it.
    assert norm > 0.1 and max(float(np.abs(g).max()) for g in jax.tree.leaves(grads)) > 1e-2
    return norm, grads


@pytest.mark.parametrize("shape, grad_accum", [
    ((8, 1, 1), 1), ((2, 2, 2), 1), pytest.param((2, 2, 2), 2, marks=pytest.mark.slow),
    ((2, 2, 2), 4), pytest.param((1, 1, 1), 4, marks=pytest.mark.slow)])
def test_gradients_equal_across_meshes_and_accumulation(shape, grad_accum, batches, reference_gradients):
    assert_same_gradients(one_step_gradients(shape, batches[0], grad_accum), reference_gradients)


def test_a_gradient_scaled_by_4_fails_the_comparison(batches, reference_gradients):
    """The negative control: the same step with its loss (so its gradients) scaled by 4 on a
    mesh; its logged losses are unchanged, and the gradient comparison catches it."""
    norm, grads = scaled = one_step_gradients((2, 2, 2), batches[0], scale=4.0)
    assert norm == pytest.approx(4 * reference_gradients[0], rel=1e-4)
    with pytest.raises(AssertionError):
        assert_same_gradients(scaled, reference_gradients)
    with pytest.raises(AssertionError):  # the gradients themselves, not only their norm
        assert_same_gradients((reference_gradients[0], grads), reference_gradients)
