"""One run per workdir: `<workdir>/lease.json` names the run that holds the workdir.

    with WorkdirLease(workdir):
        ...  # the run; call lease.check() at log steps

Process 0 takes the lease (every process learns the outcome by one collective), refreshes it
every `refresh_s` seconds from a daemon thread, and removes it at the end. A second run on a
workdir whose holder is alive stops with one line naming the holder. A holder that is gone is
taken over, so a rerun after a SIGKILL just works: on the same host its pid is dead (or now
belongs to a newer process); on another host its last refresh is older than `stale_s`.

Two runs starting within a moment of each other both write; each then reads the lease back after
`settle_s` and only the last writer goes on. If a slow write still slips through, the loser
finds another token at its next refresh and `check()` stops it.

Refreshes that fail (a full disk, a bucket that refuses) are retried; once they have failed for
longer than half of `stale_s` in a row, another host could soon take the workdir over, so the
refresh thread gives up and `check()` stops the run with one line.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid

from etils import epath

from training import storage
from training.errors import UserError

LEASE_FILE = "lease.json"
HOST = socket.gethostname()


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks) of a Linux process, or None where /proc cannot tell."""
    try:
        text = open(f"/proc/{pid}/stat").read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (command) ": state is first
    return fields[0], int(fields[19])


def _pid_alive(pid, start) -> bool:
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    stat = _proc_stat(pid)
    if stat is None:
        return True
    state, started = stat
    # A zombie has exited; a different start time means the pid was reused.
    return state != "Z" and (start is None or start == started)


def holder_alive(held: dict | None, stale_s: float = 300.0) -> bool:
    """Whether the process a lease (or a record like it: host, pid, pid_start, refreshed) names
    is alive: by its pid on this host, by a refresh newer than `stale_s` on another."""
    if not held:
        return False
    if held.get("host") == HOST:
        return _pid_alive(held.get("pid"), held.get("pid_start"))
    refreshed = held.get("refreshed")
    return isinstance(refreshed, (int, float)) and time.time() - refreshed < stale_s


def read_lease(workdir) -> dict | None:
    """`<workdir>/lease.json` as written, None when there is none; {} when it cannot be parsed."""
    return WorkdirLease(workdir)._read()


def worker_record() -> dict:
    """This process as a lease names it, for `holder_alive` (training/search.py's trials)."""
    stat = _proc_stat(os.getpid())
    return {"host": HOST, "pid": os.getpid(), "pid_start": stat and stat[1], "refreshed": time.time()}


def _describe(held: dict, now: float) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(held.get("started", 0)))
    age = now - held.get("refreshed", 0)
    return f"pid {held.get('pid')} on host {held.get('host')}, started {started}, refreshed {age:.0f} s ago"


class WorkdirLease:
    """Holds `<workdir>/lease.json` for the length of a `with` block, on process 0."""

    def __init__(self, workdir, refresh_s: float = 30.0, stale_s: float = 300.0,
                 settle_s: float = 0.2):
        self.workdir = epath.Path(workdir)
        self.path = self.workdir / LEASE_FILE
        self.refresh_s, self.stale_s, self.settle_s = refresh_s, stale_s, settle_s
        self.token = uuid.uuid4().hex
        self._started = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost: str | None = None  # set by the refresh thread: who took the lease
        self._failing: str | None = None  # set by the refresh thread: refreshes keep failing

    # ---- the lease file --------------------------------------------------------------------

    def _read(self) -> dict | None:
        """The lease as written, None when there is none; {} when it cannot be parsed."""
        try:
            held = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError):
            return {}
        return held if isinstance(held, dict) else {}

    def _write(self) -> None:
        lease = {**worker_record(), "started": self._started, "token": self.token,
                 "command": " ".join(sys.argv)[:500]}
        # Readers see the old lease or the new one, never half of one.
        storage.write_whole(self.path, (json.dumps(lease) + "\n").encode())

    def _holder_alive(self, held: dict) -> bool:
        return holder_alive(held, self.stale_s)

    def _refusal(self, held: dict) -> str:
        if not held:  # lost a race with a run that started at the same moment
            return (f"{self.workdir} is being taken by another run that started at the same "
                    f"time; let it run, or pass another --workdir")
        text = f"{self.workdir} is in use by another run ({_describe(held, time.time())})"
        if held.get("host") != HOST:
            text += (f"; if that run is gone, its lease expires {self.stale_s:.0f} s after its "
                     f"last refresh, or delete {self.path} once you are sure")
        return text + "; wait for it to finish or stop it, or pass another --workdir"

    def _acquire(self) -> None:
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
            held = self._read()
            if held is not None and self._holder_alive(held):
                raise UserError(self._refusal(held))
            if held is not None:
                what = _describe(held, time.time()) if held else "unreadable"
                print(f"taking over the lease on {self.workdir} from a run that is gone ({what})",
                      file=sys.stderr, flush=True)
            self._write()
            time.sleep(self.settle_s)
            held = self._read()
        except OSError as e:
            raise UserError(f"cannot write the lease {self.path}: {e}; check that the workdir "
                            f"is writable") from e
        if not held or held.get("token") != self.token:
            raise UserError(self._refusal(held or {}))

    def _refresh_forever(self) -> None:
        failures, last_ok = 0, time.monotonic()
        while not self._stop.wait(self.refresh_s):
            try:
                held = self._read()
                if held is None or held.get("token") != self.token:
                    self._lost = _describe(held, time.time()) if held else "the lease file is gone"
                    return
                self._write()
                failures, last_ok = 0, time.monotonic()
            except OSError as e:  # a storage hiccup passes; a lasting failure stops the run
                failures += 1
                failing_s = time.monotonic() - last_ok
                if failures >= 2 and failing_s >= self.stale_s / 2:
                    self._failing = (f"{failures} refreshes in a row over {failing_s:.0f} s "
                                     f"failed, the last with: {e}")
                    return

    # ---- the run ---------------------------------------------------------------------------

    def __enter__(self) -> WorkdirLease:
        import jax  # here: the lease module stays importable without a JAX backend
        from training import collectives

        refusal = None
        if jax.process_index() == 0:
            try:
                self._acquire()
            except UserError as e:
                refusal = str(e)
        if collectives.any_process(refusal is not None):
            if refusal is None:  # another process's view: read the holder for the message
                refusal = self._refusal(self._read() or {})
            raise UserError(refusal)
        if jax.process_index() == 0:
            self._thread = threading.Thread(target=self._refresh_forever, daemon=True,
                                            name="workdir-lease")
            self._thread.start()
        return self

    def check(self) -> None:
        """Raise a UserError if another run has taken the lease. Call on every process at the
        same steps (one small collective in multi-process runs)."""
        from training import collectives
        if collectives.any_process(self._failing is not None):
            failing = self._failing or "seen by process 0"
            raise UserError(f"cannot refresh the lease {self.path} ({failing}); stopping rather "
                            f"than running on without a claim on the workdir: fix the storage, "
                            f"then run again to resume")
        if collectives.any_process(self._lost is not None):
            raise UserError(f"{self.workdir} was taken over by another run "
                            f"({self._lost or 'seen by process 0'}); two runs must not share a "
                            f"workdir: stop one of them")

    def __exit__(self, *exc) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        try:
            held = self._read()
            if held and held.get("token") == self.token:
                self.path.unlink()
        except OSError:
            pass  # a lease left behind is taken over by the next run
