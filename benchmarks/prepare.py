"""How fast is `python -m pretrain.prepare`? Tokens/s on the news corpus and a larger synthetic one.

    python benchmarks/prepare.py [--workers 1,2] [--synthetic-copies 4] [--formats jsonl,parquet]
                                 [--out DIR]

Each measurement is a fresh `python -m pretrain.prepare` process on an empty data dir (the
news wheel is linked in from ~/.cache/pretrax/wheels so that nothing is downloaded), timed from
start to exit: the documents read, split into sentences, tokenised (the fast batch API) and
written, then the NSP examples made and written (configs/bert_tiny.py: vocabulary 8,192, 64
tokens, dupe_factor 5), in shards of 500 documents (`data.shard_documents`: 8 shards of news).

  1. news, the WordPiece vocabulary trained as well (one process, no workers)
  2. news with that vocabulary given (`data.tokenizer`), with 0 (in-process), 1 and 2 workers:
     the tokenising and example stages alone, what scales with cores
  3. a synthetic corpus `--synthetic-copies` times the news corpus (its sentences drawn at
     random into new documents of news-like length), written on tmpfs (/dev/shm: in memory) in
     each of `--formats`: a JSON-lines file, and Parquet shards as the hub ships them (4 files,
     row groups of 1,000 documents, snappy, an id and a url column beside the text), prepared
     with the same vocabulary and 2 workers
  4. the serial part of one process, for each format: reading the documents and handing them
     to its workers (the parent's work, which more workers do not share)

Tokens/s counts the WordPiece tokens of the prepared documents (report.json) over wall time;
tokens per CPU second divides them by the CPU time of the process and its workers (the per-core
rate, which other jobs on a shared machine do not change much).
Results and the projection to English Wikipedia: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import pickle
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WHEELS = Path("~/.cache/pretrax/wheels").expanduser()
SHARD_DOCUMENTS = 500


def _children_cpu() -> float:
    """User + system CPU seconds of every finished child process (the workers included: each
    process waits for its own), so that a busy machine does not change the per-core rate."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_prepare(data_dir: Path, **fields) -> dict:
    """One `python -m pretrain.prepare` process; its wall time and the two reports."""
    data_dir.mkdir(parents=True)
    (data_dir / "wheels").symlink_to(WHEELS)
    fields = {"data_dir": data_dir, "shard_documents": SHARD_DOCUMENTS, **fields}
    flags = [f"--config.data.{k}={v}" for k, v in fields.items()]
    start, cpu = time.perf_counter(), _children_cpu()
    subprocess.run([sys.executable, "-m", "pretrain.prepare", "--config", "configs/bert_tiny.py", *flags],
                   cwd=REPO, check=True, capture_output=True, text=True)
    seconds, cpu = time.perf_counter() - start, _children_cpu() - cpu
    (tokens_report,) = data_dir.glob("prepared/*/report.json")
    (examples_report,) = data_dir.glob("prepared/*/nsp-*/report.json")
    tokens = json.loads(tokens_report.read_text())
    examples = json.loads(examples_report.read_text())
    return {"seconds": seconds, "tokens": tokens["tokens"], "documents": tokens["documents_read"],
            "tokens_stage_s": tokens["seconds"], "examples_stage_s": examples["seconds"],
            "examples": examples["train_examples"], "tokens_per_s": tokens["tokens"] / seconds,
            "cpu_seconds": cpu, "tokens_per_cpu_s": tokens["tokens"] / cpu,
            "tokenizer_dir": str(tokens_report.parent / "tokenizer")}


def synthetic_corpus(path: Path, copies: int, seed: int = 0) -> int:
    """News sentences shuffled into `copies` x as many documents of the same lengths."""
    from data.corpora import load_documents, split_sentences

    docs = load_documents("news", WHEELS.parent)
    sentences = [s for d in docs for s in split_sentences(d)]
    lengths = [len(split_sentences(d)) for d in docs]
    rng = random.Random(seed)
    n = 0
    with open(path, "w") as f:
        for _ in range(copies):
            for length in lengths:
                text = " ".join(rng.choices(sentences, k=max(length, 1)))
                f.write(json.dumps({"text": text}) + "\n")
                n += 1
    return n


def parquet_copy(jsonl: Path, folder: Path, files: int = 4, row_group: int = 1000) -> str:
    """The JSON-lines corpus as Parquet shards (what `parquet:` reads); their glob."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [json.loads(line)["text"] for line in jsonl.read_text().splitlines()]
    per = -(-len(texts) // files)
    folder.mkdir()
    for i in range(files):
        part = texts[i * per:(i + 1) * per]
        table = pa.table({"id": range(i * per, i * per + len(part)), "text": part,
                          "url": [f"https://example.com/{i}/{j}" for j in range(len(part))]})
        pq.write_table(table, folder / f"train-{i:05d}-of-{files:05d}.parquet",
                       row_group_size=row_group, compression="snappy")
    return f"{folder}/*.parquet"


def serial_seconds(source: str, data_dir: Path, shard_documents: int = SHARD_DOCUMENTS) -> float:
    """Tokens/s of what the parent process does alone: read every document, cut shards, draw
    the eval coin and pickle each shard for a worker (tokens from the news report)."""
    from data.corpora import open_documents
    from data.preparation import _is_eval

    start = time.perf_counter()
    docs = open_documents(source, data_dir)
    for lo in range(0, len(docs), shard_documents):
        texts = docs.read(lo, lo + shard_documents)
        pickle.dumps([(_is_eval(i, 12345, 0.02), t) for i, t in enumerate(texts, lo)])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--synthetic-copies", type=int, default=4)
    parser.add_argument("--formats", default="jsonl,parquet",
                        help="the synthetic corpus's formats (jsonl, parquet)")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows["news, vocabulary trained, 0 workers"] = full = run_prepare(tmp / "full")
        vocab = full["tokenizer_dir"]
        for w in [int(w) for w in args.workers.split(",") if w]:
            rows[f"news, vocabulary given, {w} workers"] = run_prepare(
                tmp / f"news{w}", tokenizer=vocab, prepare_workers=w)
        with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
            corpus = Path(shm) / "synthetic.jsonl"
            documents = synthetic_corpus(corpus, args.synthetic_copies)
            sources = {"jsonl": f"files:{corpus}"}
            if "parquet" in args.formats:
                sources["parquet"] = f"parquet:{parquet_copy(corpus, Path(shm) / 'parquet')}"
            for fmt in args.formats.split(","):
                name = (f"synthetic {args.synthetic_copies}x news ({documents} documents, {fmt} "
                        f"on tmpfs), vocabulary given, 2 workers")
                rows[name] = run_prepare(tmp / f"synthetic-{fmt}", source=sources[fmt],
                                         tokenizer=vocab, prepare_workers=2)
                seconds = serial_seconds(sources[fmt], tmp)
                rows[f"serial part (read + shard + pickle), synthetic corpus, {fmt}"] = {
                    "seconds": seconds, "tokens": rows[name]["tokens"],
                    "tokens_per_s": rows[name]["tokens"] / seconds}
    for name, r in rows.items():
        r.pop("tokenizer_dir", None)
        extra = (f", stages {r['tokens_stage_s']:.1f} s + {r['examples_stage_s']:.1f} s; "
                 f"{r['cpu_seconds']:.1f} CPU s = {r['tokens_per_cpu_s']:,.0f} tokens per CPU "
                 f"second" if "tokens_stage_s" in r else "")
        print(f"{name}: {r['tokens']:,} tokens in {r['seconds']:.1f} s = "
              f"{r['tokens_per_s']:,.0f} tokens/s{extra}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
