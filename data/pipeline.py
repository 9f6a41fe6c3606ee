"""What every grain input pipeline shares: this process's share of each global batch, and the
prefetching iterator whose JSON state a checkpoint keeps.

Global batch `s` is stream positions [s * B, (s + 1) * B); with P processes each makes local
batches of B/P, and process i takes local batches s*P + i: the processes' shares are disjoint and
together make the single-process batch, for any process count.
"""

from __future__ import annotations

import hashlib
import json

import grain
import numpy as np


def grain_seed(*parts: int) -> int:
    """A shuffle seed in [0, 2**32) (what grain takes) derived from a run seed and a stream tag."""
    digest = hashlib.sha256(json.dumps(list(parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little")


def position_rng(seed: int, tag: int, position: int, global_batch: int) -> np.random.Generator:
    """The random stream of the example at `position` of a stream of global batches:
    rng([seed, tag, step, index]) with (step, index) = divmod(position, global_batch), so resume
    and any process count replay it exactly."""
    step, index = divmod(int(position), global_batch)
    return np.random.default_rng([seed, tag, step, index])


def process_share(ds: grain.MapDataset, batch_size: int, process_index: int,
                  process_count: int) -> grain.MapDataset:
    """Batches of `batch_size / process_count` examples, this process's only."""
    if batch_size % process_count:
        raise ValueError(f"batch size {batch_size} does not divide by {process_count} processes")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    local = batch_size // process_count
    return ds.batch(local, drop_remainder=True)[process_index::process_count]


def prefetching_iterator(ds: grain.MapDataset, *, threads: int = 2, prefetch: int = 4,
                         workers: int = 0) -> grain.DatasetIterator:
    """An iterator over `ds` reading ahead in threads, or in `workers` processes (then the
    caller's main module needs an `if __name__ == "__main__":` guard). `get_state()` /
    `set_state()` give and take its position as a JSON-able dict; call `close()` when done."""
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(threads, 1),
                                                 prefetch_buffer_size=max(prefetch, 1)))
    if workers > 0:
        from absl import flags  # grain reads absl flags in its workers; we parse none
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=workers, per_worker_buffer_size=max(prefetch, 1)))
    return iter(it_ds)
