"""Batch-size warmup (data/pipeline.py BatchWarmup): the schedule's values by hand, each step
equal to a plain full-batch update of its rows, the iterator resuming at the right row, and bad
settings refused in one line before anything is written."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import PRETRAIN_DEFAULT
from conftest import cli_error, random_batch, stop_at, tiny_config, tiny_flags
from data.pipeline import BatchWarmup
from data.pretraining import PretrainingData
from data.preparation import prepare
from pretrain.__main__ import main
from pretrain.bert import objective
from pretrain.train import train_and_evaluate
from test_train_step import SEQ, VOCAB, PREDS, mesh_of, model_fn
from training import mesh as mesh_lib
from training.checkpoint_reader import read_params
from training.config import load_config
from training.loop import LogWindow
from training.metrics import read_metrics
from training.optim import make_optimizer
from training.state import create_train_state
from training.step import make_train_step, microbatch_count


def test_schedule_golden_values():
    # 16 rows from 4: sizes 4, 8, 12 for an equal share of the 6 warmup steps each, then 16.
    w = BatchWarmup(16, 4, 6)
    assert [w.rows(s) for s in range(9)] == [4, 4, 8, 8, 12, 12, 16, 16, 16]
    assert [w.units_before(s) for s in range(9)] == [0, 1, 2, 4, 6, 9, 12, 16, 20]
    w = BatchWarmup(16, 4, 7)  # 7 steps over 3 sizes: ceil(7/3) = 3 at the first
    assert [w.rows(s) for s in range(9)] == [4, 4, 4, 8, 8, 12, 12, 16, 16]
    assert [w.units_before(s) for s in range(9)] == [0, 1, 2, 3, 5, 7, 10, 13, 17]
    # ModernBERT-base's 768 -> 4,608: five sizes below the full batch, as many steps each.
    w = BatchWarmup(4608, 768, 21_190)
    assert w.stage_starts == [0, 4238, 8476, 12714, 16952, 21190]
    assert (w.rows(4237), w.rows(4238), w.rows(21_189), w.rows(21_190)) == (768, 1536, 3840, 4608)
    for off in (BatchWarmup(16), BatchWarmup(16, 4, 0), BatchWarmup(16, 16, 5)):
        assert not off.on and off.unit == 16 and [off.units_before(s) for s in range(3)] == [0, 1, 2]


@pytest.mark.parametrize("name, warmup_tokens", [("modernbert_base", 50e9), ("modernbert_large", 10e9)])
def test_modernbert_configs_count_the_releases_tokens(name, warmup_tokens):
    """The release's schedule in tokens (Warner et al. 2024), as these configs' steps count it."""
    import importlib
    c = importlib.import_module(f"configs.{name}").get_config()
    w, tokens = BatchWarmup.of(c.train), c.data.max_seq_len
    seen = lambda step: w.unit * w.units_before(step) * tokens  # tokens before `step`
    assert w.on and seen(w.steps) == pytest.approx(warmup_tokens, rel=1e-3)
    assert seen(c.optim.warmup_steps) == pytest.approx(3e9, rel=1e-3)
    assert seen(c.train.steps) == pytest.approx(1.7e12, rel=1e-5)


def test_microbatch_count_golden_values():
    assert microbatch_count(16, max_rows=4, granule=4) == 4     # the full batch: train.grad_accum
    assert microbatch_count(8, max_rows=4, granule=4) == 2
    assert microbatch_count(4, max_rows=16, granule=4) == 1
    assert microbatch_count(24, max_rows=10, granule=2) == 3    # 8 rows a microbatch
    assert microbatch_count(20, max_rows=6, granule=2) == 5     # 4 does not divide 10 rows a device
    assert microbatch_count(3072, max_rows=2304, granule=32) == 2


def whole_batch_loss(graphdef):
    obj = objective()
    return lambda p, batch: obj.loss(obj.sums(nnx.merge(graphdef, p), batch, None), obj.normalisers(batch))


def plain_update(tx, graphdef):
    """An independent reference: one AdamW update from the gradient of the whole batch's loss,
    no microbatches, on one device."""
    def update(params, opt_state, batch):
        value, grads = jax.value_and_grad(whole_batch_loss(graphdef))(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return value, optax.apply_updates(params, updates), opt_state, grads
    return jax.jit(update)


def test_each_warmup_step_is_a_plain_update_of_its_rows():
    """Steps of 8, 16 and 16 rows on a (2, 1, 1) mesh with microbatches of at most 4 rows (16
    rows, grad_accum 4): each equals a plain full-batch update; two sizes, two compiles."""
    mesh = mesh_of((2, 1, 1))
    tx = make_optimizer(tiny_config().optim, 10)
    state, shardings, graphdef = create_train_state(model_fn(0.0), tx, mesh, seed=0)
    accum = functools.partial(microbatch_count, max_rows=4, granule=mesh_lib.data_parallel_size(mesh))
    step = jax.jit(make_train_step(graphdef, tx, objective(), seed=0, grad_accum=accum),
                   in_shardings=(shardings, mesh_lib.batch_sharding(mesh)), out_shardings=(shardings, None))
    rng = np.random.default_rng(1)
    batches = [random_batch(rng, rows, SEQ, VOCAB, PREDS) for rows in (8, 16, 16)]
    params, opt_state = jax.device_get(state["params"]), jax.device_get(state["opt_state"])
    reference = plain_update(tx, graphdef)
    for batch in batches:
        with jax.set_mesh(mesh), mesh_lib.logical_rules():
            state, out = step(state, mesh_lib.global_batch(batch, mesh))
        loss, params, opt_state, grads = reference(params, opt_state, batch)
        sums = out["sums"]
        step_loss = float(sums["mlm_loss"] / sums["mlm_count"] + sums["nsp_loss"] / sums["nsp_count"])
        assert step_loss == pytest.approx(float(loss), abs=1e-5)
        assert float(out["means"]["grad_norm"]) == pytest.approx(float(optax.tree.norm(grads)), rel=1e-5)
        for a, b in zip(jax.tree.leaves(jax.device_get(state["params"])), jax.tree.leaves(params)):
            np.testing.assert_allclose(a, b, atol=2e-6)
    assert step._cache_size() == 2  # one compile per batch size

    # Negative control: normalising each microbatch on its own (the mean of their losses, here
    # with few predictions in one half) moves the loss well past that tolerance.
    batch = {k: v.copy() for k, v in batches[1].items()}
    batch["masked_weights"][0::2, 1:] = 0
    loss = jax.jit(whole_batch_loss(graphdef))
    halves = [{k: v[i::2] for k, v in batch.items()} for i in range(2)]
    assert abs(float(loss(params, halves[0]) + loss(params, halves[1])) / 2 - float(loss(params, batch))) > 1e-2


@pytest.fixture(scope="module")
def corpus(data_dir):
    return PretrainingData(prepare(tiny_config(**{"data.data_dir": str(data_dir)}).data))


def test_iterator_takes_each_steps_rows_and_resumes_at_the_right_row(corpus):
    warmup = BatchWarmup(16, 4, 6)
    masking = dict(seed=0, max_predictions=5)
    units = corpus.train_dataset(4, **masking)
    it = corpus.train_iterator(16, warmup=warmup, **masking)
    seen = [next(it) for _ in range(5)]
    state = it.get_state()
    after = [next(it) for _ in range(3)]
    it.close()
    # Step s is unit batches units_before(s) .. +units(s) of the stream: no row skipped or repeated.
    flat = np.concatenate([b["input_ids"] for b in seen + after])
    np.testing.assert_array_equal(flat, np.concatenate([units[i]["input_ids"] for i in range(warmup.units_before(8))]))
    assert [len(b["input_ids"]) for b in seen + after] == [warmup.rows(s) for s in range(8)]
    again = corpus.train_iterator(16, warmup=warmup, **masking)
    again.set_state(state)  # a checkpoint at step 5: the next batch is step 5's, 9 units in
    for want in after:
        got = next(again)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    again.close()
    # Two processes: each joins its own rows of every unit batch; together the one-process rows.
    shares = [corpus.train_iterator(16, warmup=warmup, process_index=i, process_count=2, **masking)
              for i in range(2)]
    for s, want in enumerate(seen):
        got = [next(share) for share in shares]
        both = np.concatenate([g["input_ids"] for g in got])
        assert sorted(map(bytes, both)) == sorted(map(bytes, want["input_ids"])), s
    for share in shares:
        share.close()


def test_a_start_that_does_not_divide_over_the_mesh_is_one_line(capsys, tmp_path, data_dir):
    workdir = tmp_path / "run"
    err = cli_error(capsys, main, ["--workdir", str(workdir), *tiny_flags(
        data_dir, train__batch_warmup_steps=4, train__batch_warmup_start=4)])
    assert "train.batch_warmup_start=4 is not divisible by the data-parallel size 8" in err
    assert not workdir.exists() or not any(workdir.iterdir())


@pytest.mark.parametrize("start", [64, 6, 0])  # over the batch, not a divisor, none
def test_a_start_that_does_not_divide_the_batch_is_one_line(capsys, tmp_path, start):
    workdir = tmp_path / "run"
    batch = load_config(PRETRAIN_DEFAULT).train.batch_size
    err = cli_error(capsys, main, ["--workdir", str(workdir), "--config.train.batch_warmup_steps=10",
                                   f"--config.train.batch_warmup_start={start}"])
    assert f"train.batch_warmup_start={start} must divide train.batch_size={batch}" in err
    assert not workdir.exists()


def test_log_window_times_rows_and_leaves_each_new_size_out():
    """tokens/s counts each step's rows; the first step at a new size (a compile) is not timed."""
    window = LogWindow(start_step=0)
    for step, rows in enumerate([8, 8, 8, 16, 16, 16], 1):
        window.batch_rows(rows)
        window.add(step, {"loss": jnp.float32(1.0)})
        if step in (3, 6):
            _, steps, steps_per_sec = window.take()
            # Steps 2-3 (8 rows each) and 5-6 (16): steps 1 and 4 compile.
            assert steps == 3 and window.rows_per_sec == pytest.approx(steps_per_sec * rows)


@pytest.mark.slow  # three short runs
def test_stopped_mid_warmup_and_rerun_continues_bitwise(tmp_path, data_dir, monkeypatch):
    """SIGTERM's path at step 3, inside the 8-row stage of 4 -> 16 rows on a (4, 1, 2) mesh, then
    the same command: every step's loss and the final weights as an unstopped run's."""
    config = lambda: tiny_config(**{"data.data_dir": str(data_dir), "mesh.data": 4, "mesh.tensor": 2,
                                    "train.batch_warmup_steps": 6, "train.batch_warmup_start": 4})
    train_and_evaluate(config(), tmp_path / "full")
    rows = [m for m in read_metrics(tmp_path / "full") if "train/loss" in m]
    assert [m["train/batch_size"] for m in rows] == [4, 4, 8, 8, 12, 12]
    for m in rows:  # one step a window: tokens per step are that step's rows x 32
        if "perf/steps_per_sec" in m:
            assert m["perf/tokens_per_sec"] == pytest.approx(m["perf/steps_per_sec"] * m["train/batch_size"] * 32)
    stop_at(monkeypatch, 3)
    train_and_evaluate(config(), tmp_path / "stopped")
    monkeypatch.undo()
    assert max(m["step"] for m in read_metrics(tmp_path / "stopped")) == 3
    train_and_evaluate(config(), tmp_path / "stopped")
    strip = lambda ms: [{k: v for k, v in m.items() if not k.startswith("perf/")} for m in ms]
    assert strip(read_metrics(tmp_path / "stopped")) == strip(read_metrics(tmp_path / "full"))
    for a, b in zip(jax.tree.leaves(read_params(tmp_path / "full")[0]),
                    jax.tree.leaves(read_params(tmp_path / "stopped")[0])):
        np.testing.assert_array_equal(a, b)
