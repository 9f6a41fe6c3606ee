"""Pretraining distillation (pretrain/distill.py): the student's first layers, the loss against a
numpy reference, a CLI run that pins its teacher, and one-line refusals that write nothing."""

import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import cli_error, tiny_flags
from pretrain import distill
from pretrain.__main__ import main
from training.checkpoint_reader import read_params
from training.step import Objective

REPO = Path(__file__).resolve().parents[1]


def test_student_takes_every_other_teacher_layer():
    teacher = {"encoder": {"embed": "E", "layers": {i: f"L{i}" for i in range(4)}}, "mlm_bias": "B"}
    student = {"encoder": {"embed": 0, "layers": {0: 0, 1: 0}}, "mlm_bias": 0}
    assert distill.every_other_layer(teacher, "encoder", student) == {
        "encoder": {"embed": "E", "layers": {0: "L0", 1: "L2"}}, "mlm_bias": "B"}


def test_loss_against_numpy():
    rng = np.random.default_rng(0)
    B, P, T, V, D = 2, 3, 5, 7, 4
    mlm, teacher_mlm = rng.normal(size=(B, P, V)), rng.normal(size=(B, P, V))
    hidden, teacher_hidden = rng.normal(size=(B, T, D)), rng.normal(size=(B, T, D))
    weights = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
    attention = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.int32)
    base = Objective(sums=None, normalisers=lambda b: {"n": 4.0}, loss=lambda s, n: s["own"] / n["n"],
                     summarize=lambda s, p: {})
    outputs = lambda model, batch, key: {"mlm": jnp.asarray(mlm), "hidden": jnp.asarray(hidden),
                                         "sums": {"own": jnp.asarray(2.0)}}
    dc = ml_collections.ConfigDict(dict(temperature=2.0, alpha_soft=5.0, alpha_mlm=2.0, alpha_cos=1.0))
    objective = distill.objective(base, outputs, dc)
    batch = {"masked_weights": weights, "attention_mask": attention,
             "teacher_mlm": jnp.asarray(teacher_mlm), "teacher_hidden": jnp.asarray(teacher_hidden)}
    ours = float(objective.loss(objective.sums(None, batch, None), objective.normalisers(batch)))

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))
    p, logq = np.exp(log_softmax(teacher_mlm / 2)), log_softmax(mlm / 2)
    kl = (p * (np.log(p) - logq)).sum(-1)
    soft = 4 * (kl * weights).sum() / weights.sum()
    cos = (hidden * teacher_hidden).sum(-1) / (np.linalg.norm(hidden, axis=-1) * np.linalg.norm(teacher_hidden, axis=-1))
    cosine = ((1 - cos) * attention).sum() / attention.sum()
    np.testing.assert_allclose(ours, 5 * soft + 2 * (2.0 / 4.0) + cosine, rtol=1e-5)
    assert soft > 0.01 and cosine > 0.01  # negative control: both terms count


@pytest.mark.slow
def test_distilled_student_from_a_cli_teacher(data_dir, tmp_path, capsys):
    teacher, student = tmp_path / "teacher", tmp_path / "student"
    flags = tiny_flags(data_dir, train__steps=2, checkpoint__every_steps=2)
    proc = subprocess.run([sys.executable, "-m", "pretrain", "--workdir", str(teacher),
                           "--config.model.size=mini", *flags], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    main(["--workdir", str(student), f"--config.distill.teacher={teacher}", *flags])
    capsys.readouterr()  # the run's progress, before the errors' one line each
    record = json.loads((student / "run.json").read_text())["resolved"]
    assert record["distill"]["teacher"] == str(teacher / "checkpoints" / "2")
    assert record["model"]["num_layers"] == 2 and record["model"]["hidden_size"] == 256
    ours, theirs = read_params(student)[0], read_params(teacher)[0]
    assert sorted(ours["encoder"]["layers"]) == [0, 1]  # the student's own weights, no teacher in the checkpoint
    assert set(ours) == set(theirs)

    def error(*extra):
        workdir = tmp_path / f"bad{len(list(tmp_path.iterdir()))}"
        err = cli_error(capsys, main, ["--workdir", str(workdir), *flags, *extra])
        assert not workdir.exists() or not any(p.name != "lease.json" for p in workdir.iterdir())
        return err
    assert "no such folder" in error(f"--config.distill.teacher={tmp_path / 'nope'}")
    assert "drop --init" in error(f"--config.distill.teacher={teacher}", "--init", str(teacher))
    assert "teacher has 4 layers" in error(f"--config.distill.teacher={teacher}", "--config.distill.student_layers=5")
    assert "contradicts distill.teacher" in error(f"--config.distill.teacher={teacher}",
                                                  f"--config.data.tokenizer={tmp_path}")
    # A rerun must name the same teacher.
    err = cli_error(capsys, main, ["--workdir", str(student), *flags, f"--config.distill.teacher={tmp_path}"])
    assert "pass the same teacher" in err
