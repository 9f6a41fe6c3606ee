"""In-memory BERT pretraining data: build NSP pairs once, cache them, mask per batch.

The small interface (`build_pretraining_corpus`, `PretrainingCorpus.batch`, `eval_batch`) is what
the trainer sees; a grain pipeline can replace it later for corpora that do not fit in memory.

A batch is a pure function of (seed, step): examples come from a seeded permutation per epoch and
masks from `np.random.default_rng([seed, step])`, so a resumed run sees exactly the same batches
and no iterator state needs saving.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from data.corpora import load_documents, split_sentences
from data.wheels import DataError
from models.tokenizer import Tokenizer
from pretrain.examples import create_nsp_instances, mask_tokens

_FORMAT_VERSION = 1  # bump when the cached arrays change meaning
# Tags keep the seeded streams apart from each other and from the [seed, step] mask streams.
_PERM_TAG = 0x5045524D  # "PERM": epoch permutations
_EVAL_TAG = 0x4556414C  # "EVAL": eval masks
_SPLIT_TAG = 0x53504C54  # "SPLT": train/eval document split
_PAIRS_TAG = 0x50414952  # "PAIR": NSP instance creation
KEYS = ("input_ids", "token_type_ids", "attention_mask", "masked_positions", "masked_ids",
        "masked_weights", "next_sentence_labels")


class PretrainingCorpus:
    """Train and eval NSP instances in memory, with the tokenizer that made them.

    `train` / `eval` hold input_ids, token_type_ids, attention_mask [N, T] and next_sentence_labels
    [N], stored in small integer types; batches come out as int32 (masked_weights float32).
    """

    def __init__(self, tokenizer: Tokenizer, train: dict[str, np.ndarray],
                 eval: dict[str, np.ndarray]):
        self.tokenizer = tokenizer
        self.train = train
        self.eval = eval
        self._perms: dict[tuple[str, int, int], np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.train["input_ids"])

    # --- batches ----------------------------------------------------------------------------

    def _permutation(self, split: str, seed: int, epoch: int) -> np.ndarray:
        key = (split, seed, epoch)
        if key not in self._perms:
            if len(self._perms) > 4:  # a batch touches at most two epochs; keep a few
                self._perms.clear()
            n = len(self._split(split)["input_ids"])
            self._perms[key] = np.random.default_rng([seed, _PERM_TAG, epoch]).permutation(n)
        return self._perms[key]

    def _split(self, split: str) -> dict[str, np.ndarray]:
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
        return self.train if split == "train" else self.eval

    def _make_batch(self, split: str, rows: np.ndarray, rng: np.random.Generator,
                    max_predictions: int, mask_prob: float, whole_word: bool,
                    process_index: int, process_count: int) -> dict[str, np.ndarray]:
        batch_size = len(rows)
        if batch_size % process_count:
            raise ValueError(f"batch size {batch_size} does not divide by {process_count} "
                             "processes")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
        data = self._split(split)
        input_ids = data["input_ids"][rows].astype(np.int32)
        attention_mask = data["attention_mask"][rows].astype(np.int32)
        tok = self.tokenizer
        # Masks are drawn for the whole global batch, so they do not depend on process_count.
        masked = mask_tokens(input_ids, attention_mask, rng, vocab_size=tok.vocab_size,
                             mask_id=tok.mask_id, special_ids=tok.special_ids, mask_prob=mask_prob,
                             max_predictions=max_predictions,
                             word_starts=tok.word_starts(input_ids) if whole_word else None)
        batch = {"token_type_ids": data["token_type_ids"][rows].astype(np.int32),
                 "attention_mask": attention_mask,
                 "next_sentence_labels": data["next_sentence_labels"][rows].astype(np.int32),
                 **masked}
        local = slice(process_index * batch_size // process_count,
                      (process_index + 1) * batch_size // process_count)
        return {k: batch[k][local] for k in KEYS}

    def batch(self, split: str, step: int, batch_size: int, *, seed: int, max_predictions: int,
              mask_prob: float = 0.15, whole_word: bool = False, process_index: int = 0,
              process_count: int = 1) -> dict[str, np.ndarray]:
        """This process's rows of global batch `step`: shuffled epochs, fresh masks per step."""
        n = len(self._split(split)["input_ids"])
        if n == 0:
            raise ValueError(f"the {split} split is empty")
        positions = step * batch_size + np.arange(batch_size)  # in the endless stream of epochs
        epochs, offsets = np.divmod(positions, n)
        rows = np.empty(batch_size, np.int64)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            rows[sel] = self._permutation(split, seed, int(epoch))[offsets[sel]]
        return self._make_batch(split, rows, np.random.default_rng([seed, step]), max_predictions,
                                mask_prob, whole_word, process_index, process_count)

    def num_eval_batches(self, batch_size: int) -> int:
        """Batches in one eval pass: the eval split in order, the last partial batch dropped.

        A split smaller than one batch still gives one batch (its rows wrap around).
        """
        n = len(self.eval["input_ids"])
        return max(1, n // batch_size) if n else 0

    def eval_batch(self, index: int, batch_size: int, *, seed: int, max_predictions: int,
                   mask_prob: float = 0.15, whole_word: bool = False, process_index: int = 0,
                   process_count: int = 1) -> dict[str, np.ndarray]:
        """Eval batch `index`: eval rows in order with masks fixed by (seed, index)."""
        n = len(self.eval["input_ids"])
        if n == 0:
            raise ValueError("the eval split is empty")
        rows = (index * batch_size + np.arange(batch_size)) % n
        rng = np.random.default_rng([seed, _EVAL_TAG, index])
        return self._make_batch("eval", rows, rng, max_predictions, mask_prob, whole_word,
                                process_index, process_count)

    def eval_batches(self, batch_size: int, **kwargs):
        """Yields every eval batch in order (kwargs as for eval_batch)."""
        for index in range(self.num_eval_batches(batch_size)):
            yield self.eval_batch(index, batch_size, **kwargs)


# ---------------------------------------------------------------------------------------------
# Building and caching
# ---------------------------------------------------------------------------------------------


def _compact(arrays: dict[str, np.ndarray], vocab_size: int) -> dict[str, np.ndarray]:
    """Smallest integer types that hold the values: about a quarter of int32's memory."""
    ids_type = np.uint16 if vocab_size <= 1 << 16 else np.int32
    return {"input_ids": arrays["input_ids"].astype(ids_type),
            "token_type_ids": arrays["token_type_ids"].astype(np.int8),
            "attention_mask": arrays["attention_mask"].astype(np.int8),
            "next_sentence_labels": arrays["next_sentence_labels"].astype(np.int8)}


def _cache_key(source: str, settings: dict, tokenizer_dir: str | Path | None) -> str:
    key = json.dumps([_FORMAT_VERSION, source, settings], sort_keys=True)
    digest = hashlib.sha256(key.encode())
    if source.startswith("files:"):  # the files' names, sizes and times stand for their contents
        for path in sorted(glob.glob(source[len("files:"):], recursive=True)):
            st = os.stat(path)
            digest.update(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode())
    if tokenizer_dir is not None:
        for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"):
            if (Path(tokenizer_dir) / name).exists():
                digest.update((Path(tokenizer_dir) / name).read_bytes())
    return digest.hexdigest()[:16]


def _load_cached(folder: Path) -> PretrainingCorpus:
    def load(name):
        with np.load(folder / name, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    return PretrainingCorpus(Tokenizer.load(folder / "tokenizer"), load("train.npz"),
                             load("eval.npz"))


def build_pretraining_corpus(source: str, data_dir: str | Path, out_dir: str | Path, *,
                             vocab_size: int, max_seq_len: int, short_seq_prob: float,
                             dupe_factor: int, eval_fraction: float, seed: int,
                             tokenizer_dir: str | Path | None = None) -> PretrainingCorpus:
    """NSP instances of a text source, cached in `data_dir` by a hash of the arguments.

    Documents are split into train/eval by a seeded shuffle (eval_fraction of them, at least one
    when eval_fraction > 0). The WordPiece tokenizer is trained on the train documents, or loaded
    from tokenizer_dir, and saved to `out_dir/tokenizer/`. Train instances are made in dupe_factor
    passes with different generators (different cuts of the same text), eval in one pass.
    """
    settings = dict(vocab_size=vocab_size, max_seq_len=max_seq_len, short_seq_prob=short_seq_prob,
                    dupe_factor=dupe_factor, eval_fraction=eval_fraction, seed=seed,
                    tokenizer_dir=None if tokenizer_dir is None else str(tokenizer_dir))
    data_dir = Path(data_dir)
    cache = data_dir / "pretraining" / _cache_key(source, settings, tokenizer_dir)
    if (cache / "report.json").exists():
        corpus = _load_cached(cache)
        report = json.loads((cache / "report.json").read_text())
        print(f"pretraining data {source}: {report['train_instances']} train / "
              f"{report['eval_instances']} eval instances from the cache {cache}")
        corpus.tokenizer.save(Path(out_dir) / "tokenizer")
        return corpus

    start = time.perf_counter()
    texts = load_documents(source, data_dir)
    documents = [split_sentences(text) for text in texts]
    documents = [d for d in documents if d]
    if len(documents) < 2:
        raise DataError(f"{source} gave {len(documents)} documents with text; next-sentence "
                        "pairs need at least two")
    order = np.random.default_rng([seed, _SPLIT_TAG]).permutation(len(documents))
    n_eval = min(len(documents) - 2, int(np.ceil(eval_fraction * len(documents))))
    n_eval = max(0, n_eval)
    eval_docs = [documents[i] for i in sorted(order[:n_eval])]
    train_docs = [documents[i] for i in sorted(order[n_eval:])]

    if tokenizer_dir is not None:
        tokenizer = Tokenizer.load(tokenizer_dir)
    else:
        tokenizer = Tokenizer.train(("\n".join(d) for d in train_docs), vocab_size)

    def tokenize(docs: list[list[str]]) -> list[list[list[int]]]:
        flat = tokenizer.encode_batch([s for d in docs for s in d])
        out, i = [], 0
        for d in docs:
            out.append(flat[i:i + len(d)])
            i += len(d)
        return out

    train_tok, eval_tok = tokenize(train_docs), tokenize(eval_docs)

    def make(docs, rng):
        return create_nsp_instances(docs, max_seq_len, short_seq_prob, rng, tokenizer.cls_id,
                                    tokenizer.sep_id, tokenizer.pad_id)

    passes = [make(train_tok, np.random.default_rng([seed, _PAIRS_TAG, d]))
              for d in range(dupe_factor)]
    train = {k: np.concatenate([p[k] for p in passes]) for k in passes[0]}
    eval = make(eval_tok, np.random.default_rng([seed, _PAIRS_TAG, _EVAL_TAG]))
    train, eval = _compact(train, tokenizer.vocab_size), _compact(eval, tokenizer.vocab_size)

    report = dict(source=source, documents=len(documents), train_documents=len(train_docs),
                  eval_documents=len(eval_docs), sentences=sum(map(len, documents)),
                  tokens=int(sum(len(s) for d in train_tok + eval_tok for s in d)),
                  train_instances=len(train["input_ids"]), eval_instances=len(eval["input_ids"]),
                  build_seconds=round(time.perf_counter() - start, 1), **settings)
    print(f"pretraining data {source}: {report['documents']} documents, {report['sentences']} "
          f"sentences, {report['tokens']} tokens -> {report['train_instances']} train / "
          f"{report['eval_instances']} eval instances of {max_seq_len} tokens "
          f"({report['build_seconds']} s)")

    # Write into a temporary folder and rename it, so a crash never leaves a half-written cache and
    # processes building the same corpus at once do not see each other's partial files.
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache.parent, prefix=".partial-"))
    np.savez(tmp / "train.npz", **train)
    np.savez(tmp / "eval.npz", **eval)
    tokenizer.save(tmp / "tokenizer")
    (tmp / "report.json").write_text(json.dumps(report, indent=1))
    try:
        os.replace(tmp, cache)
    except OSError:  # another process finished first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save(Path(out_dir) / "tokenizer")
    return PretrainingCorpus(tokenizer, train, eval)
