"""Moved to the bottom package (infra/collectives.py); this name is the same module object, so old imports
and monkeypatches keep working until every caller says infra.collectives."""

import sys

from infra import collectives

sys.modules[__name__] = collectives
