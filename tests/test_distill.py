"""Task distillation (finetune/distill.py): the loss and gradient against torch, a student taught
by a fine-tuning workdir and by the same teacher exported to HuggingFace, and one-line refusals
that write nothing."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY_FT, cli_error, ft_config
from finetune import distill, tasks
from finetune.__main__ import main
from finetune.train import train_and_evaluate
from training.checkpoint_reader import read_params
from training.metrics import read_metrics


def test_loss_and_student_gradient_equal_torch():
    import torch
    import torch.nn.functional as F
    rng = np.random.default_rng(0)
    student, teacher = rng.normal(size=(5, 4)) * 2, rng.normal(size=(5, 4)) * 2
    labels, weights = np.array([0, 3, 1, 1, 2]), np.array([1, 1, 1, 1, 0], np.float32)  # a padding row
    T, alpha = 3.0, 0.7
    objective = distill.objective(tasks.TASKS["reuters_r8"], lambda logits, b, k: logits, 0.0, T, alpha)
    batch = {"labels": jnp.asarray(labels), "weights": jnp.asarray(weights),
             "teacher_logits": jnp.asarray(teacher, jnp.float32)}

    def loss(x):  # the "model" is its own logits
        return objective.loss(objective.sums(x, batch, None), objective.normalisers(batch))
    ours, grad = jax.value_and_grad(loss)(jnp.asarray(student, np.float32))

    s = torch.tensor(student[:4], requires_grad=True)  # the real rows only
    t, y = torch.tensor(teacher[:4]), torch.tensor(labels[:4])
    kd = F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="batchmean") * T * T
    theirs = alpha * kd + (1 - alpha) * F.cross_entropy(s, y)
    theirs.backward()
    np.testing.assert_allclose(float(ours), theirs.item(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad)[:4], s.grad.numpy(), rtol=1e-4, atol=1e-7)
    assert np.all(np.asarray(grad)[4] == 0)  # the padding row teaches nothing
    # Negative control: the hand-written KL is not vacuously the cross-entropy.
    p, logq = F.softmax(t / T, -1).numpy(), F.log_softmax(s / T, -1).detach().numpy()
    hand = T * T * np.mean(np.sum(p * (np.log(p) - logq), -1))
    np.testing.assert_allclose(hand, kd.item(), rtol=1e-6)
    assert abs(kd.item() - F.cross_entropy(s, y).item()) > 0.1


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, data_dir):
    """A tiny fine-tuned teacher (random init, its own WordPiece tokenizer)."""
    workdir = tmp_path_factory.mktemp("teacher")
    train_and_evaluate(ft_config(data_dir, train__steps=12), workdir, "none")
    return workdir


@pytest.mark.slow
def test_student_learns_from_workdir_and_huggingface_teacher(teacher, data_dir, tmp_path):
    from models import hf_cli
    tok = str(teacher / "tokenizer")
    plain = train_and_evaluate(ft_config(data_dir, data__tokenizer=tok), tmp_path / "plain", "none")
    # alpha 0: the teacher runs but its term has no weight, so the student trains as alone (bitwise)
    # (and a bfloat16 teacher: half the bytes)
    zero = train_and_evaluate(ft_config(data_dir, data__tokenizer=tok, method__distill_from=str(teacher / "best"),
                                        method__distill_alpha=0.0, method__distill_dtype="bfloat16"),
                              tmp_path / "zero", "none")
    assert zero["dev"] == plain["dev"] and zero["test"] == plain["test"]
    assert 2 * zero["distill"]["teacher_bytes"] == zero["distill"]["student_bytes"]
    losses = lambda d, k="train/loss": [m[k] for m in read_metrics(d) if k in m]
    assert losses(tmp_path / "zero") == losses(tmp_path / "plain")

    student = tmp_path / "student"
    results = train_and_evaluate(ft_config(data_dir, data__tokenizer=tok, method__distill_from=str(teacher / "best"),
                                           method__distill_alpha=0.9, method__distill_temperature=4.0),
                                 student, "none")
    record = results["distill"]
    assert record["temperature"] == 4.0 and record["alpha"] == 0.9 and record["teacher_kind"] == "checkpoint"
    assert record["teacher"].startswith(str(teacher / "best" / "checkpoints"))
    assert record["teacher_bytes"] == record["student_bytes"] > 0  # same shape, float32
    pinned = json.loads((student / "run.json").read_text())["resolved"]["method"]["distill_from"]
    assert pinned == record["teacher"]
    assert losses(student) != losses(tmp_path / "plain") and losses(student, "train/kd")[0] > 0
    # The teacher is in no checkpoint: the student's state only.
    assert jax.tree.structure(read_params(student)[0]) == jax.tree.structure(read_params(tmp_path / "plain")[0])

    # The same teacher as a HuggingFace folder gives the same soft targets.
    hf = tmp_path / "hf"
    hf_cli.main(["export", "--checkpoint", str(teacher / "best"), "--out", str(hf)])
    again = tmp_path / "from_hf"
    train_and_evaluate(ft_config(data_dir, data__tokenizer=tok, method__distill_from=str(hf),
                                 method__distill_alpha=0.9, method__distill_temperature=4.0), again, "none")
    np.testing.assert_allclose(losses(again, "train/kd"), losses(student, "train/kd"), rtol=2e-4)


def test_missing_teacher_is_one_line_and_writes_nothing(data_dir, tmp_path, capsys):
    flags = [f"--config.{k}={v}" for k, v in {**TINY_FT, "data.data_dir": data_dir}.items()]
    workdir = tmp_path / "w"
    err = cli_error(capsys, main, ["--workdir", str(workdir), "--init", "none", *flags,
                                   f"--config.method.distill_from={tmp_path / 'nope'}"])
    assert "method.distill_from" in err and "no such folder" in err
    assert not workdir.exists() or [p.name for p in workdir.iterdir()] == []


@pytest.mark.slow
def test_bad_teachers_are_one_line_and_write_nothing(teacher, data_dir, tmp_path, capsys):
    from models import hf_cli
    from models.tokenizer import Tokenizer
    runs = iter(range(100))
    flags = [f"--config.{k}={v}" for k, v in {**TINY_FT, "data.data_dir": data_dir}.items()]
    tok = f"--config.data.tokenizer={teacher / 'tokenizer'}"

    def error(*extra):
        workdir = tmp_path / f"w{next(runs)}"
        err = cli_error(capsys, main, ["--workdir", str(workdir), "--init", "none", *flags, *extra])
        assert not any(workdir.glob("*")) if workdir.exists() else True, list(workdir.iterdir())
        return err

    assert "no such folder" in error(tok, f"--config.method.distill_from={tmp_path / 'nope'}")
    teach = f"--config.method.distill_from={teacher}"
    assert "needs the teacher's tokenizer" in error(teach)
    other = tmp_path / "other_tok"
    Tokenizer.train(["a completely different vocabulary of words"] * 20, 64).save(other)
    assert "has another tokenizer" in error(teach, f"--config.data.tokenizer={other}")
    err = error(tok, teach, "--config.data.task=reuters_r8")
    assert "fine-tuned on rt_polarity" in err and "label set" in err
    hf = tmp_path / "hf_labels"
    hf_cli.main(["export", "--checkpoint", str(teacher / "best"), "--out", str(hf), "--labels", "good,bad"])
    assert "predicts labels ['good', 'bad']" in error(tok, f"--config.method.distill_from={hf}")
    assert "teacher dtype" in error(tok, teach, "--config.method.distill_dtype=int8")
