"""The scanned transformer stack (stacked weights, one lax.scan) against the unrolled one: the
same losses with dropout on across meshes, layout conversion both ways, remat policies."""

import dataclasses

import jax
import numpy as np
import pytest

from conftest import random_batch
from models.bert import BertConfig, BertForPreTraining
from models.layers import REMAT_POLICIES, is_stacked, remat_name, stack_layers, unstack_layers
from test_train_step import run_steps
from training import mesh as mesh_lib
from training.init_source import take_params
from training.state import graphdef_and_specs, init_params

VOCAB, SEQ, PREDS = 256, 16, 4
TINY = BertConfig.of_size("tiny", VOCAB, max_position=SEQ, dropout=0.1, attention_dropout=0.1)


def model_fn(cfg):
    return lambda rngs: BertForPreTraining(cfg, rngs)


@pytest.fixture(scope="module")
def batches():
    rng = np.random.default_rng(0)
    return [random_batch(rng, 16, SEQ, VOCAB, PREDS) for _ in range(3)]


@pytest.fixture(scope="module")
def unrolled_init():
    return init_params(model_fn(TINY), seed=0)


@pytest.fixture(scope="module")
def unrolled_run(batches, unrolled_init):
    return run_steps((1, 1, 1), batches, cfg=TINY, params=unrolled_init)


@pytest.mark.parametrize("shape,remat", [((1, 1, 1), "none"), ((2, 2, 2), "none"),
                                         pytest.param((2, 2, 2), "dots_no_batch", marks=pytest.mark.slow)])
def test_scanned_losses_equal_unrolled(shape, remat, batches, unrolled_init, unrolled_run):
    scanned = dataclasses.replace(TINY, scan_layers=True, remat=remat)
    losses, params = run_steps(shape, batches, cfg=scanned, params=stack_layers(unrolled_init))
    reference, reference_params = unrolled_run
    assert losses[0] > 1.0 and not np.allclose(losses[0], losses[2])  # it trains, dropout on
    np.testing.assert_allclose(losses, reference, atol=1e-5, rtol=0)
    for a, b in zip(jax.tree.leaves(unstack_layers(params)), jax.tree.leaves(reference_params)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_remat_policies_change_nothing_but_memory(batches, unrolled_init, unrolled_run):
    for remat in ("full", "dots"):
        cfg = dataclasses.replace(TINY, remat=remat)
        losses, _ = run_steps((1, 1, 1), batches[:1], cfg=cfg, params=unrolled_init)
        np.testing.assert_allclose(losses, unrolled_run[0][:1], atol=1e-5, rtol=0)


def test_stacked_weights_name_the_layer_axis():
    _, specs = graphdef_and_specs(model_fn(dataclasses.replace(TINY, scan_layers=True)))
    layers = specs["encoder"]["layers"]
    assert tuple(layers["query"]["kernel"]) == ("layers", "embed", "heads", "kv")
    assert tuple(layers["mlp_norm"]["scale"]) == ("layers", "embed")
    # ... which no mesh axis shards: every device holds its shard of every layer.
    assert mesh_lib.logical_to_mesh(layers["query"]["kernel"])[0] is None


def test_layout_conversion_round_trips(unrolled_init):
    stacked = stack_layers(unrolled_init)
    assert is_stacked(stacked) and not is_stacked(unrolled_init)
    assert stacked["encoder"]["layers"]["query"]["kernel"].shape == (2, 128, 2, 64)
    np.testing.assert_array_equal(stacked["encoder"]["layers"]["mlp_in"]["bias"][1],
                                  unrolled_init["encoder"]["layers"][1]["mlp_in"]["bias"])
    again = unstack_layers(stacked)
    assert jax.tree.structure(again) == jax.tree.structure(unrolled_init)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(unrolled_init)):
        np.testing.assert_array_equal(a, b)
    assert stack_layers(stacked) is not stacked and is_stacked(stack_layers(stacked))
    # Orbax restores layer keys as strings; they stack in numeric order, not '10' before '2'.
    as_strings = {"layers": {str(i): {"w": np.full(1, i)} for i in range(12)}}
    np.testing.assert_array_equal(stack_layers(as_strings)["layers"]["w"][:, 0], np.arange(12))


def test_remat_names():
    assert remat_name(True) == "full" and remat_name(False) == "none"  # configs from before
    assert BertConfig.of_size("tiny", VOCAB, remat=True).remat == "full"
    assert set(REMAT_POLICIES) >= {"none", "full", "dots", "dots_no_batch"}
    with pytest.raises(ValueError, match="unknown remat policy 'sometimes'; choose one of none"):
        BertConfig.of_size("tiny", VOCAB, remat="sometimes")


def test_init_converts_a_source_of_the_other_layout(unrolled_init):
    scanned_fresh = init_params(model_fn(dataclasses.replace(TINY, scan_layers=True)), seed=1)
    taken, _ = take_params(unrolled_init, scanned_fresh, "SRC")
    for a, b in zip(jax.tree.leaves(taken), jax.tree.leaves(stack_layers(unrolled_init))):
        np.testing.assert_array_equal(a, b)
    back, _ = take_params(taken, init_params(model_fn(TINY), seed=1), "SRC")
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(unrolled_init)):
        np.testing.assert_array_equal(a, b)
