"""MAE on the shared step and loop: equal losses across meshes, SIGTERM-and-rerun bitwise through
`python -m pretrain`, fine-tuning and the linear probe through `python -m finetune`, and
one-line errors for bad input."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest

from conftest import cli_error
from finetune.__main__ import main as finetune_main
from models.mae import MAEConfig, MAEForPreTraining
from pretrain.__main__ import main as pretrain_main
from pretrain.mae import objective, train_flops
from training import mesh as mesh_lib
from training import run_record
from training.checkpoint_reader import read_params
from training.metrics import read_metrics
from training.optim import make_optimizer
from training.state import create_train_state
from training.step import make_train_step

REPO = Path(__file__).resolve().parents[1]
# mae_tiny shrunk: the tiny size (16 patches of 7x7, 4 visible), batches of 16, a few steps.
TINY_MAE = {"model.size": "tiny", "train.steps": 6, "train.batch_size": 16, "train.log_every": 4,
            "optim.warmup_steps": 2, "checkpoint.every_steps": 3, "eval.every_steps": 1000,
            "eval.max_batches": 1, "perf.peak_tflops": 0.0}


def flags(data_dir, **extra) -> list[str]:
    values = {**TINY_MAE, "data.data_dir": str(data_dir), **{k.replace("__", "."): v for k, v in extra.items()}}
    return ["--config", str(REPO / "configs" / "mae_tiny.py"), *[f"--config.{k}={v}" for k, v in values.items()]]


def losses_on(shape, batches):
    cfg = MAEConfig.of_size("tiny", dropout=0.1, drop_path=0.1)  # random streams in the step too
    data, fsdp, tensor = shape
    mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor)),
                              jax.devices()[:data * fsdp * tensor])
    optim = ml_collections.ConfigDict(dict(lr=1e-3, warmup_steps=0, decay="constant", end_lr_ratio=0.0,
                                           weight_decay=0.05, b1=0.9, b2=0.95, eps=1e-8, clip_norm=1.0))
    tx = make_optimizer(optim, 10)
    model_fn = lambda rngs: MAEForPreTraining(cfg, rngs)
    state, shardings, graphdef = create_train_state(model_fn, tx, mesh, seed=0)
    step = jax.jit(make_train_step(graphdef, tx, objective(cfg), seed=0, grad_accum=2),
                   in_shardings=(shardings, mesh_lib.batch_sharding(mesh)), out_shardings=(shardings, None))
    out = []
    with jax.set_mesh(mesh), mesh_lib.logical_rules():
        for b in batches:
            state, o = step(state, mesh_lib.global_batch(b, mesh))
            out.append(float(o["sums"]["mae_loss"] / o["sums"]["mae_count"]))
    return np.array(out)


@pytest.mark.slow  # three meshes compiled: about a minute on 2 cores
def test_losses_equal_on_meshes_1_8_and_2x2x2():
    rng = np.random.default_rng(0)
    batches = [{"image": rng.normal(size=(16, 28, 28, 1)).astype(np.float32),
                "noise": rng.random((16, 16), dtype=np.float32)} for _ in range(3)]
    reference = losses_on((1, 1, 1), batches)
    assert reference[0] > 0.5 and not np.allclose(reference[0], reference[2])
    for shape in ((8, 1, 1), (2, 2, 2)):
        np.testing.assert_allclose(losses_on(shape, batches), reference, atol=1e-5, rtol=0)


def test_flops_count_only_visible_patches_in_the_encoder():
    cfg = MAEConfig.of_size("base")
    full = train_flops(cfg, 1, encoded=cfg.num_patches)  # the same ViT encoding every patch
    assert 2.0 < full / train_flops(cfg, 1) < 4.5  # the paper's 2.8-4.1x wall-clock range


def train_losses(workdir) -> dict:
    return {m["step"]: m["train/loss"] for m in read_metrics(workdir) if "train/loss" in m}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, data_dir):
    """A tiny MAE pretraining, stopped by SIGTERM mid-window and rerun, beside an unstopped one."""
    root = tmp_path_factory.mktemp("mae")
    steps = dict(train__steps=14, train__log_every=4, checkpoint__every_steps=4)
    cli = lambda workdir: [sys.executable, "-m", "pretrain", "--workdir", str(workdir), *flags(data_dir, **steps)]
    full = subprocess.run(cli(root / "full"), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert full.returncode == 0, full.stderr[-2000:]
    proc = subprocess.Popen(cli(root / "stopped"), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while (not (root / "stopped" / "checkpoints" / "4").is_dir() and time.time() < deadline
           and proc.poll() is None):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    again = subprocess.run(cli(root / "stopped"), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    return root, out


def test_pretraining_stopped_and_rerun_continues_bitwise(pretrained):
    root, out = pretrained
    assert "SIGTERM: stopped at step" in out, "the run finished before it was stopped"
    assert train_losses(root / "stopped") == train_losses(root / "full") and len(train_losses(root / "full")) == 4
    evals = [m["eval/loss"] for m in read_metrics(root / "full") if "eval/loss" in m]
    assert len(evals) == 2 and evals[1] < evals[0]
    assert (root / "full" / "reconstruction.png").stat().st_size > 1000
    config = run_record.read(root / "full")[0]
    assert config["family"] == "mae" and config["data"]["image_mean"] == [0.1307]
    for a, b in zip(jax.tree.leaves(read_params(root / "full")[0]), jax.tree.leaves(read_params(root / "stopped")[0])):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # three whole runs: the default pytest stays under 15 minutes
def test_continued_pretraining_first_step_loss_is_the_sources_eval_loss(data_dir, tmp_path):
    """`python -m pretrain --config configs/mae_tiny.py --init <MAE workdir>` (the code BERT's
    --init uses): its first train step's loss equals the source's eval loss on that same batch;
    the first step of a random start (the negative control) does not."""
    argv = lambda workdir, steps: ["--workdir", str(workdir),
                                   *flags(data_dir, train__steps=steps, train__log_every=1)]
    pretrain_main(argv(tmp_path / "source", 4))
    pretrain_main([*argv(tmp_path / "continued", 1), "--init", str(tmp_path / "source")])
    pretrain_main(argv(tmp_path / "random", 1))
    first_step = lambda workdir: next(m for m in read_metrics(workdir) if "train/loss" in m)

    # The run's first batch (its train stream, seed and all), through the source's weights as
    # its evaluation reads them: no dropout, no update.
    from flax import nnx
    from pretrain.mae import setup
    from training.config import parse_cli
    from training.state import abstract_model
    config = parse_cli(argv(tmp_path / "unused", 1), "", "")[0]
    family = setup(config, tmp_path / "unused", None)
    batch = next(family.train_batches)
    family.train_batches.close()
    source = nnx.merge(nnx.graphdef(abstract_model(family.model_fn)), read_params(tmp_path / "source")[0])
    sums = family.objective.sums(source, batch, None)
    source_eval = float(sums["mae_loss"] / sums["mae_count"])

    first = first_step(tmp_path / "continued")
    assert first["step"] == 1 and abs(first["train/loss"] - source_eval) < 1e-5, (first, source_eval)
    assert abs(first_step(tmp_path / "random")["train/loss"] - source_eval) > 1e-3
    config = run_record.read(tmp_path / "continued")[0]
    assert config["init"]["family"] == "mae" and config["init"]["step"] == 4


def test_linear_probe_keeps_the_encoder_and_standardises_features(pretrained, data_dir, tmp_path):
    root, _ = pretrained
    finetune_main(["--config", str(REPO / "configs" / "finetune_mnist.py"), "--init", str(root / "full"),
                   "--workdir", str(tmp_path), f"--config.data.data_dir={data_dir}",
                   "--config.train.steps=4", "--config.train.batch_size=16", "--config.eval.every_steps=2",
                   "--config.data.max_train_examples=64", "--config.data.max_eval_examples=32",
                   "--config.method.freeze_encoder=true", "--config.model.probe_norm=true",
                   "--config.model.drop_path=0.0"])
    after, source = read_params(tmp_path)[0], read_params(root / "full")[0]
    for a, b in zip(jax.tree.leaves(after["encoder"]), jax.tree.leaves(source["encoder"])):
        np.testing.assert_array_equal(a, b)  # frozen, bitwise
    assert after["probe_mean"].shape == (64,) and np.all(after["probe_var"] > 0)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["metric"] == "accuracy" and 0.0 <= results["test"]["accuracy"] <= 1.0
    assert results["source"]["kind"] == "checkpoint" and results["encoder"]["patch_size"] == 7
    assert len((tmp_path / "predictions_test.tsv").read_text().splitlines()) == 33

    # The best dev checkpoint, probe statistics folded in, is a ViTForImageClassification.
    from models import hf, hf_cli
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_cli.main(["export", "--checkpoint", str(tmp_path / "best"), "--out", str(tmp_path / "hf")])
    theirs = transformers.ViTForImageClassification.from_pretrained(tmp_path / "hf").eval()
    from finetune.image import ImageClassifier
    from flax import nnx
    from training.state import abstract_model
    cfg = MAEConfig.of_size("tiny")
    ours = nnx.merge(nnx.graphdef(abstract_model(lambda r: ImageClassifier(cfg, 10, r, probe_norm=True))),
                     read_params(tmp_path / "best")[0])
    images = np.random.default_rng(0).normal(size=(4, 28, 28, 1)).astype(np.float32)
    with torch.no_grad():
        logits = theirs(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2))).logits.numpy()
    np.testing.assert_allclose(logits, np.asarray(ours(images)), atol=1e-4)


def test_bad_inputs_are_cli_error(capsys, tmp_path, data_dir, pretrained):
    root, _ = pretrained
    run = lambda *extra: cli_error(capsys, pretrain_main, ["--workdir", str(tmp_path / "w"), *flags(data_dir), *extra])
    assert "not divisible by patch_size 7" in run("--config.model.image_size=30")
    assert "model.mask_ratio=1.5: expected a number in (0, 1)" in run("--config.model.mask_ratio=1.5")
    err = run(f"--config.data.data_dir={tmp_path}", "--config.data.source=tfds:cifar10")
    assert "cifar10" in err and "tfds build" in err
    # A workdir trained with 7x7 patches, rerun with 4x4 ones.
    err = cli_error(capsys, pretrain_main, ["--workdir", str(root / "full"), *flags(data_dir, train__steps=20),
                                           "--config.model.patch_size=4"])
    assert "shape" in err and "another --workdir" in err
    ft = lambda init, *extra: cli_error(capsys, finetune_main, [
        "--config", str(REPO / "configs" / "finetune_mnist.py"), "--init", str(init),
        "--workdir", str(tmp_path / "ft"), f"--config.data.data_dir={data_dir}", *extra])
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "checkpoints").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"family": "bert", "model": {}}))
    assert "holds no complete checkpoint" in ft(tmp_path / "bert")
    assert "no such folder" in ft(tmp_path / "nope")
