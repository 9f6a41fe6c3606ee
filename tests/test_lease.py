"""One run per workdir: a live holder refuses a second run; a dead or stale one is taken over."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from training.errors import UserError
from training.lease import HOST, LEASE_FILE, WorkdirLease

REPO = Path(__file__).resolve().parents[1]
HOLDER = """
import sys, time
from training.lease import WorkdirLease
with WorkdirLease(sys.argv[1], refresh_s=0.1, settle_s=0):
    print("holding", flush=True)
    time.sleep(600)
"""


def lease_of(workdir) -> dict:
    return json.loads((Path(workdir) / LEASE_FILE).read_text())


def write_lease(workdir, **fields) -> None:
    lease = {"host": HOST, "pid": os.getpid(), "pid_start": None, "started": time.time(),
             "refreshed": time.time(), "token": "theirs", **fields}
    Path(workdir, LEASE_FILE).write_text(json.dumps(lease))


@pytest.fixture
def holder(tmp_path):
    """A real second process holding the lease on tmp_path."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert proc.stdout.readline().strip() == "holding", proc.stderr.read()
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_a_live_holder_refuses_then_a_sigkilled_one_is_taken_over(tmp_path, holder, capsys):
    with pytest.raises(UserError) as e:
        with WorkdirLease(tmp_path, settle_s=0):
            pass
    message = str(e.value)
    assert "\n" not in message and f"pid {holder.pid} on host {HOST}" in message
    assert "another --workdir" in message
    assert lease_of(tmp_path)["pid"] == holder.pid  # the refused run leaves the lease alone

    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert lease_of(tmp_path)["pid"] == holder.pid  # SIGKILL left its lease behind
    with WorkdirLease(tmp_path, settle_s=0) as lease:
        assert lease_of(tmp_path)["token"] == lease.token
    assert "taking over the lease" in capsys.readouterr().err
    assert not (tmp_path / LEASE_FILE).exists()  # released at the end


def test_the_holder_refreshes_its_lease(tmp_path, holder):
    first = lease_of(tmp_path)["refreshed"]
    deadline = time.time() + 30
    while lease_of(tmp_path)["refreshed"] == first and time.time() < deadline:
        time.sleep(0.05)
    assert lease_of(tmp_path)["refreshed"] > first


def test_another_host_is_refused_while_fresh_and_taken_over_when_stale(tmp_path):
    write_lease(tmp_path, host="other-host", pid=1)
    with pytest.raises(UserError, match=r"pid 1 on host other-host.*expires 60 s after"):
        with WorkdirLease(tmp_path, stale_s=60, settle_s=0):
            pass
    write_lease(tmp_path, host="other-host", pid=1, refreshed=time.time() - 61)
    with WorkdirLease(tmp_path, stale_s=60, settle_s=0) as lease:
        assert lease_of(tmp_path)["token"] == lease.token


@pytest.mark.parametrize("left_behind", ["reused pid", "unreadable"])
def test_a_lease_that_names_no_live_run_is_taken_over(tmp_path, left_behind):
    if left_behind == "reused pid":  # our pid, but a start time that is not ours: pid reused
        write_lease(tmp_path, pid=os.getpid(), pid_start=1)
    else:
        (tmp_path / LEASE_FILE).write_text('{"host": "x", "pi')
    with WorkdirLease(tmp_path, settle_s=0) as lease:
        assert lease_of(tmp_path)["token"] == lease.token


def test_a_run_whose_lease_was_taken_stops_at_its_next_check(tmp_path):
    with WorkdirLease(tmp_path, refresh_s=0.05, settle_s=0) as lease:
        lease.check()
        write_lease(tmp_path, host="other-host", pid=7)  # a run that took it over meanwhile
        deadline = time.time() + 30
        with pytest.raises(UserError, match="taken over by another run .*pid 7 on host other-host"):
            while time.time() < deadline:
                lease.check()
                time.sleep(0.02)
    assert lease_of(tmp_path)["token"] == "theirs"  # the loser does not remove the winner's lease


def failing_writes(monkeypatch, fail_times: list):
    """Lease writes fail with a full disk while `fail_times` (a list of one bool) says so."""
    from training import storage
    write = storage.write_whole

    def maybe_fails(path, data):
        if fail_times[0]:
            raise OSError(28, "No space left on device")
        return write(path, data)
    monkeypatch.setattr(storage, "write_whole", maybe_fails)


def test_refreshes_that_keep_failing_stop_the_run(tmp_path, monkeypatch):
    failing = [False]
    failing_writes(monkeypatch, failing)
    with WorkdirLease(tmp_path, refresh_s=0.05, stale_s=0.5, settle_s=0) as lease:
        failing[0] = True
        deadline = time.time() + 30
        with pytest.raises(UserError) as e:
            while time.time() < deadline:
                lease.check()
                time.sleep(0.02)
    message = str(e.value)
    assert "\n" not in message and f"cannot refresh the lease {tmp_path}/{LEASE_FILE}" in message
    assert "refreshes in a row" in message and "No space left on device" in message
    assert "run again to resume" in message


def test_a_refresh_hiccup_shorter_than_half_the_expiry_is_retried(tmp_path, monkeypatch):
    failing = [False]
    failing_writes(monkeypatch, failing)
    with WorkdirLease(tmp_path, refresh_s=0.05, stale_s=60, settle_s=0) as lease:
        failing[0] = True
        time.sleep(0.5)  # several failed refreshes, all within half of the 60 s expiry
        failing[0] = False
        first = lease_of(tmp_path)["refreshed"]
        deadline = time.time() + 30
        while lease_of(tmp_path)["refreshed"] == first and time.time() < deadline:
            time.sleep(0.05)
        lease.check()  # refreshed again and still held: no stop
        assert lease_of(tmp_path)["token"] == lease.token
