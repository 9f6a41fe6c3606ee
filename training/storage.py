"""Moved to the bottom package (infra/storage.py); this name is the same module object, so old imports
and monkeypatches keep working until every caller says infra.storage."""

import sys

from infra import storage

sys.modules[__name__] = storage
