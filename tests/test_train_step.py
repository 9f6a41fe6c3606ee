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
