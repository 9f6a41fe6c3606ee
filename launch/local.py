"""Run N processes of one multi-process JAX job on this machine.

    python -m launch.local --num_processes 2 --devices_per_process 4 -- python -m pretrain ARGS...

Each process gets the command plus `--coordinator localhost:PORT --num_processes N --process_id I`
(and `--cpu_devices M` with --devices_per_process), with the coordinator on a free port. Their
output is streamed line by line with an `[I] ` prefix. SIGTERM and SIGINT (Ctrl-C) are forwarded
to every process (which then agree on a step, save and exit). If a process fails, the others get
--grace seconds to end on their own and are then killed: the default, 60 s, is longer than the
30 s in which JAX's coordination service notices a lost process (`distributed.heartbeat_timeout_s`),
so they stop with a line that names it. The exit status is 0 when every process
succeeded, else the first failure's (128 + N for a process killed by signal N).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def process_commands(command: list[str], num_processes: int, devices_per_process: int | None,
                     port: int) -> list[list[str]]:
    """The command line of each process."""
    extra = ["--cpu_devices", str(devices_per_process)] if devices_per_process else []
    return [[*command, "--coordinator", f"localhost:{port}", "--num_processes", str(num_processes),
             "--process_id", str(i), *extra] for i in range(num_processes)]


_LINE = re.compile(rb"[^\r\n]*(?:\r\n|\r|\n)")


class _Printer:
    """Writes each process's output to ours, a whole line (or progress-bar update) at a time."""

    def __init__(self, out):
        self._out = out
        self._lock = threading.RLock()  # the signal handler writes too, in the main thread

    def write(self, prefix: bytes, data: bytes) -> None:
        with self._lock:
            self._out.write(prefix + data)
            self._out.flush()

    def pump(self, index: int, stream) -> None:
        prefix, pending = f"[{index}] ".encode(), b""
        for chunk in iter(lambda: stream.read1(65536), b""):
            pending += chunk
            end = 0
            for m in _LINE.finditer(pending):
                self.write(prefix, m.group())
                end = m.end()
            pending = pending[end:]
        if pending:
            self.write(prefix, pending + b"\n")


def _die_with_parent() -> None:
    """In the child, before exec: Linux kills it if the launcher dies (even by SIGKILL)."""
    if _libc is not None:
        _libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


try:
    import ctypes
    _libc = ctypes.CDLL(None) if sys.platform.startswith("linux") else None
except OSError:  # pragma: no cover
    _libc = None


GRACE_S = 60.0


def exit_status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def run(command: list[str], num_processes: int, devices_per_process: int | None = None,
        port: int | None = None, grace: float = GRACE_S, out=None) -> int:
    out = out if out is not None else sys.stdout.buffer
    printer = _Printer(out)
    port = port or free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs: list[subprocess.Popen] = []

    def forward(signum, frame):
        printer.write(b"[launch] ", f"{signal.Signals(signum).name}: forwarding to every "
                                    f"process\n".encode())
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    pumps = []
    try:
        for i, cmd in enumerate(process_commands(command, num_processes, devices_per_process, port)):
            # A session of its own: a terminal's Ctrl-C reaches only us, and we forward it once.
            # Started before any thread of ours (preexec_fn and threads do not mix).
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          env=env, start_new_session=True,
                                          preexec_fn=_die_with_parent))
            printer.write(b"[launch] ", f"process {i}: pid {procs[-1].pid}\n".encode())
        for i, p in enumerate(procs):
            pumps.append(threading.Thread(target=printer.pump, args=(i, p.stdout), daemon=True))
            pumps[-1].start()
        first_failure, failed_at = None, None
        while [p.poll() for p in procs].count(None):  # poll() every one: no short cut
            for i, p in enumerate(procs):
                if p.returncode not in (None, 0) and first_failure is None:
                    first_failure, failed_at = i, time.monotonic()
                    printer.write(b"[launch] ", f"process {i} failed (exit status "
                                  f"{exit_status(p.returncode)}); the others get {grace:g} s "
                                  f"to end\n".encode())
            if failed_at is not None and time.monotonic() - failed_at > grace:
                for i, p in enumerate(procs):
                    if p.poll() is None:
                        printer.write(b"[launch] ", f"killing process {i}\n".encode())
                        p.kill()
                        p.wait()
            time.sleep(0.1)
    finally:
        for p in procs:  # only on an exception of our own: never leave processes behind
            if p.poll() is None:
                p.kill()
                p.wait()
        for t in pumps:
            t.join(timeout=5)
        for s, h in previous.items():
            signal.signal(s, h)
    codes = [exit_status(p.returncode) for p in procs]
    if first_failure is None:
        first_failure = next((i for i, c in enumerate(codes) if c), None)
    if first_failure is not None:
        printer.write(b"[launch] ", f"exit statuses {codes}\n".encode())
        return codes[first_failure]
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(prog="python -m launch.local", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_processes", type=int, required=True)
    parser.add_argument("--devices_per_process", type=int, default=None,
                        help="fake CPU devices per process (passed on as --cpu_devices)")
    parser.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
    parser.add_argument("--grace", type=float, default=GRACE_S,
                        help=f"seconds the others get after one process fails (default {GRACE_S:g})")
    args = parser.parse_args(argv[:split])
    command = argv[split + 1:]
    if not command:
        parser.error("no command after --")
    if args.num_processes < 1:
        parser.error("--num_processes must be at least 1")
    try:
        return run(command, args.num_processes, args.devices_per_process, args.port, args.grace)
    except FileNotFoundError as e:
        print(f"error: cannot start {command[0]!r}: {e.strerror}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
