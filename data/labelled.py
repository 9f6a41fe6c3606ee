"""Fine-tuning batches for any family: a grain pipeline over the rows of a labelled split.

`encode(rows, positions) -> dict of arrays` turns row numbers into model inputs and `labels`
(tokenised texts, decoded and augmented images); it runs on one local batch at a time, so no
split is ever held encoded in memory. `positions` are the rows' places in the stream: random
augmentation draws from `data.pipeline.position_rng(seed, tag, position, global batch)`, so it
replays exactly on resume and for any process count. The train stream is

    row numbers -> shuffle (reshuffled every epoch) -> repeat forever -> (row, position)
      -> this process's share of each global batch (data/pipeline.py) -> encode -> prefetch

and its iterator state is grain's, saved with every checkpoint. Evaluation reads a split in
order; the last global batch is padded with row 0 at weight 0, so every example counts once.
"""

from __future__ import annotations

from typing import Callable, Iterator

import grain
import numpy as np

from data.pipeline import grain_seed, prefetching_iterator, process_share

_TRAIN_TAG = 0x46544E45  # "FTNE": epoch shuffles of the train split

Encode = Callable[[np.ndarray, np.ndarray], dict[str, np.ndarray]]


def _with_position(position: int, row: int) -> tuple[int, int]:
    return row, position


class _Encoded:
    """grain map transform: a local batch of (rows, positions) -> encoded arrays and weights;
    rows past the split's end (eval padding) read row 0 at weight 0."""

    def __init__(self, encode: Encode, n: int):
        self.encode, self.n = encode, n

    def __call__(self, batch) -> dict[str, np.ndarray]:
        rows, positions = (np.asarray(x, np.int64) for x in batch)
        weights = rows < self.n
        return {**self.encode(np.where(weights, rows, 0), positions),
                "weights": weights.astype(np.float32)}


def train_iterator(n: int, encode: Encode, batch_size: int, *, seed: int, process_index: int = 0,
                   process_count: int = 1, prefetch: int = 4) -> grain.DatasetIterator:
    """This process's batches of the endless shuffled stream of rows 0..n-1, with get/set_state."""
    ds = grain.MapDataset.range(n).shuffle(grain_seed(seed, _TRAIN_TAG)).repeat(None)
    ds = ds.map_with_index(_with_position)
    ds = process_share(ds, batch_size, process_index, process_count).map(_Encoded(encode, n))
    # One thread: a tokenizer is not shared across threads; prefetching still overlaps the step.
    return prefetching_iterator(ds, threads=1, prefetch=prefetch)


def num_eval_batches(n: int, batch_size: int) -> int:
    return -(-n // batch_size)


def eval_batches(n: int, encode: Encode, batch_size: int, *, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """This process's share of each global batch over rows 0..n-1 in order, padded at weight 0."""
    ds = grain.MapDataset.range(num_eval_batches(n, batch_size) * batch_size).map_with_index(_with_position)
    ds = process_share(ds, batch_size, process_index, process_count).map(_Encoded(encode, n))
    for i in range(len(ds)):
        yield ds[i]
