"""BERT pretraining batches: a grain pipeline over prepared ArrayRecord examples.

`python -m pretrain.prepare` (or `python -m pretrain`, which prepares when needed) writes a folder
of example shards (see data/records.py and pretrain/prepare.py); `PretrainingData(folder)` opens
it. The train stream is

    ArrayRecord examples -> global shuffle (reshuffled every epoch) -> repeat forever
      -> batches of batch_size / process_count records -> this process's batches only
      -> pad + mask the whole local batch at once, from batch_bits(seed, tag, step, its rows)
      -> prefetch in threads, or in `workers` processes (grain.mp_prefetch)

A mixture (`data.source=news:0.7,task:rt_polarity:0.3`, pretrain/prepare.py) has one such folder
per source; each source's records are shuffled and repeated on their own, and grain's
`MapDataset.mix` interleaves the streams deterministically by weight, so position k of the mixed
stream is a pure function of k and resume stays exact.

Global batch `step` is stream positions [step * B, (step + 1) * B); process i reads and masks only
its rows [i * B/P, (i + 1) * B/P) of it, and the mask randomness of a row depends on (seed, step,
row) alone (a counter-based stream, data.pipeline.batch_bits), so the processes' shares are
disjoint and together make the single-process batch, masks included, for any process count. The
iterator's state is grain's (a small JSON dict); saved with every checkpoint, it resumes the
stream exactly.

Packed rows (objective mlm_packed) number their documents in attention_mask: 0 on padding, then
1, 2, 3, ... (data.examples.number_documents), so attention can stay within a document; other
objectives keep 1 on every real token.
"""

from __future__ import annotations

import json
from pathlib import Path

import grain
import numpy as np

from data import records
from data.examples import MASK_WORDS, mask_tokens, number_documents
from data.pipeline import (ArrayRecordSource, BatchWarmup, batch_bits, grain_seed,
                           prefetching_iterator, process_rows, process_share)
from models.tokenizer import Tokenizer

KEYS = ("input_ids", "token_type_ids", "attention_mask", "masked_positions", "masked_ids",
        "masked_weights", "next_sentence_labels")
# Tags keep the seeded streams apart from each other.
_PERM_TAG = 0x5045524D  # "PERM": epoch shuffles
_TRAIN_TAG = 0x4D41534B  # "MASK": train masks
_EVAL_TAG = 0x4556414C  # "EVAL": eval masks


class MaskBatch:
    """grain map_with_index transform: global step, this process's records of it (its `rows` of
    the global batch) -> one padded, masked batch.

    The masks are drawn from batch_bits(seed, tag, step, rows): a pure function of where each
    example sits in the global stream, whichever process makes it.
    """

    def __init__(self, *, dtype: str, max_seq_len: int, rows: range, seed: int, tag: int,
                 vocab_size: int, mask_id: int, special_ids, mask_prob: float,
                 max_predictions: int, is_continuation: np.ndarray | None,
                 document_sep: int | None):
        self.dtype, self.max_seq_len, self.rows = np.dtype(dtype), max_seq_len, rows
        self.seed, self.tag = seed, tag
        self.vocab_size, self.mask_id, self.special_ids = vocab_size, mask_id, tuple(special_ids)
        self.mask_prob, self.max_predictions = mask_prob, max_predictions
        self.is_continuation, self.document_sep = is_continuation, document_sep

    def __call__(self, step: int, batch_records: list[bytes]) -> dict[str, np.ndarray]:
        batch = records.pad_examples(batch_records, self.dtype, self.max_seq_len)
        ids = batch["input_ids"]
        bits = batch_bits(self.seed, self.tag, step, self.rows, MASK_WORDS * self.max_seq_len)
        masked = mask_tokens(
            ids, batch["attention_mask"], bits.reshape(len(ids), MASK_WORDS, self.max_seq_len),
            vocab_size=self.vocab_size, mask_id=self.mask_id, special_ids=self.special_ids,
            mask_prob=self.mask_prob, max_predictions=self.max_predictions,
            word_starts=None if self.is_continuation is None else ~self.is_continuation[ids])
        if self.document_sep is not None:
            batch["attention_mask"] = number_documents(ids, batch["attention_mask"],
                                                       self.document_sep)
        out = {**batch, **masked}
        return {k: out[k] for k in KEYS}


class PretrainingData:
    """A prepared folder (or a mixture of several): its tokenizer, its train/eval example shards,
    and batches of them."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / "meta.json").read_text())
        # A mixture's meta lists its parts: folders relative to its own parent, and weights.
        parts = self.meta.get("parts") or [{"folder": self.folder.name, "weight": 1.0}]
        self.parts = [(self.folder.parent / p["folder"], float(p["weight"])) for p in parts]
        self.tokenizer = Tokenizer.load(self.parts[0][0].parent / "tokenizer")
        self.max_seq_len = self.meta["max_seq_len"]
        self.objective = self.meta["objective"]
        metas = [json.loads((f / "meta.json").read_text()) for f, _ in self.parts]
        self._paths = [{split: [str(f / name) for name in meta[f"{split}_files"]]
                        for split in ("train", "eval")} for (f, _), meta in zip(self.parts, metas)]
        self._sources: dict[tuple, ArrayRecordSource] = {}

    def __len__(self) -> int:
        return self.meta["train_examples"]

    def num_examples(self, split: str) -> int:
        return self.meta[f"{split}_examples"]

    def source(self, split: str, part: int = 0):
        """The records of `split` of one source (of the mixture's `part`-th)."""
        if (split, part) not in self._sources:
            if not self._paths[part][split]:
                raise ValueError(f"the {split} split is empty")
            self._sources[split, part] = ArrayRecordSource(self._paths[part][split])
        return self._sources[split, part]

    def records(self, split: str, seed: int | None = None) -> grain.MapDataset:
        """The endless stream of a split's records, shuffled (reshuffled every epoch) when `seed`
        is given; a mixture interleaves its sources' streams by weight (sources without the
        split are left out)."""
        streams, weights = [], []
        for i, (_, weight) in enumerate(self.parts):
            if not self._paths[i][split]:
                continue
            ds = grain.MapDataset.source(self.source(split, i))
            if seed is not None:  # a single source keeps the stream it always had
                ds = ds.shuffle(grain_seed(seed, _PERM_TAG, *([i] if len(self.parts) > 1 else [])))
            streams.append(ds.repeat(None))
            weights.append(weight)
        if not streams:
            raise ValueError(f"the {split} split is empty")
        return streams[0] if len(streams) == 1 else grain.MapDataset.mix(streams, weights)

    # --- datasets -------------------------------------------------------------------------

    def _masker(self, rows: range, seed: int, tag: int, max_predictions: int, mask_prob: float,
                whole_word: bool) -> MaskBatch:
        tok = self.tokenizer
        return MaskBatch(dtype=self.meta["dtype"], max_seq_len=self.max_seq_len, rows=rows,
                         seed=seed, tag=tag, vocab_size=tok.vocab_size, mask_id=tok.mask_id,
                         special_ids=sorted(tok.special_ids), mask_prob=mask_prob,
                         max_predictions=max_predictions,
                         is_continuation=tok._is_continuation if whole_word else None,
                         document_sep=tok.sep_id if self.objective == "mlm_packed" else None)

    def _batches(self, split: str, batch_size: int, *, seed: int, tag: int,
                 max_predictions: int, mask_prob: float, whole_word: bool, process_index: int,
                 process_count: int) -> grain.MapDataset:
        """This process's masked batches of a split's stream (shuffled for train)."""
        ds = process_share(self.records(split, seed if split == "train" else None), batch_size,
                           process_index, process_count, batch_fn=list)
        rows = process_rows(batch_size, process_index, process_count)
        return ds.map_with_index(self._masker(rows, seed, tag, max_predictions, mask_prob,
                                              whole_word))

    def train_dataset(self, batch_size: int, *, seed: int, max_predictions: int,
                      mask_prob: float = 0.15, whole_word: bool = False, process_index: int = 0,
                      process_count: int = 1) -> grain.MapDataset:
        """This process's batches of the endless train stream, as a random-access dataset."""
        return self._batches("train", batch_size, seed=seed, tag=_TRAIN_TAG,
                             max_predictions=max_predictions, mask_prob=mask_prob,
                             whole_word=whole_word, process_index=process_index,
                             process_count=process_count)

    def train_iterator(self, batch_size: int, *, seed: int, max_predictions: int,
                       mask_prob: float = 0.15, whole_word: bool = False, process_index: int = 0,
                       process_count: int = 1, workers: int = 0, prefetch: int = 4,
                       threads: int = 2, warmup: BatchWarmup | None = None) -> grain.DatasetIterator:
        """An iterator over `train_dataset` with prefetching; `get_state()` / `set_state()`
        give and take its position as a JSON-able dict. With `workers` > 0 batches are made in
        that many processes (the caller's main module needs an `if __name__ == "__main__":`
        guard). With a batch-size `warmup`, step s's batch is its unit batches of `warmup.unit`
        rows (masked as such) joined. Call `close()` when done."""
        ds = self.train_dataset(warmup.unit if warmup else batch_size, seed=seed, max_predictions=max_predictions,
                                mask_prob=mask_prob, whole_word=whole_word,
                                process_index=process_index, process_count=process_count)
        return prefetching_iterator(ds, threads=threads, prefetch=prefetch, workers=workers,
                                    warmup=warmup)

    def batch(self, step: int, batch_size: int, **kwargs) -> dict[str, np.ndarray]:
        """Train batch `step` read directly (no iterator): for tests and tools."""
        return self.train_dataset(batch_size, **kwargs)[step]

    # --- eval -----------------------------------------------------------------------------

    def num_eval_batches(self, batch_size: int) -> int:
        """Batches in one eval pass: the eval split in order, the last partial batch dropped.

        A split smaller than one batch still gives one batch (its rows wrap around).
        """
        n = self.num_examples("eval")
        return max(1, n // batch_size) if n else 0

    def eval_dataset(self, batch_size: int, *, seed: int, max_predictions: int,
                     mask_prob: float = 0.15, whole_word: bool = False, process_index: int = 0,
                     process_count: int = 1) -> grain.MapDataset:
        return self._batches("eval", batch_size, seed=seed, tag=_EVAL_TAG,
                             max_predictions=max_predictions, mask_prob=mask_prob,
                             whole_word=whole_word, process_index=process_index,
                             process_count=process_count)

    def eval_batches(self, batch_size: int, max_batches: int | None = None, **kwargs):
        """Yields the eval batches in order (kwargs as for eval_dataset)."""
        n = self.num_eval_batches(batch_size)
        if max_batches is not None:
            n = min(n, max_batches)
        if n:
            ds = self.eval_dataset(batch_size, **kwargs)
            for index in range(n):
                yield ds[index]
