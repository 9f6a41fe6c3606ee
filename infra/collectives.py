"""Small host-side agreements between the processes of a run (no-ops in a one-process run).

Every process must call each of them at the same point, or the others wait forever.
"""

import jax
import numpy as np


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is True on any."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


def barrier(name: str) -> None:
    """Wait until every process has reached the barrier called `name`."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)
