"""What every grain batch stream shares: the epoch-shuffle seed, per-example random streams fixed
by the stream position, each process's share of the global batch, and prefetching iterators.

Global batch `step` is stream positions [step * B, (step + 1) * B); the example at `position`
draws its randomness from rng([seed, tag, step, index]) with (step, index) = divmod(position, B),
so resume and any process count replay it exactly.
"""

from __future__ import annotations

import hashlib
import json

import grain
import numpy as np

_PERM_TAG = 0x5045524D  # "PERM": epoch shuffles


def grain_seed(seed: int) -> int:
    """The seed of grain's global shuffle (reshuffled every epoch) for a training seed."""
    digest = hashlib.sha256(json.dumps([seed, _PERM_TAG]).encode()).digest()
    return int.from_bytes(digest[:4], "little")  # grain wants [0, 2**32)


def position_rng(seed: int, tag: int, position: int, global_batch: int) -> np.random.Generator:
    """The random stream of the example at `position` of a stream of global batches."""
    step, index = divmod(int(position), global_batch)
    return np.random.default_rng([seed, tag, step, index])


def share_batches(ds: grain.MapDataset, batch_size: int, process_index: int,
                  process_count: int) -> grain.MapDataset:
    """This process's batches of batch_size / process_count examples each."""
    if batch_size % process_count:
        raise ValueError(f"batch size {batch_size} does not divide by {process_count} "
                         "processes")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    local = batch_size // process_count
    # Local batch k holds stream positions [k * local, (k + 1) * local): global batch s is
    # local batches s*P .. s*P + P-1, and process i takes the i-th of them.
    return ds.batch(local, drop_remainder=True)[process_index::process_count]


def prefetch_iterator(ds: grain.MapDataset, *, workers: int = 0, prefetch: int = 4,
                      threads: int = 2) -> grain.DatasetIterator:
    """An iterator over `ds` with prefetching; `get_state()` / `set_state()` give and take its
    position as a JSON-able dict. With `workers` > 0 batches are made in that many processes
    (the caller's main module needs an `if __name__ == "__main__":` guard). Call `close()`."""
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(threads, 1),
                                                 prefetch_buffer_size=max(prefetch, 1)))
    if workers > 0:
        from absl import flags  # grain reads absl flags in its workers; we parse none
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=workers, per_worker_buffer_size=max(prefetch, 1)))
    return iter(it_ds)
