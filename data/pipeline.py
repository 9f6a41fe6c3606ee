"""What every grain input pipeline shares: this process's share of each global batch, and the
prefetching iterator whose JSON state a checkpoint keeps.

Global batch `s` is stream positions [s * B, (s + 1) * B); with P processes each makes local
batches of B/P, and process i takes local batches s*P + i: the processes' shares are disjoint and
together make the single-process batch, for any process count.

Randomness is a pure function of where an example sits: per example (augmentation that is
drawn example by example) from `position_rng`, or for a whole local batch at once from
`batch_bits`, a counter-based stream in which row r of global batch s always gets the same
numbers, whichever process draws it.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import sys
import threading
from collections.abc import Sequence

import grain
import numpy as np
from array_record.python.array_record_module import ArrayRecordReader


class ArrayRecordSource:
    """grain random-access source over the records of ArrayRecord files, in file order.

    A record is one seek and one read on a reader without readahead or parallelism (about 5 us
    on this machine); grain.sources.ArrayRecordDataSource reads a list of one index, which goes
    through the reader's parallel path (about 250 us a record, the loader's largest cost), and
    the reader's default options make each seek start background readahead (2 ms). One reader
    per file, opened lazily (so the source pickles into grain worker processes); a lock keeps
    seek + read together under prefetch threads.
    """

    def __init__(self, paths: Sequence[str]):
        self.paths = [str(p) for p in paths]
        counts = []
        for path in self.paths:
            reader = ArrayRecordReader(path)
            counts.append(reader.num_records())
            reader.close()
        self._ends = np.cumsum(counts).tolist()
        self._readers: dict[int, ArrayRecordReader] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def __getitem__(self, index: int) -> bytes:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} of {len(self)}")
        file = bisect.bisect_right(self._ends, index)
        start = self._ends[file - 1] if file else 0
        with self._lock:
            reader = self._readers.get(file)
            if reader is None:
                reader = self._readers[file] = ArrayRecordReader(
                    self.paths[file], "readahead_buffer_size:0,max_parallelism:0")
            reader.seek(index - start)
            return reader.read()

    def __getstate__(self):
        return {"paths": self.paths, "_ends": self._ends}

    def __setstate__(self, state):
        self.__dict__.update(state, _readers={}, _lock=threading.Lock())


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


def batch_bits(seed: int, tag: int, step: int, rows: range, words: int) -> np.ndarray:
    """Random 64-bit words uint64 [len(rows), words] for rows `rows` of global batch `step`.

    One Philox stream per (seed, tag, step), keyed from them; row r's words start at its counter
    r * ceil(words / 4) (Philox makes 4 words per counter), so a process drawing only its rows
    gets exactly the words of those rows in the single-process draw, for resume and any process
    count alike.
    """
    per_row = -(-words // 4)
    key = np.random.SeedSequence([seed, tag, step]).generate_state(2, np.uint64)
    stream = np.random.Philox(key=key, counter=[rows.start * per_row, 0, 0, 0])
    raw = stream.random_raw(len(rows) * per_row * 4).reshape(len(rows), per_row * 4)
    return raw[:, :words]


def process_rows(batch_size: int, process_index: int, process_count: int) -> range:
    """The rows of every global batch that process `process_index` of `process_count` makes."""
    if batch_size % process_count:
        raise ValueError(f"batch size {batch_size} does not divide by {process_count} processes")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    local = batch_size // process_count
    return range(process_index * local, (process_index + 1) * local)


def process_share(ds: grain.MapDataset, batch_size: int, process_index: int,
                  process_count: int, batch_fn=None) -> grain.MapDataset:
    """Batches of `batch_size / process_count` examples, this process's only: element s is its
    rows (process_rows) of global batch s. `batch_fn` (list of elements -> batch) replaces
    grain's stacking, e.g. `list` to keep raw records as they are."""
    local = len(process_rows(batch_size, process_index, process_count))
    return ds.batch(local, drop_remainder=True, batch_fn=batch_fn)[process_index::process_count]


@dataclasses.dataclass(frozen=True)
class BatchWarmup:
    """Batch-size warmup (ModernBERT's): step s takes `rows(s)` rows of the stream, from `start`
    up to `batch_size` over the first `steps` steps, then `batch_size`.

    The sizes are the multiples of `start` (a unit batch; `batch_size` is one too), each smaller
    one run for an equal share of the warmup steps, as the release did ("each batch size has
    the same number of update steps"); so there are batch_size / start sizes, each compiled once.
    A pure function of the step: a resumed run takes the same rows at every step.
    """
    batch_size: int
    start: int = 0   # rows of the first step; with steps=0 the warmup is off
    steps: int = 0

    @classmethod
    def of(cls, train) -> BatchWarmup:
        """From a config's train group (train.batch_warmup_steps / batch_warmup_start)."""
        return cls(train.batch_size, train.get("batch_warmup_start", 0), train.get("batch_warmup_steps", 0))

    @property
    def on(self) -> bool:
        return self.steps > 0 and 0 < self.start < self.batch_size

    @property
    def unit(self) -> int:
        """The rows of one unit batch: every step takes a whole number of them."""
        return self.start if self.on else self.batch_size

    @property
    def stage_starts(self) -> list[int]:
        """The first step at each size: unit * j rows from stage_starts[j - 1] (j = 1..K)."""
        k = self.batch_size // self.unit
        return [-(-(j * self.steps) // (k - 1)) for j in range(k - 1)] + [self.steps] if self.on else [0]

    def units(self, step: int) -> int:
        """Unit batches in step `step` (counted from 0)."""
        return bisect.bisect_right(self.stage_starts, step)

    def units_before(self, step: int) -> int:
        """Unit batches in steps 0..step-1: where step `step` starts in the unit stream."""
        starts, total = self.stage_starts, 0
        for j, (first, end) in enumerate(zip(starts, starts[1:] + [max(step, starts[-1])]), 1):
            total += j * (max(min(step, end), first) - first)
        return total

    def rows(self, step: int) -> int:
        return self.unit * self.units(step)


class StagedBatches(grain.MapDataset):
    """Element s: the unit batches of step s (BatchWarmup) joined along the batch axis; `parent`
    is this process's unit batches (dicts of arrays), so each process joins its own rows."""

    def __init__(self, parent: grain.MapDataset, warmup: BatchWarmup):
        super().__init__(parent)
        self._warmup = warmup

    def __len__(self) -> int:
        return sys.maxsize  # the train stream is endless

    def __getitem__(self, step):
        if isinstance(step, slice):
            return self.slice(step)
        first = self._warmup.units_before(step)
        parts = [self._parent[first + j] for j in range(self._warmup.units(step))]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def prefetching_iterator(ds: grain.MapDataset, *, threads: int = 2, prefetch: int = 4,
                         workers: int = 0, warmup: BatchWarmup | None = None) -> grain.DatasetIterator:
    """An iterator over `ds` reading ahead in threads, or in `workers` processes (then the
    caller's main module needs an `if __name__ == "__main__":` guard). `get_state()` /
    `set_state()` give and take its position as a JSON-able dict; call `close()` when done.
    With a `warmup` that is on, `ds` holds unit batches (`warmup.unit` rows) and the iterator
    yields each step's (StagedBatches); its state is then the step."""
    if warmup is not None and warmup.on:
        ds = StagedBatches(ds, warmup)
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(threads, 1),
                                                 prefetch_buffer_size=max(prefetch, 1)))
    if workers > 0:
        from absl import flags  # grain reads absl flags in its workers; we parse none
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=workers, per_worker_buffer_size=max(prefetch, 1)))
    return iter(it_ds)
