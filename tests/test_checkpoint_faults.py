"""Checkpoints under faults: damaged steps are moved aside and the one before restores; storage
errors while saving are one UserError line naming the step and the folder; nothing written is lost."""

import errno
import os
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath

from conftest import mounted_tmpfs
from models import hf, hf_cli
from training.checkpoint import Checkpointer
from training.checkpoint_reader import read_params
from training.errors import UserError

# A handler patched to fail leaves the other handlers' save coroutines unstarted.
NEVER_AWAITED = pytest.mark.filterwarnings("ignore:coroutine .* was never awaited")
SHARDING = jax.sharding.SingleDeviceSharding(jax.devices()[0])
SHAPE = (4, 3)


def state(step: int, shape=SHAPE) -> dict:
    return {"params": {"encoder": {"layers": {0: {"w": jnp.full(shape, step, jnp.float32)}}}},
            "step": jnp.int32(step)}


def target(shape=SHAPE) -> dict:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=SHARDING),
                        state(0, shape))


def save(workdir, steps, keep=3, shape=SHAPE) -> None:
    ckpt = Checkpointer(workdir, every_steps=1, keep=keep)
    for s in steps:
        assert ckpt.maybe_save(s, state(s, shape), {"iterator": {"position": s}})
    ckpt.wait()
    ckpt.close()


def truncate(path) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def files(folder) -> list:
    return sorted(p for p in folder.rglob("*") if p.is_file())


DAMAGE = {
    "truncated array files": lambda d: [truncate(p) for p in files(d / "state" / "d")],
    "missing array files": lambda d: [p.unlink() for p in files(d / "state" / "d")],
    "truncated array metadata": lambda d: truncate(d / "state" / "_METADATA"),  # was JSONDecodeError
    "deleted array metadata": lambda d: (d / "state" / "_METADATA").unlink(),   # was TypeError
    "corrupt data-iterator JSON": lambda d: truncate(d / "data" / "metadata"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_latest_is_moved_aside_and_the_one_before_restores(tmp_path, capsys, damage):
    save(tmp_path, [1, 2])
    DAMAGE[damage](tmp_path / "checkpoints" / "2")
    before = len(files(tmp_path / "checkpoints" / "2"))
    ckpt = Checkpointer(tmp_path, every_steps=1, keep=3)
    step, restored, data_state = ckpt.restore_latest(target())
    assert step == 1 and data_state == {"iterator": {"position": 1}}
    np.testing.assert_array_equal(restored["params"]["encoder"]["layers"][0]["w"], np.ones(SHAPE))
    err = capsys.readouterr().err.strip().splitlines()
    moved = tmp_path / "checkpoints_quarantine" / "2"
    assert len(err) == 1 and f"{tmp_path}/checkpoints/2 cannot be read" in err[0] and str(moved) in err[0]
    assert len(files(moved)) == before  # moved, nothing deleted
    assert ckpt.latest_step() == 1 and ckpt.maybe_save(2, state(2), {"iterator": {"position": 2}})
    ckpt.wait()
    ckpt.close()
    assert Checkpointer(tmp_path, 1, 3).restore_latest(target())[0] == 2  # the new step 2


def test_restoring_one_damaged_step_is_one_line(tmp_path):
    save(tmp_path, [1, 2])
    DAMAGE["truncated array metadata"](tmp_path / "checkpoints" / "2")
    with pytest.raises(UserError, match="checkpoints/2 cannot be read .*checkpoints_quarantine") as e:
        Checkpointer(tmp_path, 1, 3).restore(2, target())  # was a JSONDecodeError traceback
    assert "\n" not in str(e.value)


def test_a_step_damaged_twice_keeps_both_copies(tmp_path, capsys):
    save(tmp_path, [1, 2])
    for copy in ("2", "2-1"):
        DAMAGE["truncated array metadata"](tmp_path / "checkpoints" / "2")
        assert Checkpointer(tmp_path, 1, 3).restore_latest(target())[0] == 1
        assert (tmp_path / "checkpoints_quarantine" / copy).is_dir()
        save(tmp_path, [2])


def test_no_readable_checkpoint_is_one_line_and_keeps_them_all(tmp_path, capsys):
    save(tmp_path, [1, 2])
    for step in ("1", "2"):
        DAMAGE["truncated array metadata"](tmp_path / "checkpoints" / step)
    with pytest.raises(UserError, match="no checkpoint in .* can be read") as e:
        Checkpointer(tmp_path, 1, 3).restore_latest(target())
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in (tmp_path / "checkpoints_quarantine").iterdir()) == ["1", "2"]
    assert Checkpointer(tmp_path, 1, 3).restore_latest(target()) is None  # a fresh start now


def test_another_model_is_not_damage(tmp_path):
    save(tmp_path, [1])
    with pytest.raises(UserError, match="shape"):
        Checkpointer(tmp_path, 1, 3).restore_latest(target((5, 3)))
    assert (tmp_path / "checkpoints" / "1").is_dir() and not (tmp_path / "checkpoints_quarantine").exists()


# Errors that say nothing about the files: code or a library reading them differently.
NOT_DAMAGE = {
    "KeyError reading the arrays": (ocp.StandardCheckpointHandler, "restore"),
    "KeyError reading the metadata": (ocp.CheckpointManager, "item_metadata"),
}


@pytest.mark.parametrize("where", NOT_DAMAGE)
def test_a_restore_error_that_is_not_damage_stops_and_moves_nothing(tmp_path, capsys, monkeypatch, where):
    save(tmp_path, [1, 2])
    before = files(tmp_path / "checkpoints")
    owner, name = NOT_DAMAGE[where]

    def fails(*args, **kwargs):
        raise KeyError("params")
    monkeypatch.setattr(owner, name, fails)
    with pytest.raises(UserError, match=r"checkpoint .*checkpoints/2 failed with KeyError: 'params'"
                                        r".*every checkpoint was left in place") as e:
        Checkpointer(tmp_path, 1, 3).restore_latest(target())
    assert "\n" not in str(e.value) and capsys.readouterr().err == ""  # no "moved it" warning
    assert files(tmp_path / "checkpoints") == before and not (tmp_path / "checkpoints_quarantine").exists()
    monkeypatch.undo()  # the control: real damage is still set aside
    DAMAGE["truncated array files"](tmp_path / "checkpoints" / "2")
    assert Checkpointer(tmp_path, 1, 3).restore_latest(target())[0] == 1
    assert (tmp_path / "checkpoints_quarantine" / "2").is_dir()


def test_metadata_that_reads_without_params_is_not_damage(tmp_path, monkeypatch):
    save(tmp_path, [1])
    monkeypatch.setattr(ocp.CheckpointManager, "item_metadata", lambda self, step: {"state": {}})
    with pytest.raises(UserError, match="has state/_METADATA but no params .*left in place"):
        Checkpointer(tmp_path, 1, 3).restore_latest(target())
    assert (tmp_path / "checkpoints" / "1").is_dir() and not (tmp_path / "checkpoints_quarantine").exists()


def test_read_params_and_export_report_a_damaged_checkpoint_in_one_line(tmp_path, capsys):
    save(tmp_path, [1, 2])
    (tmp_path / "config.json").write_text('{"model": {"size": "tiny"}, "data": {}}')
    DAMAGE["truncated array metadata"](tmp_path / "checkpoints" / "2")
    with pytest.raises(UserError, match="checkpoints/2 cannot be read .*corrupt JSON"):
        read_params(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        hf_cli.main(["export", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "hf")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: checkpoint") and "\n" not in err
    assert (tmp_path / "checkpoints" / "2").is_dir()  # reading never moves anything
    params, step = read_params(tmp_path / "checkpoints" / "1")  # an older step still reads
    assert step == 1 and list(params["encoder"]["layers"]) == [0]  # int layer keys


# ---- storage errors while saving ------------------------------------------------------------

def failing_writes(monkeypatch, under, exc, slow_seconds=0.0):
    """Writes of epath (Orbax's storage layer for metadata and JSON) under `under` raise `exc`
    while the patch is in place. With `slow_seconds`, every write but the step's metadata first
    waits that long and then fails only if the storage is still failing: a save whose step
    metadata has failed while its items are still being written."""
    cls = type(epath.Path("/"))
    original = cls.write_text
    failing = [True]

    def write_text(self, *args, **kwargs):
        if str(self).startswith(str(under)):
            if slow_seconds and self.name != "_CHECKPOINT_METADATA":
                time.sleep(slow_seconds)
            if failing[0]:
                raise exc
        return original(self, *args, **kwargs)
    monkeypatch.setattr(cls, "write_text", write_text)

    def recover():  # the storage works again, also for writes already under way
        failing[0] = False
        monkeypatch.undo()
    return recover


def check_until_raised(ckpt, seconds=30):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ckpt.check()  # never blocks
        time.sleep(0.02)
    raise AssertionError("the failed background save was never reported")


@pytest.mark.parametrize("surfaces_in", ["check", "wait", "next save"])
def test_background_save_failure_names_the_step_and_keeps_the_last_one(tmp_path, monkeypatch, surfaces_in):
    ckpt = Checkpointer(tmp_path, every_steps=1, keep=1)  # keep=1: step 1 is due for deletion
    assert ckpt.maybe_save(1, state(1), {"iterator": {"position": 1}})
    ckpt.wait()
    threads = set(threading.enumerate())
    # The step's metadata fails at once while its items are still being written: Orbax's close
    # stops at the first error, and a close that returned then left those writes running.
    recover = failing_writes(monkeypatch, tmp_path / "checkpoints",
                             OSError(errno.ENOSPC, "No space left on device"), slow_seconds=1.0)
    assert ckpt.maybe_save(2, state(2), {"iterator": {"position": 2}})  # the writes run on later
    with pytest.raises(UserError) as e:
        {"check": lambda: check_until_raised(ckpt), "wait": ckpt.wait,
         "next save": lambda: ckpt.maybe_save(3, state(3), {})}[surfaces_in]()
    message = str(e.value)
    assert "\n" not in message and "No space left on device" in message
    assert f"checkpoint step 2 to {tmp_path / 'checkpoints'} failed" in message
    assert "resume from step 1" in message
    ckpt.close()  # the run stops while the storage still fails: nothing of step 2 may write after
    writers = [t.name for t in set(threading.enumerate()) - threads  # idle asyncio loops aside
               if t.is_alive() and not t.name.startswith("asyncio")]
    assert not writers, f"close returned while these threads of the failed save still run: {writers}"
    recover()
    time.sleep(1.5)  # a write still under way would now succeed and commit step 2
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]
    again = Checkpointer(tmp_path, every_steps=1, keep=1)
    assert again.restore_latest(target())[0] == 1 and again.latest_step() == 1


def test_close_after_a_reported_failure_closes_all_of_orbax(tmp_path, monkeypatch):
    """Orbax's close stops at its failed wait; ours still closes what comes after it."""
    ckpt = Checkpointer(tmp_path, every_steps=1, keep=1)
    failing_writes(monkeypatch, tmp_path / "checkpoints", OSError(errno.ENOSPC, "No space left on device"))
    assert ckpt.maybe_save(1, state(1), {"iterator": {"position": 1}})
    with pytest.raises(UserError):
        ckpt.wait()
    closed = []
    deleter = ckpt._manager._checkpoint_deleter
    monkeypatch.setattr(deleter, "close", lambda: closed.append("deleter"))
    ckpt.close()  # the failure was reported: no second line
    assert closed == ["deleter"]


@NEVER_AWAITED
def test_synchronous_storage_error_is_one_line(tmp_path, monkeypatch):
    save(tmp_path, [1])
    ckpt = Checkpointer(tmp_path, every_steps=1, keep=1)

    def refused(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path))
    monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", refused)
    with pytest.raises(UserError, match=r"checkpoint step 2 to .* failed: \[Errno 13\] Permission denied"):
        ckpt.maybe_save(2, state(2), {})
    monkeypatch.undo()
    assert Checkpointer(tmp_path, 1, 1).restore_latest(target())[0] == 1


@NEVER_AWAITED
def test_a_bug_is_not_dressed_as_a_storage_error(tmp_path, monkeypatch):
    ckpt = Checkpointer(tmp_path, every_steps=1, keep=1)

    def bug(*args, **kwargs):
        raise TypeError("a bug keeps its traceback")
    monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", bug)
    with pytest.raises(TypeError, match="a bug"):
        ckpt.maybe_save(1, state(1), {})


def test_a_checkpoint_folder_that_cannot_be_made(tmp_path):
    (tmp_path / "checkpoints").write_text("a file where the folder goes")
    ckpt = Checkpointer(tmp_path, 1, 1)
    assert ckpt.restore_latest(target()) is None
    with pytest.raises(UserError, match=r"checkpoint step 1 to .*checkpoints failed: .*Not a directory"):
        ckpt.maybe_save(1, state(1), {})
        ckpt.wait()


@pytest.fixture
def small_disk(tmp_path):
    """A 512 KiB tmpfs, where the machine lets the test mount one (root, mount permitted)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    with mounted_tmpfs(mount, "size=512k"):
        yield mount


def test_a_full_disk_is_one_line_and_the_last_checkpoint_restores(small_disk):
    shape = (128, 128)  # 64 KiB of float32
    ckpt = Checkpointer(small_disk, every_steps=1, keep=1)
    assert ckpt.maybe_save(1, state(1, shape), {"iterator": {"position": 1}})
    ckpt.wait()
    fd = os.open(small_disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"x" * 4096)
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)
    with pytest.raises(UserError, match="checkpoint step 2 .* No space left on device") as e:
        ckpt.maybe_save(2, state(2, shape), {"iterator": {"position": 2}})
        ckpt.wait()
    assert "\n" not in str(e.value)
    ckpt.close()
    (small_disk / "filler").unlink()
    step, restored, _ = Checkpointer(small_disk, 1, 1).restore_latest(target(shape))
    assert step == 1 and float(restored["params"]["encoder"]["layers"][0]["w"][0, 0]) == 1.0
