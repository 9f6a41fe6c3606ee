"""Fine-tuning end to end on tiny budgets: --init sources, frozen weights, L2-SP, GLUE on mock
data, resume after SIGTERM, sweeps, and one-line errors."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import finetune_rt_polarity
from conftest import TINY_FT, cli_error, tiny_flags, ft_config
from finetune import tasks
from finetune.__main__ import main
from finetune.sweep import run_sweep
from finetune.bert import SequenceClassifier
from training.init_source import load_encoder, resolve_source
from finetune.train import train_and_evaluate
from models.layers import stack_layers
from training import run_record
from training.checkpoint_reader import read_params
from training.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]


def ft_flags(data_dir, **overrides) -> list[str]:
    values = {**TINY_FT, "data.data_dir": str(data_dir),
              **{k.replace("__", "."): v for k, v in overrides.items()}}
    return [f"--config.{k}={v}" for k, v in values.items()]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, data_dir):
    """A tiny pretraining workdir (2 steps), made by the pretraining CLI."""
    workdir = tmp_path_factory.mktemp("pretrained")
    proc = subprocess.run([sys.executable, "-m", "pretrain", "--workdir", str(workdir),
                           *tiny_flags(data_dir, train__steps=2, checkpoint__every_steps=2)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return workdir


def encoder_of(workdir):
    return read_params(workdir)[0]["encoder"]


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.array_equal(np.asarray(x), np.asarray(y))


def changed(a, b) -> bool:
    return any(not np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def distance(a, b) -> float:
    return float(np.sqrt(sum(np.sum((np.asarray(x) - np.asarray(y)) ** 2)
                             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))))


@pytest.fixture(scope="module")
def plain_run(pretrained, data_dir, tmp_path_factory):
    """Full fine-tuning from the tiny pretraining workdir: the reference for the method tests."""
    workdir = tmp_path_factory.mktemp("plain")
    results = train_and_evaluate(ft_config(data_dir), workdir, str(pretrained))
    return workdir, results


# ---- --init --------------------------------------------------------------------------------

def test_init_from_pretraining_workdir_frozen_encoder_stays_bitwise(pretrained, data_dir, tmp_path, capsys):
    # A linear probe of the mean hidden state: the frozen-feature evaluation.
    results = train_and_evaluate(ft_config(data_dir, method__freeze_encoder=True, model__pooling="mean"),
                                 tmp_path, str(pretrained))
    source = encoder_of(pretrained)
    after = read_params(tmp_path)[0]
    assert_trees_equal(after["encoder"], source)  # restored exactly, and never changed
    assert results["source"] == {"init": str(pretrained), "kind": "checkpoint", "step": 2,
                                 "path": str(pretrained / "checkpoints" / "2")}
    assert after["classifier"]["kernel"].shape == (128, 2)
    assert set(results) >= {"dev", "test", "best_step", "config", "encoder"}
    assert results["encoder"]["num_layers"] == 2
    # results.json, the predictions file and metrics.jsonl agree.
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["dev"] == results["dev"]
    rows = [l.split("\t") for l in (tmp_path / "predictions_dev.tsv").read_text().splitlines()[1:]]
    assert len(rows) == 32
    assert np.mean([p == y for _, p, y in rows]) == pytest.approx(results["dev"]["accuracy"])
    dev_lines = [m for m in read_metrics(tmp_path) if "dev/accuracy" in m]
    assert [m["step"] for m in dev_lines] == [3, 6]
    best = max(dev_lines, key=lambda m: m["dev/accuracy"])  # first of equals, like the trainer
    assert results["best_step"] == best["step"]
    # BertForSequenceClassification reads the pooler, so a mean-pooled head is not exported as one.
    from models import hf, hf_cli
    capsys.readouterr()  # the training's progress bar
    with pytest.raises(SystemExit):
        hf_cli.main(["export", "--checkpoint", str(tmp_path / "best"), "--out", str(tmp_path / "hf")])
    err = capsys.readouterr().err.strip()
    assert "mean-pooled" in err and "--architecture BertModel" in err and "\n" not in err
    assert not (tmp_path / "hf").exists()


def test_scanned_encoder_from_an_unrolled_checkpoint_exports(pretrained, data_dir, tmp_path):
    """The pretraining checkpoint is unrolled; the fine-tuned model scans: --init converts, and
    the export splits the stack back into HuggingFace's layers."""
    train_and_evaluate(ft_config(data_dir, method__freeze_encoder=True, model__scan_layers=True),
                       tmp_path, str(pretrained))
    after = read_params(tmp_path)[0]
    source = jax.tree.map(np.asarray, encoder_of(pretrained))
    assert after["encoder"]["layers"]["query"]["kernel"].shape[0] == 2
    assert_trees_equal(after["encoder"], stack_layers(source))
    from models import hf, hf_cli
    hf_cli.main(["export", "--checkpoint", str(tmp_path / "best"), "--out", str(tmp_path / "hf")])
    imported, _, architecture = hf.import_params(tmp_path / "hf")
    assert architecture == "BertForSequenceClassification"
    np.testing.assert_array_equal(imported["encoder"]["layers"][1]["mlp_out"]["kernel"],
                                  stack_layers(source)["layers"]["mlp_out"]["kernel"][1])


def test_freeze_embeddings_and_bottom_layer_bitwise(plain_run, pretrained, data_dir, tmp_path):
    train_and_evaluate(ft_config(data_dir, method__freeze_bottom=1), tmp_path, str(pretrained))
    source, after = encoder_of(pretrained), read_params(tmp_path)[0]["encoder"]
    assert_trees_equal(after["embed"], source["embed"])
    assert_trees_equal(after["layers"][0], source["layers"][0])
    assert changed(after["layers"][1], source["layers"][1]) and changed(after["pooler"], source["pooler"])
    plain = read_params(plain_run[0])[0]["encoder"]
    assert changed(plain["embed"], source["embed"]) and changed(plain["layers"][0], source["layers"][0])


def test_init_from_step_folder_and_huggingface_folder(pretrained, tmp_path):
    from models import hf, hf_cli
    from models.bert import BertConfig

    step = resolve_source(str(pretrained / "checkpoints" / "2"))
    assert (step.kind, step.step) == ("checkpoint", 2)
    assert_trees_equal(load_encoder(step), encoder_of(pretrained))

    params, _ = read_params(pretrained)
    cfg = BertConfig.from_model_config(run_record.read(pretrained)[0]["model"])
    hf.export_params(params, cfg, tmp_path / "hf", architecture="BertForPreTraining",
                     tokenizer=pretrained / "tokenizer")
    source = resolve_source(str(tmp_path / "hf"))
    assert source.kind == "huggingface" and source.model_config() == cfg
    assert_trees_equal(load_encoder(source), encoder_of(pretrained))


def test_best_checkpoint_exports_to_transformers_with_our_logits(plain_run, tmp_path):
    import torch
    import transformers
    from flax import nnx
    from data.tasks import Split, encode
    from models import hf, hf_cli
    from models.bert import BertConfig
    from models.tokenizer import Tokenizer
    from training.state import abstract_model

    workdir, results = plain_run
    out = tmp_path / "hf"
    hf_cli.main(["export", "--checkpoint", str(workdir / "best"), "--out", str(out), "--labels", "rotten,fresh"])
    params, step = read_params(workdir / "best")
    assert step == results["best_step"]
    cfg = BertConfig(**results["encoder"])
    model = nnx.merge(nnx.graphdef(abstract_model(lambda r: SequenceClassifier(cfg, 2, 0.1, r))), params)
    texts = ["A three-hour cinema master class.", "So muddled, repetitive and ragged.", "Meh."]
    batch = encode(Split(texts, None, np.zeros(3), np.arange(3)), Tokenizer.load(workdir / "tokenizer"), 32)
    ours = np.asarray(model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]))
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():
        logits = theirs(**{k: torch.tensor(batch[k]).long() for k in
                           ("input_ids", "token_type_ids", "attention_mask")}).logits.numpy()
    np.testing.assert_allclose(logits, ours, atol=1e-5)
    assert theirs.config.id2label == {0: "rotten", 1: "fresh"}


# ---- L2-SP ---------------------------------------------------------------------------------

def test_l2sp_huge_alpha_keeps_the_encoder_near_its_start(plain_run, pretrained, data_dir, tmp_path):
    results = train_and_evaluate(ft_config(data_dir, method__l2sp_alpha=1e4), tmp_path, str(pretrained))
    source = encoder_of(pretrained)
    near = distance(read_params(tmp_path)[0]["encoder"], source)
    plain = distance(read_params(plain_run[0])[0]["encoder"], source)
    assert 0 < near < 0.3 * plain, (near, plain)
    assert any(m.get("train/l2sp", 0) > 0 for m in read_metrics(tmp_path))
    assert results["dev"] is not None


def test_l2sp_alpha_zero_equals_plain_fine_tuning():
    """The same steps with an anchor and alpha=0 give bitwise the params of the steps without."""
    import ml_collections
    from flax.core import spmd
    from finetune.methods import frozen_mask, l2sp_penalty
    from finetune.bert import encoder_depth, predict
    from models.bert import BertConfig
    from training import mesh as mesh_lib
    from training.optim import make_optimizer
    from training.state import create_train_state, init_params
    from training.step import make_train_step

    cfg = BertConfig.of_size("tiny", 128, max_position=16)
    model_fn = lambda rngs: SequenceClassifier(cfg, 2, 0.1, rngs)
    mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1)), jax.devices()[:1])
    frozen = frozen_mask(jax.eval_shape(lambda: init_params(model_fn, 0)),
                         ml_collections.ConfigDict(dict(freeze_encoder=False, freeze_bottom=-1)),
                         encoder_depth(cfg.num_layers))
    tx = make_optimizer(finetune_rt_polarity.get_config().optim, 10, frozen=frozen)
    objective = tasks.objective(tasks.get_task("rt_polarity"), predict)
    rng = np.random.default_rng(0)
    batches = [{"input_ids": rng.integers(5, 128, (16, 16)).astype(np.int32),
                "token_type_ids": np.zeros((16, 16), np.int32), "attention_mask": np.ones((16, 16), np.int32),
                "labels": rng.integers(0, 2, 16).astype(np.int32), "weights": np.ones(16, np.float32)}
               for _ in range(3)]

    def run(alpha, anchor):
        state, shardings, graphdef = create_train_state(model_fn, tx, mesh, seed=0)
        if anchor:
            state["anchor"] = jax.tree.map(lambda x: x.copy(), state["params"]["encoder"])
            shardings = {**shardings, "anchor": shardings["params"]["encoder"]}
        penalties = {"l2sp": l2sp_penalty(alpha, frozen)} if anchor else {}
        step = jax.jit(make_train_step(graphdef, tx, objective, seed=0, grad_accum=1, frozen=frozen,
                                       penalties=penalties),
                       in_shardings=(shardings, mesh_lib.batch_sharding(mesh)),
                       out_shardings=(shardings, None))
        with jax.set_mesh(mesh), spmd.logical_axis_rules(mesh_lib.RULES):
            for b in batches:
                state, out = step(state, mesh_lib.global_batch(b, mesh))
        return jax.device_get(state["params"]), float(out["means"].get("l2sp", 0.0))

    plain, _ = run(0.0, anchor=False)
    zero, penalty_zero = run(0.0, anchor=True)
    assert penalty_zero == 0.0
    assert_trees_equal(zero, plain)  # (alpha > 0: test_l2sp_huge_alpha_keeps_the_encoder_near_its_start)


# ---- GLUE end to end on mock data ----------------------------------------------------------

def test_glue_stsb_regression_end_to_end_on_mock_data(data_dir, tmp_path):
    config = ft_config(tmp_path / "tfds", data__task="glue/stsb", data__vocab_size=200,
                       train__steps=4, eval__every_steps=2)
    with tfds.testing.mock_data(num_examples=24):
        results = train_and_evaluate(config, tmp_path / "run", "none")
    assert results["metric"] == "pearson" and set(results["dev"]) == {"pearson", "spearman", "loss"}
    rows = [l.split("\t") for l in (tmp_path / "run" / "predictions_dev.tsv").read_text().splitlines()[1:]]
    preds, labels = np.array([[float(p), float(y)] for _, p, y in rows]).T
    assert results["dev"]["pearson"] == pytest.approx(np.corrcoef(preds, labels)[0, 1], abs=1e-6)
    assert (tmp_path / "run" / "tokenizer" / "vocab.txt").is_file()  # --init none trained one


# ---- resume ----------------------------------------------------------------------------------

def cli(workdir, init, data_dir, **extra):
    return [sys.executable, "-m", "finetune", "--init", str(init), "--workdir", str(workdir),
            *ft_flags(data_dir, **extra)]


def stable(workdir) -> list[dict]:
    """metrics.jsonl without the timing fields."""
    return [{k: v for k, v in m.items() if not k.startswith("perf/")} for m in read_metrics(workdir)]


@pytest.mark.slow  # whole runs or a long compile: the default pytest stays under 15 minutes
def test_sigterm_then_rerun_gives_identical_results(pretrained, data_dir, tmp_path):
    steps = dict(train__steps=40, eval__every_steps=8, data__max_train_examples=128)
    full = subprocess.run(cli(tmp_path / "full", pretrained, data_dir, **steps), cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert full.returncode == 0, full.stderr[-2000:]

    workdir = tmp_path / "stopped"
    proc = subprocess.Popen(cli(workdir, pretrained, data_dir, **steps), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while (max((m["step"] for m in read_metrics(workdir)), default=0) < 5
           and time.time() < deadline and proc.poll() is None):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "SIGTERM: stopped at step" in out, "the run finished before it was stopped"
    assert not (workdir / "results.json").exists()

    again = subprocess.run(cli(workdir, pretrained, data_dir, **steps), cwd=REPO,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert stable(workdir) == stable(tmp_path / "full")  # every loss and dev metric, bitwise
    ours, theirs = (json.loads((d / "results.json").read_text()) for d in (workdir, tmp_path / "full"))
    for key in ("dev", "test", "best_step"):
        assert ours[key] == theirs[key]
    assert ((workdir / "predictions_test.tsv").read_text()
            == (tmp_path / "full" / "predictions_test.tsv").read_text())
    assert_trees_equal(read_params(workdir)[0], read_params(tmp_path / "full")[0])


# ---- sweeps --------------------------------------------------------------------------------

def test_sweep_grid_medians_and_winner(tmp_path, capsys, data_dir):
    calls = []

    def fake_train(cfg, workdir, init, explicit):
        calls.append((cfg.optim.lr, cfg.method.layer_decay, cfg.train.seed, workdir.relative_to(tmp_path)))
        dev = cfg.optim.lr * 1000 + cfg.train.seed * 0.01 + cfg.method.layer_decay
        results = {"metric": "accuracy", "dev": {"accuracy": dev}, "test": {"accuracy": dev - 1}}
        workdir.mkdir(parents=True)
        (workdir / "results.json").write_text(json.dumps(results))
        return results

    config = ft_config(data_dir)
    sweep = run_sweep(config, tmp_path, "none", ["lr=1e-4,3e-4", "layer_decay=0.5,1.0"], 3,
                      train_fn=fake_train)
    assert len(calls) == 12 and {c[2] for c in calls} == {0, 1, 2}
    assert calls[0][3] == Path("lr=1e-4,layer_decay=0.5/seed0")
    row = next(r for r in sweep["settings"] if r["setting"] == "lr=3e-4,layer_decay=1.0")
    assert row["dev"]["median"] == pytest.approx(0.3 + 0.01 + 1.0)
    assert row["dev"]["min"] == pytest.approx(1.3) and row["dev"]["max"] == pytest.approx(1.32)
    assert sweep["best"] == {"setting": "lr=3e-4,layer_decay=1.0", "dev_median": pytest.approx(1.31),
                             "test_median": pytest.approx(0.31)}
    assert json.loads((tmp_path / "sweep.json").read_text())["best"]["setting"] == "lr=3e-4,layer_decay=1.0"
    table = capsys.readouterr().out
    assert "lr=3e-4,layer_decay=1.0" in table and "best on dev" in table
    # A rerun reads the finished runs back instead of training again.
    calls.clear()
    run_sweep(config, tmp_path, "none", ["lr=1e-4,3e-4", "layer_decay=0.5,1.0"], 3, train_fn=fake_train)
    assert calls == []


# ---- one-line errors ----------------------------------------------------------------------

def one_line_error(capsys, argv) -> str:
    return cli_error(capsys, main, argv)


def test_bad_inputs_are_one_line(capsys, tmp_path, pretrained, data_dir):
    flags = ft_flags(data_dir)
    runs = iter(range(100))

    def error(init, *extra):
        return one_line_error(capsys, ["--workdir", str(tmp_path / f"w{next(runs)}"), "--init", str(init),
                                       *flags, *extra])

    assert "no such folder" in error(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    assert "neither a checkpoint" in error(tmp_path / "empty")
    assert "cannot load a tokenizer" in error("none", f"--config.data.tokenizer={tmp_path / 'nope'}")
    assert "unknown BERT size 'huge'" in error("none", "--config.model.size=huge")
    err = error(pretrained, "--config.model.size=mini")
    assert "contradicts --init" in err and "tiny" in err
    assert "brings its own tokenizer" in error(pretrained, f"--config.data.tokenizer={tmp_path}")
    err = error("none", f"--config.data.data_dir={tmp_path}", "--config.data.task=glue/rte")
    assert "glue/rte is not prepared" in err and "tfds build" in err
    assert "unknown task" in error("none", "--config.data.task=sst9")
    assert "KEY=V1,V2" in error("none", "--sweep", "lr")
    assert "did you mean" in error("none", "--sweep", "method.l2sp=1")
    assert "regression" in error("none", "--config.method.label_smoothing=0.1", "--config.data.task=glue/stsb")
    assert "freeze_bottom=5" in error(pretrained, "--config.method.freeze_bottom=5")
    for method in ("--config.method.freeze_bottom=1", "--config.method.layer_decay=0.8"):
        assert "set model.scan_layers=false" in error(pretrained, "--config.model.scan_layers=true", method)
    assert "choose one of: cls, mean" in error("none", "--config.model.pooling=max")


def test_resume_with_another_init_is_refused(capsys, plain_run, data_dir):
    workdir, _ = plain_run
    err = one_line_error(capsys, ["--workdir", str(workdir), "--init", "none", *ft_flags(data_dir)])
    assert "was started with --init" in err
