"""The one-line error type lives in the bottom package (infra/); this name keeps old imports working."""

from infra.errors import UserError, exits_cleanly  # noqa: F401
