"""User errors: printed as one line by the command-line entry points, never as a traceback."""

import functools
import sys


class UserError(Exception):
    """Bad input the user can fix; the message says what to do."""


def exits_cleanly(main):
    """Wrap a CLI `main` so a UserError becomes one line on stderr and exit status 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapper
