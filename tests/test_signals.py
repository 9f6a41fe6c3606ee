"""Signals at any moment: SIGTERM or Ctrl-C (SIGINT) during start-up ends with one line and status
0 or 130, and the rerun starts normally; Ctrl-C during training saves, and the rerun resumes
bitwise. A run that diverges says whether there is a checkpoint to resume from."""

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_config, tiny_flags
from training.errors import UserError
from training.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]

# Pretraining that says when it is restoring (start-up: after the lease, before any step) and
# lingers there long enough for a signal to land.
SLOW_START = """
import time
from training.checkpoint import Checkpointer
restore_latest = Checkpointer.restore_latest
def slow(self, abstract_state):
    print("restoring", flush=True)
    time.sleep(60)
    return restore_latest(self, abstract_state)
Checkpointer.restore_latest = slow
from pretrain.__main__ import main
main()
"""


def cli(workdir, data_dir, program=("-m", "pretrain"), **extra) -> list[str]:
    return [sys.executable, *program, "--workdir", str(workdir), *tiny_flags(data_dir, **extra)]


def losses(workdir) -> dict[int, float]:
    return {m["step"]: m["train/loss"] for m in read_metrics(workdir) if "train/loss" in m}


def signal_when(command, ready_line: str, signum) -> subprocess.CompletedProcess:
    """Run `command`, send `signum` once it prints `ready_line`."""
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.strip() == ready_line:
                proc.send_signal(signum)
                break
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


@pytest.mark.slow  # whole runs: the default pytest stays under 15 minutes
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_a_signal_during_start_up_is_one_line_and_the_rerun_starts(tmp_path, data_dir, signum, code):
    workdir = tmp_path / "run"
    stopped = signal_when(cli(workdir, data_dir, ("-c", SLOW_START), train__steps=2), "restoring", signum)
    name = signal.Signals(signum).name
    assert stopped.returncode == code, stopped.stderr[-3000:]
    lines = stopped.stderr.strip().splitlines()
    assert lines[-1] == (f"{name}: stopped outside the training steps, nothing new to save; run the "
                         f"same command again to resume"), stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr and not losses(workdir)
    assert not (workdir / "lease.json").exists()  # released on the way out
    again = subprocess.run(cli(workdir, data_dir, train__steps=2), cwd=REPO, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(losses(workdir)) == [1, 2]


@pytest.mark.slow  # three CLI runs
def test_ctrl_c_during_training_saves_and_the_rerun_resumes_bitwise(tmp_path, data_dir):
    steps = dict(train__steps=10, checkpoint__every_steps=4)
    full = subprocess.run(cli(tmp_path / "full", data_dir, **steps), cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert full.returncode == 0, full.stderr[-2000:]
    workdir = tmp_path / "stopped"
    proc = subprocess.Popen(cli(workdir, data_dir, **steps), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        import time
        deadline = time.time() + 300
        while max(losses(workdir), default=0) < 5 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    stopped_at = max(losses(workdir))
    assert proc.returncode == 0 and 5 <= stopped_at < 10, err[-3000:]
    assert f"SIGINT: stopped at step {stopped_at}" in out and "Traceback" not in err
    assert (workdir / "checkpoints" / str(stopped_at)).is_dir()
    again = subprocess.run(cli(workdir, data_dir, **steps), cwd=REPO, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert losses(workdir) == losses(tmp_path / "full")  # every step, bitwise


@pytest.mark.slow  # two in-process runs
def test_divergence_says_whether_there_is_a_checkpoint(tmp_path, data_dir):
    from pretrain.train import train_and_evaluate
    config = lambda every: tiny_config(**{"data.data_dir": str(data_dir), "train.steps": 6,
                                          "optim.lr": 1e30, "optim.warmup_steps": 0,
                                          "optim.clip_norm": 0.0, "checkpoint.every_steps": every})
    with pytest.raises(UserError, match=r"loss became .* there is no checkpoint yet, so it starts "
                                        r"from the beginning"):
        train_and_evaluate(config(1000), tmp_path / "none")
    with pytest.raises(UserError, match=r"resume from the last good checkpoint \(step 1\)"):
        train_and_evaluate(config(1), tmp_path / "one")
