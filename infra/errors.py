"""User errors: printed as one line by the command-line entry points (training/errors.py:
exits_cleanly), never as a traceback."""


class UserError(Exception):
    """Bad input the user can fix; the message says what to do."""

