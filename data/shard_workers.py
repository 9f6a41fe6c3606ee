"""The processes that prepare shards for data/preparation.py: each loads the tokenizer once
(`init`), then stage 1 tokenises one shard of documents at a time (`tokenize_shard`) and stage 2
builds one shard of examples (data/preparation.py reads `tokenizer`)."""

from __future__ import annotations

import multiprocessing
import os
from collections import Counter

from etils import epath

from data import records
from data.corpora import split_sentences
from models.tokenizer import Tokenizer

tokenizer: Tokenizer | None = None  # this process's, loaded once by `init`


def init(tokenizer_dir: str, pooled: bool = False) -> None:
    global tokenizer
    if pooled:  # one thread per worker process: the pool, not Rust's threads, uses the cores
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tokenizer = Tokenizer.load(tokenizer_dir)


def tokenize_shard(job) -> dict:
    """Splits, tokenises, cleans and writes one shard of documents; returns its counts."""
    shard, docs, folder, max_doc_tokens = job  # docs: [(is_eval, text)]
    tok = tokenizer
    stats = Counter()
    sentences_of = []
    stats["documents_read"] += len(docs)
    for _, text in docs:
        stats["repaired_non_utf8_documents"] += "\ufffd" in text
        sentences_of.append(split_sentences(text))
    encoded = iter(tok.encode_batch([s for doc in sentences_of for s in doc]))
    out = {"train": [], "eval": []}
    for (is_eval, _), doc in zip(docs, sentences_of):
        sentences = [next(encoded) for _ in doc]
        kept = [s for s in sentences if s]
        stats["dropped_empty_sentences"] += len(sentences) - len(kept)
        if not kept:
            stats["dropped_empty_documents"] += 1
            continue
        stats["one_sentence_documents"] += len(kept) == 1
        # Documents far longer than usual are split at sentence boundaries into several.
        pieces, current, length = [], [], 0
        for s in kept:
            if current and length + len(s) > max_doc_tokens:
                pieces.append(current)
                current, length = [], 0
            current.append(s)
            length += len(s)
        pieces.append(current)
        stats["long_documents_split"] += len(pieces) > 1
        split = "eval" if is_eval else "train"
        for piece in pieces:
            out[split].append(records.encode_document(piece))
            stats[f"{split}_documents"] += 1
            stats["sentences"] += len(piece)
            stats["tokens"] += sum(map(len, piece))
    for split, recs in out.items():
        if recs:
            records.write_records(epath.Path(folder) / f"docs-{split}-{shard:05d}.array_record",
                                  recs)
    return dict(stats)


def pool(workers: int, tokenizer_dir: str):
    """Worker processes (spawned: the parent may hold JAX threads), or None for in-process."""
    init(tokenizer_dir)
    if workers <= 0:
        return None
    return multiprocessing.get_context("spawn").Pool(workers, init, (tokenizer_dir, True))


def run(workers_pool, fn, jobs):
    return workers_pool.imap(fn, jobs) if workers_pool is not None else map(fn, jobs)
