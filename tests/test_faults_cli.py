"""Faults seen by `python -m pretrain` as a user meets them: a damaged latest checkpoint heals on
rerun and the losses from there equal an uninterrupted run's; two runs on one workdir; a disk
that fills during a save. Each failure is one line and nothing already written is lost."""

import errno
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from etils import epath

from conftest import mounted_tmpfs, tiny_config, tiny_flags
from test_checkpoint_faults import DAMAGE
from training import loop
from training.errors import UserError
from training.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
STEPS = dict(train__steps=9, checkpoint__every_steps=3, train__log_every=1)


def cli(workdir, data_dir, **extra) -> list[str]:
    return [sys.executable, "-m", "pretrain", "--workdir", str(workdir),
            *tiny_flags(data_dir, **{**STEPS, **extra})]


def losses(workdir) -> dict[int, float]:
    return {m["step"]: m["train/loss"] for m in read_metrics(workdir) if "train/loss" in m}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_dir):
    """A 9-step run with checkpoints at 6 and 9 (keep 2)."""
    workdir = tmp_path_factory.mktemp("finished")
    proc = subprocess.run(cli(workdir, data_dir), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [6, 9]
    return workdir


# One kind of damage in the default run; the others (each also caught in test_checkpoint_faults)
# end to end with -m slow.
@pytest.mark.parametrize("damage", ["truncated array files",
                                    pytest.param("deleted array metadata", marks=pytest.mark.slow),
                                    pytest.param("corrupt data-iterator JSON", marks=pytest.mark.slow)])
def test_a_damaged_latest_checkpoint_is_set_aside_and_the_rerun_replays_bitwise(
        finished, data_dir, tmp_path, damage, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(finished, workdir)
    DAMAGE[damage](workdir / "checkpoints" / "9")
    if "array" in damage:  # the weights are what export and `finetune --init` read (read_params)
        from models import hf, hf_cli
        with pytest.raises(SystemExit):
            hf_cli.main(["export", "--checkpoint", str(workdir / "checkpoints" / "9"), "--out", str(tmp_path / "hf")])
        err = capsys.readouterr().err.strip()
        assert "9" in err and "\n" not in err and "Traceback" not in err, err
    # The metrics of the lost steps go with their checkpoint; the rerun writes them again.
    proc = subprocess.run(cli(workdir, data_dir), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    said = proc.stdout + proc.stderr
    assert "step 9" in said and "checkpoints_quarantine" in said, said[-2000:]
    assert (workdir / "checkpoints_quarantine" / "9").is_dir()  # set aside, never deleted
    assert losses(workdir) == losses(finished)


@pytest.mark.slow  # long: the default run stays under CI's 15 minutes
def test_a_second_run_on_a_live_workdir_is_refused_then_a_killed_one_is_taken_over(tmp_path, data_dir):
    workdir = tmp_path / "run"
    command = cli(workdir, data_dir, train__steps=60, checkpoint__every_steps=2)
    first = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not losses(workdir) and time.time() < deadline and first.poll() is None:
        time.sleep(0.1)
    assert first.poll() is None, "the first run ended before the second started"
    second = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    err = second.stderr.strip().splitlines()[-1]
    assert second.returncode == 2 and err.startswith("error: ") and str(first.pid) in err, second.stderr[-2000:]
    assert not (workdir / "metrics.jsonl").read_text().count("\n\n")  # its metrics not interleaved
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=60)
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert sorted(losses(workdir)) == list(range(1, 61))


@pytest.mark.slow  # two in-process runs and a failed one
def test_a_disk_that_fills_during_a_save_is_one_line_and_the_rerun_resumes_bitwise(
        data_dir, tmp_path, monkeypatch):
    from pretrain.train import train_and_evaluate
    config = lambda: tiny_config(**{"data.data_dir": str(data_dir), "train.steps": 9,
                                    "checkpoint.every_steps": 3, "train.log_every": 1})
    train_and_evaluate(config(), tmp_path / "full")
    cls = type(epath.Path("/"))
    write_text, add = cls.write_text, loop.LogWindow.add
    full = {"disk": False}

    def failing_write_text(self, *args, **kwargs):  # the storage layer Orbax writes through
        if full["disk"] and "checkpoints" in str(self):
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_text(self, *args, **kwargs)

    def fill_the_disk_at_step_6(self, step, out):
        if step == 6:  # once step 3 is written (its commit runs in the background)
            deadline = time.time() + 120
            while not (workdir / "checkpoints" / "3").is_dir() and time.time() < deadline:
                time.sleep(0.05)
            full["disk"] = True
        return add(self, step, out)

    monkeypatch.setattr(cls, "write_text", failing_write_text)
    monkeypatch.setattr(loop.LogWindow, "add", fill_the_disk_at_step_6)
    workdir = tmp_path / "run"
    with pytest.raises(UserError) as e:
        train_and_evaluate(config(), workdir)
    message = str(e.value)
    assert "\n" not in message.strip(), repr(message)
    assert "No space left on device" in message and "step 6" in message and "step 3" in message, message
    monkeypatch.undo()
    assert (workdir / "checkpoints" / "3").is_dir() and not (workdir / "lease.json").exists()
    train_and_evaluate(config(), workdir)
    assert losses(workdir) == losses(tmp_path / "full")


# Pretraining whose disk fills at step 6, once step 3 is saved: a filler file takes the rest.
FILL_THE_DISK = """
import errno, os, sys, time
from pathlib import Path
disk = Path(sys.argv.pop(1))
from training import loop
add = loop.LogWindow.add
def fill_at_6(self, step, out):
    if step == 6:
        deadline = time.time() + 120
        while not (disk / "run" / "checkpoints" / "3").is_dir() and time.time() < deadline:
            time.sleep(0.05)
        fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, b"x" * 65536)
        except OSError as e:
            assert e.errno == errno.ENOSPC
        finally:
            os.close(fd)
    return add(self, step, out)
loop.LogWindow.add = fill_at_6
from pretrain.__main__ import main
main()
"""


@pytest.mark.slow  # two CLI runs besides the module's finished one
def test_a_real_full_disk_ends_with_one_line_and_the_rerun_resumes_bitwise(finished, data_dir, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    with mounted_tmpfs(disk, "size=64m"):
        workdir = disk / "run"
        command = [sys.executable, "-c", FILL_THE_DISK, str(disk), *cli(workdir, data_dir)[3:]]
        failed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
        # After the last progress-bar update, the whole output is one line.
        lines = failed.stderr.replace("\r", "\n").splitlines()
        last_bar = max(i for i, line in enumerate(lines) if line.startswith("pretrain:"))
        after = [line for line in lines[last_bar + 1:] if line.strip()]
        assert failed.returncode == 2 and len(after) == 1, failed.stderr[-5000:]
        assert after[0].startswith("error: saving checkpoint step 6") and "No space left on device" in after[0]
        assert "resume from step 3" in after[0]
        assert "Traceback" not in failed.stderr + failed.stdout and "Event loop is closed" not in failed.stderr
        (disk / "filler").unlink()
        again = subprocess.run(cli(workdir, data_dir), cwd=REPO, capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, again.stderr[-3000:]
        assert losses(workdir) == losses(finished)
