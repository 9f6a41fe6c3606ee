"""Preparation: a text source turned into pretraining examples on disk, once (the command line is
`python -m pretrain.prepare`, pretrain/prepare.py).

Turns a text source into pretraining examples on disk, once; `python -m pretrain` calls the same
`prepare` and reuses what is there. Two cached stages under `data.data_dir/prepared/`:

  <tokens key>/                  documents split into sentences and tokenised (depends on the
    tokenizer/                   source, the tokenizer, data.eval_fraction, data.seed and
    docs-{train,eval}-NNNNN.array_record, report.json          data.shard_documents)
  <tokens key>/<objective>-<key>/  examples (depends on objective, max_seq_len, short_seq_prob,
    {train,eval}-NNNNN.array_record, meta.json, report.json        dupe_factor and data.seed)
  each with done/NAME.json       one marker per finished shard (and the tokenizer), with its counts

Documents go in shards of `data.shard_documents` (read a range at a time: a TFDS dataset reads
only the shard's records); each shard's output depends only on its contents and index, so the
result does not depend on how many processes or workers made it. On a multi-process run
(`python -m pretrain` or `python -m pretrain.prepare` with `--coordinator ... --num_processes N
--process_id I`, or `python -m launch.local`) process I prepares shards I, I + N, ... into the
shared folder, each process with `data.prepare_workers` worker processes (0: itself; they call
the tokenizer's batch API, one thread each).

Commit without renames (a bucket has none that is atomic): a shard's files are written first,
then its done marker; process 0 waits until every shard has a marker and then writes the
manifest (report.json for stage 1; report.json then meta.json for stage 2) last, and the other
processes wait for it. Only a folder with its manifest is used; a rerun after a crash or SIGKILL
keeps the shards that have markers and prepares the rest (what is unmarked is written again).
Concurrent runs on one data dir write the same bytes to the same names.

A mixture (`data.source=news:0.7,task:rt_polarity:0.3`) prepares each source as above, all with
one tokenizer (data.tokenizer, else a WordPiece vocabulary trained on every source's train
documents, cached in `prepared/tokenizer-<key>/`), and writes `prepared/mix-<key>/meta.json`
listing them with their weights (last, by process 0), and a report of each source's share of the
train stream and how many mixed examples one pass over it takes (data/pretraining.py mixes them).

Bad input never stops a run; the reports count it: documents with non-UTF-8 bytes (replaced by
U+FFFD, which the tokenizer drops), empty documents and sentences (dropped), one-sentence
documents (kept: NSP pairs them with a random next; SOP cuts the sentence), documents longer than
data.max_doc_tokens (split into several), sentences longer than a sequence (cut into pieces).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter

import numpy as np
from etils import epath

from data import records, shard_workers, shards
from data.corpora import (MAX_SKIPPED_SHARE, iter_documents, open_documents, parse_sources,
                          source_fingerprint)
from data.wheels import DataError
from data.examples import iter_packed_sequences, iter_pair_instances
from models.tokenizer import Tokenizer
from infra import storage
from infra.errors import UserError

FORMAT_VERSION = 3  # bump when the files change meaning (3: tokenizer ids independent of hash order)
OBJECTIVES = ("nsp", "sop", "mlm_packed")
_SPLIT_TAG = 0x53504C54  # "SPLT": train/eval document split
_PAIRS_TAG = 0x50414952  # "PAIR": instance creation
_EVAL_TAG = 0x4556414C  # "EVAL"


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _is_eval(index: int, seed: int, eval_fraction: float) -> bool:
    """Seeded per-document coin, so documents can stream; the first document is always eval
    (when eval_fraction > 0) so that small corpora have an eval split."""
    if eval_fraction <= 0:
        return False
    if index == 0:
        return True
    h = hashlib.blake2b(f"{seed}:{_SPLIT_TAG}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2.0**64 < eval_fraction


# ---------------------------------------------------------------------------------------------
# Stage 1: documents -> sentences -> token ids (data/shard_workers.py: tokenize_shard)
# ---------------------------------------------------------------------------------------------

def _tokens_stage(dc, data_dir: epath.Path, sources_dir: epath.Path, workers: int,
                  share: shards.Share) -> epath.Path:
    if dc.tokenizer:
        tok_dir = epath.Path(dc.tokenizer).expanduser()  # a local folder or gs://
        files = [tok_dir / n for n in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")]
        tokenizer_key = [(f.name, hashlib.sha256(f.read_bytes()).hexdigest())
                         for f in files if f.exists()]
        if not tokenizer_key:
            raise DataError(f"data.tokenizer={dc.tokenizer}: no tokenizer.json or vocab.txt there")
    else:
        tokenizer_key = [_tokenizer_kind(dc), dc.vocab_size]
    # shard_documents is part of the key: NSP draws its random next sentences within a shard.
    key = _digest(FORMAT_VERSION, source_fingerprint(dc.source), tokenizer_key,
                  dc.eval_fraction, dc.seed, dc.max_doc_tokens, dc.shard_documents)
    final = data_dir / "prepared" / key
    if (final / "report.json").exists():
        return final

    start = time.perf_counter()
    final.mkdir(parents=True, exist_ok=True)
    if share.index == 0 and not shards.done_path(final, "tokenizer").exists():
        if dc.tokenizer:
            tokenizer = Tokenizer.load(epath.Path(dc.tokenizer).expanduser())
        else:
            tokenizer = Tokenizer.train(_train_texts(dc, [dc.source], sources_dir), dc.vocab_size,
                                        kind=_tokenizer_kind(dc))
        tokenizer.save(final / "tokenizer")
        shards.mark_done(final, "tokenizer", {"vocab_size": tokenizer.vocab_size})
    shards.wait_for([shards.done_path(final, "tokenizer")], f"process 0 to write {final / 'tokenizer'}")

    documents = open_documents(dc.source, sources_dir, **_reading(dc))
    size = dc.shard_documents
    names = [f"docs-{shard:05d}" for shard in range(-(-len(documents) // size))]

    def job(name: str):
        shard = int(name.rsplit("-", 1)[1])
        texts = documents.read(shard * size, (shard + 1) * size)
        docs = [(_is_eval(i, dc.seed, dc.eval_fraction), text)
                for i, text in enumerate(texts, shard * size)]
        return shard, docs, str(final), dc.max_doc_tokens

    todo = shards.todo(final, names, share)
    pool = shard_workers.pool(min(workers, len(todo)), str(final / "tokenizer"))
    try:
        tokenized = shard_workers.run(pool, shard_workers.tokenize_shard, map(job, todo))
        for name, shard_stats in zip(todo, tokenized):
            shards.mark_done(final, name, {"process": share.index, "counts": shard_stats})
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    stats = Counter()
    for done in shards.shards_of_all(final, names):
        stats.update(done["counts"])
    vocab_size = json.loads(shards.done_path(final, "tokenizer").read_text())["vocab_size"]
    report = {"source": dc.source, **{k: stats.get(k, 0) for k in (
        "documents_read", "train_documents", "eval_documents", "sentences", "tokens",
        "repaired_non_utf8_documents", "dropped_empty_documents", "dropped_empty_sentences",
        "one_sentence_documents", "long_documents_split")},
              "vocab_size": vocab_size, "tokenizer": dc.tokenizer or "trained",
              # bad lines of JSONL files, skipped
              "skipped_lines": getattr(documents, "skipped", 0),
              "first_skipped_lines": list(getattr(documents, "skipped_at", ())),
              "shards": len(names), "processes": share.count, "workers": workers,
              "seconds": round(time.perf_counter() - start, 2)}
    if report["train_documents"] == 0:
        raise DataError(f"data.source={dc.source} gave no training documents with text "
                        f"({report['dropped_empty_documents']} empty, "
                        f"{report['eval_documents']} held out for eval); give a corpus "
                        f"with text")
    shards.commit(final, share, {"report.json": report})
    return final


def _tokenizer_kind(dc) -> str:
    """data.tokenizer_kind (wordpiece | bpe) where the family's config has it; BERT's: wordpiece."""
    return dc.get("tokenizer_kind", "wordpiece")


def _reading(dc) -> dict:
    """What a bad line of a JSONL corpus does (data/corpora.py: open_documents)."""
    return {"strict": dc.get("strict", False),
            "max_skipped_share": dc.get("max_skipped_share", MAX_SKIPPED_SHARE)}


def _train_texts(dc, sources, sources_dir):
    """The train documents of `sources` (what a trained WordPiece vocabulary learns from)."""
    for source in sources:
        for i, text in enumerate(iter_documents(source, sources_dir, **_reading(dc))):
            if not _is_eval(i, dc.seed, dc.eval_fraction):
                yield text


# ---------------------------------------------------------------------------------------------
# Stage 2: token ids -> examples
# ---------------------------------------------------------------------------------------------

def _examples_shard(job) -> dict:
    """Examples of one document shard, written as one ArrayRecord file; returns counts."""
    (split, shard, src, dst, objective, max_seq_len, short_seq_prob, passes, seed,
     dtype) = job
    tok = shard_workers.tokenizer
    documents = [records.decode_document(r) for r in records.read_records(src)]
    stats = Counter()
    # A sentence longer than a sequence would be cut to one sequence's worth and the rest lost:
    # cut it into pieces that fit instead.
    limit = max_seq_len - (2 if objective == "mlm_packed" else 3)
    cut = []
    for doc in documents:
        out = []
        for s in doc:
            if len(s) > limit:
                stats["long_sentences_split"] += 1
                out.extend(s[i:i + limit] for i in range(0, len(s), limit))
            else:
                out.append(s)
        cut.append(out)
    recs = []
    for p in range(passes):
        if objective == "mlm_packed":
            for content in iter_packed_sequences(cut, max_seq_len, tok.sep_id):
                ids = [tok.cls_id, *content, tok.sep_id]
                recs.append(records.encode_example(ids, len(ids), 0, dtype))
                stats["document_separators"] += content.count(tok.sep_id)
        else:
            tag = _EVAL_TAG if split == "eval" else p
            rng = np.random.default_rng([seed, _PAIRS_TAG, tag, shard])
            for a, b, label in iter_pair_instances(cut, max_seq_len, short_seq_prob, rng,
                                                   sop=objective == "sop"):
                ids = [tok.cls_id, *a, tok.sep_id, *b, tok.sep_id]
                recs.append(records.encode_example(ids, len(a) + 2, label, dtype))
                stats["label_1"] += label
    if recs:
        records.write_records(dst, recs)
    stats["examples"] = len(recs)
    return dict(stats)


def _examples_stage(dc, tokens_dir: epath.Path, workers: int, share: shards.Share) -> epath.Path:
    if dc.objective not in OBJECTIVES:
        raise DataError(f"data.objective={dc.objective!r}; choose one of {', '.join(OBJECTIVES)}")
    passes = 1 if dc.objective == "mlm_packed" else dc.dupe_factor
    key = _digest(FORMAT_VERSION, dc.objective, dc.max_seq_len, dc.short_seq_prob, passes,
                  dc.seed)
    final = tokens_dir / f"{dc.objective}-{key}"
    if (final / "meta.json").exists():
        return final
    start = time.perf_counter()
    final.mkdir(parents=True, exist_ok=True)
    vocab_size = json.loads((tokens_dir / "report.json").read_text())["vocab_size"]
    dtype = records.ids_dtype(vocab_size)
    jobs = {}  # shard name -> job, in the order of the examples
    for split in ("train", "eval"):
        for src in sorted(tokens_dir.glob(f"docs-{split}-*.array_record")):
            shard = int(src.stem.rsplit("-", 1)[1])
            name = f"{split}-{shard:05d}"
            jobs[name] = (split, shard, str(src), str(final / f"{name}.array_record"),
                          dc.objective, dc.max_seq_len, dc.short_seq_prob,
                          passes if split == "train" else 1, dc.seed, dtype.str)
    todo = shards.todo(final, list(jobs), share)
    pool = shard_workers.pool(min(workers, len(todo)), str(tokens_dir / "tokenizer"))
    try:
        for name, shard_stats in zip(todo, shard_workers.run(pool, _examples_shard, [jobs[n] for n in todo])):
            shards.mark_done(final, name, {"process": share.index, "counts": shard_stats})
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    stats, names = {"train": Counter(), "eval": Counter()}, {"train": [], "eval": []}
    for name, done in zip(jobs, shards.shards_of_all(final, list(jobs))):
        split = jobs[name][0]
        stats[split].update(done["counts"])
        if done["counts"]["examples"]:
            names[split].append(f"{name}.array_record")
    if not stats["train"]["examples"]:
        raise DataError(f"data.source={dc.source} gave no {dc.objective} training examples")
    meta = {"objective": dc.objective, "max_seq_len": dc.max_seq_len, "dtype": dtype.str,
            "train_files": names["train"], "eval_files": names["eval"],
            "train_examples": stats["train"]["examples"],
            "eval_examples": stats["eval"]["examples"]}
    report = {**meta, "passes": passes, "short_seq_prob": dc.short_seq_prob,
              "long_sentences_split": stats["train"]["long_sentences_split"]
              + stats["eval"]["long_sentences_split"],
              "train_label_1": stats["train"]["label_1"],
              "document_separators": stats["train"]["document_separators"],
              "processes": share.count, "seconds": round(time.perf_counter() - start, 2)}
    shards.commit(final, share, {"report.json": report, "meta.json": meta})
    return final


# ---------------------------------------------------------------------------------------------
# Mixtures: one tokenizer, each source prepared, a folder that lists them
# ---------------------------------------------------------------------------------------------

def _with(dc, **fields):
    """A copy of config group `data` with some fields changed (one source of a mixture)."""
    part = dc.copy_and_resolve_references()
    for k, v in fields.items():
        part[k] = v
    return part


def _mixture_tokenizer(dc, sources: list[str], data_dir: epath.Path, sources_dir: epath.Path,
                       share: shards.Share) -> epath.Path:
    """A vocabulary trained on every source's train documents, cached."""
    kind = [] if _tokenizer_kind(dc) == "wordpiece" else [_tokenizer_kind(dc)]  # older keys stay
    key = _digest(FORMAT_VERSION, [source_fingerprint(s) for s in sources], dc.vocab_size,
                  dc.eval_fraction, dc.seed, *kind)
    final = data_dir / "prepared" / f"tokenizer-{key}"
    if share.index == 0 and not shards.done_path(final, "tokenizer").exists():
        Tokenizer.train(_train_texts(dc, sources, sources_dir), dc.vocab_size,
                        kind=_tokenizer_kind(dc)).save(final)
        shards.mark_done(final, "tokenizer", {})
    shards.wait_for([shards.done_path(final, "tokenizer")], f"process 0 to write {final}")
    return final


def _mixture_stage(dc, parts: list[tuple], data_dir: epath.Path, share: shards.Share) -> epath.Path:
    """`prepared/mix-<key>/`: meta.json naming each source's examples folder (relative to
    prepared/) with its weight, and report.json with each source's share."""
    prepared = data_dir / "prepared"
    total = sum(weight for _, weight, _, _ in parts)
    rows, metas = [], []
    for source, weight, tokens_dir, examples_dir in parts:
        meta = json.loads((examples_dir / "meta.json").read_text())
        tokens = json.loads((tokens_dir / "report.json").read_text())
        metas.append(meta)
        fraction = weight / total
        rows.append({"source": source, "weight": weight, "share": round(fraction, 4),
                     "folder": str(examples_dir.relative_to(prepared)),
                     "train_examples": meta["train_examples"], "eval_examples": meta["eval_examples"],
                     "train_documents": tokens["train_documents"], "tokens": tokens["tokens"],
                     # mixed examples per pass over this source
                     "epoch_every": round(meta["train_examples"] / fraction)})
    assert len({m["dtype"] for m in metas}) == 1, "one tokenizer, one id dtype"
    key = _digest(FORMAT_VERSION, [(r["folder"], r["weight"]) for r in rows])
    final = prepared / f"mix-{key}"
    if (final / "meta.json").exists():
        return final
    final.mkdir(parents=True, exist_ok=True)
    meta = {"objective": dc.objective, "max_seq_len": dc.max_seq_len, "dtype": metas[0]["dtype"],
            "train_examples": sum(m["train_examples"] for m in metas),
            "eval_examples": sum(m["eval_examples"] for m in metas),
            "parts": [{k: r[k] for k in ("source", "weight", "folder")} for r in rows]}
    shards.commit(final, share, {"report.json": {"source": dc.source, "sources": rows},
                           "meta.json": meta})
    return final


# ---------------------------------------------------------------------------------------------
# Both stages
# ---------------------------------------------------------------------------------------------

def _workers(n: int) -> int:
    return os.cpu_count() or 1 if n < 0 else n


def prepare(dc, *, verbose: bool = True, process_index: int = 0,
            process_count: int = 1) -> epath.Path:
    """Prepares (or finds in the cache) the examples of config group `data`; returns their folder
    (for `data.pretraining.PretrainingData`). Every process of a multi-process run calls it with
    its index: each prepares its share of the shards, and all return once process 0 has
    committed the folder.

    On a gs:// data_dir every process prepares its share into the bucket, and the committed
    folder is copied into a local mirror for training to read (ArrayRecord's open-source build
    reads local files only; see `_readable`)."""
    data_dir = storage.as_path(dc.data_dir)
    workers = _workers(dc.prepare_workers)
    share = shards.Share(process_index, process_count)
    try:
        sources = parse_sources(dc.source)
        # The sources are read from local files: a bucket's TFDS datasets are copied down.
        sources_dir = storage.local_data_dir(data_dir, storage.tfds_names([s for s, _ in sources]))
        tokenizer = dc.tokenizer
        if len(sources) > 1 and not tokenizer:
            tokenizer = str(_mixture_tokenizer(dc, [s for s, _ in sources], data_dir, sources_dir,
                                               share))
        parts = []
        for source, weight in sources:
            part = dc if (source, tokenizer) == (dc.source, dc.tokenizer) else _with(
                dc, source=source, tokenizer=tokenizer)
            tokens_dir = _tokens_stage(part, data_dir, sources_dir, workers, share)
            parts.append((source, weight, tokens_dir,
                          _examples_stage(part, tokens_dir, workers, share)))
        folder = parts[0][3] if len(parts) == 1 else _mixture_stage(dc, parts, data_dir, share)
    except DataError as e:  # bad input the user can fix: one line from the CLIs
        raise UserError(str(e)) from None
    if verbose and share.index == 0:
        total = sum(weight for _, weight, _, _ in parts)
        for source, weight, tokens_dir, examples_dir in parts:
            mixed = ""
            if len(parts) > 1:
                n = json.loads((examples_dir / "meta.json").read_text())["train_examples"]
                mixed = (f" (share {weight / total:.3f} of the mixture: one pass every "
                         f"{n * total / weight:,.0f} mixed examples)")
            print(f"pretraining data {source}{mixed}: {_summary(dc, tokens_dir, examples_dir)}")
        if len(parts) > 1:
            print(f"pretraining data mixture of {len(parts)} sources ({folder})")
    return _readable(folder)


def _readable(folder: epath.Path) -> epath.Path:
    """A committed folder as training reads it: itself when local; for a bucket folder, its
    local mirror, with what `data.pretraining.PretrainingData` opens copied down (the folder,
    each part of a mixture, and their tokenizer)."""
    if not storage.is_remote(folder):
        return folder
    meta = json.loads((folder / "meta.json").read_text())
    parts = [p["folder"] for p in meta.get("parts", [])] or [folder.name]
    base = folder.parent  # the parts are named relative to it
    names = {folder.name, *parts, *(f"{p.rsplit('/', 1)[0]}/tokenizer" if "/" in p else "tokenizer"
                                    for p in parts)}
    return storage.local_data_dir(base, sorted(names)) / folder.name


def _summary(dc, tokens_dir: epath.Path, examples_dir: epath.Path) -> str:
    """One source's report in one line."""
    t = json.loads((tokens_dir / "report.json").read_text())
    e = json.loads((examples_dir / "report.json").read_text())
    dropped = {k: t[k] for k in ("repaired_non_utf8_documents", "dropped_empty_documents",
                                 "one_sentence_documents", "long_documents_split") if t[k]}
    if e["long_sentences_split"]:
        dropped["long_sentences_split"] = e["long_sentences_split"]
    if t.get("skipped_lines"):  # reports written before bad lines were skipped have none
        dropped["skipped_lines"] = f"{t['skipped_lines']} (first {t['first_skipped_lines'][0]})"
    return (f"{t['train_documents']} + {t['eval_documents']} documents, {t['sentences']} "
            f"sentences, {t['tokens']} tokens -> {e['train_examples']} train / "
            f"{e['eval_examples']} eval {dc.objective} examples of {dc.max_seq_len} tokens"
            + (f"; {', '.join(f'{k}={v}' for k, v in dropped.items())}" if dropped else "")
            + f" ({examples_dir})")
