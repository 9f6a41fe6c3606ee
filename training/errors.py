"""How the command-line entry points end: a UserError (infra/errors.py) as one line, a signal
outside the training loop as one line, a lost peer of a multi-process run as one line."""

import contextlib
import functools
import signal
import sys
import threading
import traceback

from infra.errors import UserError


class Interrupted(BaseException):
    """SIGTERM or Ctrl-C outside the training loop (which stops at a step and saves)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.code = 130 if signum == signal.SIGINT else 0  # a stop asked for is no failure


@contextlib.contextmanager
def _interruptible():
    """SIGTERM and SIGINT raise Interrupted (from the main thread only, where Python runs
    signal handlers); the training loop's own handlers take over while it runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise Interrupted(signum)
    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def exits_cleanly(main):
    """Wrap a CLI `main` so a UserError becomes one line on stderr and exit status 2, and
    SIGTERM or Ctrl-C outside the training loop one line and status 0 or 130. In a
    multi-process run a failing process then leaves at once (training/distributed.py), and one
    whose peer was lost says which in one line (exit status 1)."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        from training import distributed  # here: it imports this module
        try:
            with _interruptible():
                return main(*args, **kwargs)
        except Interrupted as e:  # start-up (compiling, the first evaluation) or the end
            print(f"{e}: stopped outside the training steps, nothing new to save; run the same "
                  f"command again to resume", file=sys.stderr)
            if distributed.joined():
                distributed.leave(e.code)
            sys.exit(e.code)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            if distributed.joined():
                distributed.leave(2)
            sys.exit(2)
        except Exception as e:
            if not distributed.joined():
                raise
            lost = distributed.lost_processes(e)
            if lost:
                text = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
                print(f"error: lost process {', '.join(map(str, lost))} of the run (killed, or "
                      f"its host is gone; seen as {type(e).__name__}: {text}); this process "
                      f"stops too: run the same command again to resume from the last "
                      f"checkpoint", file=sys.stderr)
            else:
                traceback.print_exc()
            distributed.leave(1)

    return wrapper
