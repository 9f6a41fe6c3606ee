"""`python -m pretrain` end to end: resume after SIGTERM is bitwise exact; bad input is one line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import cli_error, sigterm_when, tiny_flags
from pretrain.__main__ import main
from training.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]


def cli(workdir, data_dir, **extra) -> list[str]:
    return [sys.executable, "-m", "pretrain", "--workdir", str(workdir), *tiny_flags(data_dir, **extra)]


def losses(workdir) -> dict[int, float]:
    return {m["step"]: m["train/loss"] for m in read_metrics(workdir) if "train/loss" in m}


@pytest.mark.slow  # whole runs or a long compile: the default pytest stays under 15 minutes
def test_sigterm_then_rerun_resumes_bitwise(tmp_path, data_dir):
    steps = dict(train__steps=14, checkpoint__every_steps=4)
    full = subprocess.run(cli(tmp_path / "full", data_dir, **steps), cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert full.returncode == 0, full.stderr[-2000:]

    workdir = tmp_path / "stopped"
    _, out = sigterm_when(cli(workdir, data_dir, **steps),
                          lambda: max(losses(workdir), default=0) >= 6)
    stopped_at = max(losses(workdir))
    assert 6 <= stopped_at < 14, "the run finished before it was stopped; nothing was tested"
    assert f"SIGTERM: stopped at step {stopped_at}" in out
    assert (workdir / "checkpoints" / str(stopped_at)).is_dir()

    again = subprocess.run(cli(workdir, data_dir, **steps), cwd=REPO,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert losses(workdir) == losses(tmp_path / "full")  # every step, bitwise
    assert sorted(losses(workdir)) == list(range(1, 15))


def one_line_error(capsys, argv) -> str:
    return cli_error(capsys, main, argv)


def test_unknown_config_key_names_the_closest(capsys, tmp_path):
    err = one_line_error(capsys, ["--workdir", str(tmp_path), "--config.train.bach_size=8"])
    assert "did you mean --config.train.batch_size" in err


def test_mesh_that_does_not_match_the_devices(capsys, tmp_path, data_dir):
    err = one_line_error(capsys, ["--workdir", str(tmp_path), *tiny_flags(data_dir), "--config.mesh.data=3"])
    assert "(3, 1, 1)" in err and "there are 8" in err


def test_batch_not_divisible_by_data_parallel_size(capsys, tmp_path, data_dir):
    err = one_line_error(capsys, ["--workdir", str(tmp_path), *tiny_flags(data_dir),
                                  "--config.train.batch_size=12"])
    assert "not divisible by the data-parallel size 8" in err


def test_workdir_of_another_model_shape(capsys, tmp_path, data_dir):
    main(["--workdir", str(tmp_path), *tiny_flags(data_dir, train__steps=1)])
    config_before = (tmp_path / "config.json").read_text()
    capsys.readouterr()  # the first run's progress bar
    err = one_line_error(capsys, ["--workdir", str(tmp_path), *tiny_flags(data_dir, train__steps=1),
                                  "--config.model.size=mini"])
    assert "shape" in err and "another --workdir" in err
    assert (tmp_path / "config.json").read_text() == config_before  # nothing written is lost
    assert json.loads(config_before)["model"]["size"] == "tiny"
    # The same model in the other layer layout: says which layout resumes, and how to convert.
    err = one_line_error(capsys, ["--workdir", str(tmp_path), *tiny_flags(data_dir, train__steps=2),
                                  "--config.model.scan_layers=true"])
    assert "holds the unrolled layer stack" in err and "--config.model.scan_layers=false" in err
