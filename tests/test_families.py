"""Both trainers run a new family through the one step and loop: the linear-regression family of
tests/toy_family.py (one file, one spec), pretrained, stopped and resumed, fine-tuned from its
checkpoint, stopped and resumed, continued with --init and exported through its toy HuggingFace
record. Resumed runs equal uninterrupted ones bitwise, log rows included."""

import contextlib
import json

import jax
import ml_collections
import numpy as np
import pytest
from safetensors.numpy import load_file

import toy_family
from configs import bert_tiny, finetune_rt_polarity
from conftest import stop_at
from finetune.train import train_and_evaluate as finetune
from models import hf_cli
from pretrain.train import train_and_evaluate as pretrain
from training import loop, run_record
from training.checkpoint_reader import read_params
from training.metrics import read_metrics

D, H = len(toy_family.W_TRUE), 4


def configs():
    pre = ml_collections.ConfigDict({k: bert_tiny.get_config()[k] for k in
                                     ("optim", "mesh", "checkpoint", "eval", "wandb")})
    pre.family = toy_family.SPEC.name
    pre.model = dict(inputs=D, hidden=H)
    pre.train = dict(steps=12, batch_size=16, grad_accum=2, seed=0, log_every=4)
    pre.optim.lr, pre.optim.warmup_steps, pre.optim.decay_steps = 0.05, 2, 0
    pre.checkpoint.every_steps, pre.eval.every_steps = 3, 6
    ft = finetune_rt_polarity.get_config()
    ft.family, ft.data.task = toy_family.SPEC.name, "glue/stsb"  # a regression task: pearson, spearman
    ft.train.steps, ft.train.batch_size, ft.train.log_every, ft.eval.every_steps = 9, 8, 2, 3
    ft.optim.lr = 0.05
    return pre, ft


def spy_on_the_loop(monkeypatch) -> list[int]:
    """The steps that training/loop.py's log window saw."""
    steps, add = [], loop.LogWindow.add
    monkeypatch.setattr(loop.LogWindow, "add", lambda self, s, out: (steps.append(s), add(self, s, out))[1])
    return steps


@contextlib.contextmanager
def builds():
    """How many times the toy model is built (traced abstractly, or initialised) meanwhile."""
    count, init = [0], toy_family.Regressor.__init__

    def counting(self, *args, **kwargs):
        count[0] += 1
        init(self, *args, **kwargs)
    toy_family.Regressor.__init__ = counting
    try:
        yield count
    finally:
        toy_family.Regressor.__init__ = init


def train_rows(workdir):
    return [{k: v for k, v in m.items() if not k.startswith("perf/")} for m in read_metrics(workdir)]


def assert_same_params(a, b):
    for x, y in zip(jax.tree.leaves(read_params(a)[0]), jax.tree.leaves(read_params(b)[0])):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    pre, _ = configs()
    workdir = tmp_path_factory.mktemp("linreg_pre")
    last_eval = pretrain(pre, workdir)
    return workdir, last_eval


def test_pretraining_a_new_family_learns_and_resumes_bitwise(pretrained, tmp_path, monkeypatch):
    full, last_eval = pretrained
    rows = train_rows(full)
    assert [r["step"] for r in rows if "train/loss" in r] == [4, 8, 12]
    evals = [r["eval/loss"] for r in rows if "eval/loss" in r]
    assert len(evals) == 3 and evals[0] > evals[1] > evals[2]  # steps 0, 6 and 12: it learns
    assert last_eval["eval/loss"] == evals[-1] and (full / "curves.png").stat().st_size > 0

    pre, _ = configs()
    stop_at(monkeypatch, 5)  # inside a log window (log_every 4) and between checkpoints (every 3)
    steps = spy_on_the_loop(monkeypatch)
    assert pretrain(pre, tmp_path) == {"eval/loss": evals[0]}  # stopped: the start's eval only
    assert (tmp_path / "checkpoints" / "5").is_dir()
    monkeypatch.undo()
    with builds() as built:
        pretrain(pre, tmp_path)
    assert built == [1]  # a resume traces the model once, abstractly (its restore target)
    assert steps == [1, 2, 3, 4, 5]
    assert train_rows(tmp_path) == rows  # the train row of the open window too, bitwise
    assert_same_params(tmp_path, full)


def test_fine_tuning_a_new_family_from_its_checkpoint_resumes_bitwise(pretrained, tmp_path, monkeypatch):
    source, _ = pretrained
    _, ft = configs()
    with builds() as built:
        full = finetune(ft, tmp_path / "full", str(source))
    assert built == [2]  # once abstractly (frozen masks, shardings, restore target), once initialised
    assert full["metric"] == "pearson" and full["dev"]["pearson"] > 0.5
    assert (tmp_path / "full" / "curves.png").is_file()
    np.testing.assert_array_equal(read_params(tmp_path / "full" / "best")[0]["encoder"]["kernel"].shape, (D, H))

    stop_at(monkeypatch, 4)
    steps = spy_on_the_loop(monkeypatch)
    assert finetune(ft, tmp_path / "stopped", str(source)) is None
    monkeypatch.undo()
    assert steps == [1, 2, 3, 4]
    resumed = finetune(ft, tmp_path / "stopped", str(source))
    assert train_rows(tmp_path / "stopped") == train_rows(tmp_path / "full")
    for key in ("dev", "test", "best_step"):
        assert resumed[key] == full[key]
    recorded = run_record.read(tmp_path / "stopped")[1]["source"]
    assert (recorded["init"], recorded["family"], recorded["encoder"]) == (str(source), "linreg", {"inputs": D, "hidden": H})
    assert_same_params(tmp_path / "stopped", tmp_path / "full")


def test_quantisation_aware_fine_tuning_traces_the_model_once_too(pretrained, tmp_path, monkeypatch):
    from models import quantize
    source, _ = pretrained
    _, ft = configs()
    ft.method.quantize = "int8"  # the step trains qwix's fake-quantised graph; the int8 weights are scored
    ft.train.steps = 3
    transformed, qat = [], quantize.qat_model
    monkeypatch.setattr(quantize, "qat_model", lambda model, qtype: (transformed.append(model), qat(model, qtype))[1])
    with builds() as built:
        results = finetune(ft, tmp_path, str(source))
    assert built == [2]  # as a float run: QAT's graph, the int8 channels and the float eval from one trace
    assert len(transformed) == 1 and isinstance(transformed[0], toy_family.Regressor)
    record = results["quantized"]
    assert record["dtype"] == "int8" and record["weights"] == 2 and set(record["dev"]) == set(results["dev"])


def test_continued_with_init_starts_from_the_source_and_exports_through_its_record(pretrained, tmp_path):
    source, last_eval = pretrained
    pre, _ = configs()
    pre.train.steps = 3
    with builds() as built:
        first = pretrain(pre, tmp_path / "continued", str(source))
    assert built == [2]  # a start traces the model once (shapes, shardings) and initialises it once
    rows = read_metrics(tmp_path / "continued")
    assert [r["eval/loss"] for r in rows if "eval/loss" in r][0] == last_eval["eval/loss"]  # same weights, same batch
    assert first["eval/loss"] < last_eval["eval/loss"]  # and it keeps learning
    with builds() as built:
        scratch = pretrain(pre, tmp_path / "scratch")  # the negative control: random weights
    assert built == [2]
    assert [r["eval/loss"] for r in read_metrics(tmp_path / "scratch") if "eval/loss" in r][0] > 2 * last_eval["eval/loss"]
    assert scratch["eval/loss"] > first["eval/loss"]

    hf_cli.main(["export", "--checkpoint", str(source), "--out", str(tmp_path / "hf")])
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    params = read_params(source)[0]
    np.testing.assert_array_equal(tensors["encoder.weight"], params["encoder"]["kernel"].T)
    np.testing.assert_array_equal(tensors["head.weight"], params["head"]["kernel"].T)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["architectures"], config["model_type"], config["input_size"]) == (
        ["ToyLinRegForRegression"], "toy_linreg", D)


def as_before_run_json(workdir):
    """Rewrites a workdir as runs wrote them before run.json: config.json resolved in place, a
    fine-tuning run's source in source.json."""
    config, record = run_record.read(workdir)
    (workdir / "run.json").unlink()
    if record["trainer"] == "finetune":
        (workdir / "source.json").write_text(json.dumps(record["source"]))
        config.pop("init", None)
    (workdir / "config.json").write_text(json.dumps(config))


def test_old_workdirs_with_config_json_only_resume_fine_tune_and_export(pretrained, tmp_path, monkeypatch):
    source, _ = pretrained
    pre, ft = configs()
    old = tmp_path / "old"
    stop_at(monkeypatch, 5)
    pretrain(pre, old)
    monkeypatch.undo()
    as_before_run_json(old)
    pretrain(pre, old)  # resumes from step 5 and ends where the uninterrupted run did
    assert train_rows(old) == train_rows(source)
    assert_same_params(old, source)

    as_before_run_json(old)
    assert finetune(ft, tmp_path / "ft", str(old))["dev"]["pearson"] > 0.5
    hf_cli.main(["export", "--checkpoint", str(old), "--out", str(tmp_path / "hf_old")])
    hf_cli.main(["export", "--checkpoint", str(source), "--out", str(tmp_path / "hf_new")])
    for name, x in load_file(tmp_path / "hf_new" / "model.safetensors").items():
        np.testing.assert_array_equal(load_file(tmp_path / "hf_old" / "model.safetensors")[name], x)

    stop_at(monkeypatch, 4)
    finetune(ft, tmp_path / "ft_old", str(old))
    monkeypatch.undo()
    as_before_run_json(tmp_path / "ft_old")
    resumed = finetune(ft, tmp_path / "ft_old", str(old))  # its source from source.json
    assert train_rows(tmp_path / "ft_old") == train_rows(tmp_path / "ft")
    assert resumed["dev"] == json.loads((tmp_path / "ft" / "results.json").read_text())["dev"]
