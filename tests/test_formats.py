"""The corpora a pod user brings: Parquet shards (local and gs://) and `datasets` folders.

The corpus is real text (CPython's help topics) with broken rows among it: a null text, an empty
one, and one with non-UTF-8 bytes. Written as Parquet shards of several row groups (with other
columns beside the text), it must prepare exactly the examples of the same documents as JSONL;
from a bucket, across two processes, and from a `datasets` save_to_disk folder, the same again.
"""

import json
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from etils import epath

from conftest import cli_error, tiny_flags
from data.corpora import load_documents, parse_sources
from data.wheels import DataError
from gcs import BUCKET
from data.preparation import prepare
from pretrain.prepare import main as prepare_main
from test_prepare import data_config, done_markers, examples
from training import storage

REPO = Path(__file__).resolve().parents[1]
BAD_BYTES = b"The caf\xe9 sign was written in Latin-1. It still reads."  # not UTF-8


@pytest.fixture(scope="module")
def rows():
    """The corpus as Parquet holds it: str, None (null), "" and raw non-UTF-8 bytes."""
    docs: list = load_documents("pydocs", "")[:60]
    docs[5], docs[17], docs[30] = None, "", BAD_BYTES
    return docs


def as_text(row) -> str:
    """What a reader of the row must see: null is empty, bad bytes become U+FFFD."""
    if row is None:
        return ""
    return row.decode("utf-8", errors="replace") if isinstance(row, bytes) else row


def write_parquet(folder: Path, rows, files: int = 3, row_group: int = 7, column="text") -> Path:
    """`files` Parquet shards of the rows in order, row groups of `row_group` rows, the text
    column between an id and a url column. Bad bytes go into the string column unvalidated, as
    writers in other languages leave them."""
    folder.mkdir(parents=True, exist_ok=True)
    per = -(-len(rows) // files)
    for i in range(files):
        part = rows[i * per:(i + 1) * per]
        raw = [r.encode() if isinstance(r, str) else r for r in part]
        text = pa.array(raw, type=pa.binary()).view(pa.string())
        table = pa.table({"id": range(i * per, i * per + len(part)), column: text,
                          "url": [f"https://docs.python.org/{j}" for j in range(len(part))]})
        pq.write_table(table, folder / f"part-{i:05d}.parquet", row_group_size=row_group)
    return folder


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps({"text": as_text(r)}) + "\n" for r in rows))
    return path


# Shards of 8 documents over row groups of 7 and files of 20 rows: every shard reads across a
# row-group boundary, some across a file boundary.
SMALL = {"data.shard_documents": 8}


def prepared(data_dir, source, **overrides):
    return prepare(data_config(data_dir, **{"data.source": source, **SMALL, **overrides}),
                   verbose=False)


def token_report(folder) -> dict:
    report = json.loads((epath.Path(folder).parent / "report.json").read_text())
    return {k: v for k, v in report.items() if k not in ("source", "seconds")}


@pytest.fixture(scope="module")
def from_jsonl(tmp_path_factory, rows):
    root = tmp_path_factory.mktemp("jsonl")
    folder = prepared(root / "data", f"files:{write_jsonl(root / 'corpus.jsonl', rows)}")
    return folder, examples(folder)


# ---------------------------------------------------------------------------------------------
# Must-show 1: Parquet prepares like JSONL, from a bucket too, in two processes like one
# ---------------------------------------------------------------------------------------------

def test_parquet_shards_prepare_the_examples_of_the_same_jsonl(tmp_path, rows, from_jsonl):
    shards = write_parquet(tmp_path / "corpus", rows)
    assert [pq.ParquetFile(p).num_row_groups for p in sorted(shards.iterdir())] == [3, 3, 3]
    assert load_documents(f"parquet:{shards}/*.parquet", "") == [as_text(r) for r in rows]
    folder = prepared(tmp_path / "data", f"parquet:{shards}/*.parquet")
    assert examples(folder) == from_jsonl[1]
    report = token_report(folder)
    assert report == token_report(from_jsonl[0])
    assert report["documents_read"] == 60 and report["repaired_non_utf8_documents"] == 1
    assert report["dropped_empty_documents"] == 2  # the null and the empty text


def test_a_named_column_and_a_binary_column_read_the_same(tmp_path, rows):
    write_parquet(tmp_path / "body", rows, files=1, row_group=11, column="body")
    got = load_documents(f"parquet:{tmp_path}/body/*.parquet:body", "")
    table = pa.table({"body": pa.array([r.encode() if isinstance(r, str) else r for r in rows],
                                       type=pa.binary())})
    pq.write_table(table, tmp_path / "binary.parquet", row_group_size=13)
    assert got == load_documents(f"parquet:{tmp_path}/binary.parquet:body", "") \
        == [as_text(r) for r in rows]


def test_ranges_read_only_the_row_groups_they_overlap(tmp_path, rows, monkeypatch):
    from data import columnar
    shards = write_parquet(tmp_path / "corpus", rows)
    docs = columnar.ParquetDocuments(f"{shards}/*.parquet")
    read = []
    batches = columnar.ParquetDocuments._batches
    monkeypatch.setattr(columnar.ParquetDocuments, "_batches",
                        lambda self, piece: read.append(piece) or batches(self, piece))
    assert docs.read(16, 24) == [as_text(r) for r in rows[16:24]]
    names = [Path(p).name for p, _ in read]
    # rows 16-19: the first file's last group (14-19); rows 20-23: the second file's first (0-6)
    assert list(zip(names, [g for _, g in read])) == [("part-00000.parquet", 2),
                                                      ("part-00001.parquet", 0)]


def test_ranges_read_in_order_decode_each_batch_once(tmp_path, rows, monkeypatch):
    """A large row group read a range at a time (as the vocabulary's pass reads it) is decoded
    once, not again from its start for every range."""
    from data import columnar
    write_parquet(tmp_path / "one", rows, files=1, row_group=60)
    monkeypatch.setattr(columnar, "BATCH_ROWS", 4)
    docs = columnar.ParquetDocuments(f"{tmp_path}/one/*.parquet")
    decoded = []
    texts = columnar._texts
    monkeypatch.setattr(columnar, "_texts", lambda column: decoded.append(len(column)) or texts(column))
    batches = columnar.ParquetDocuments._batches

    def counted(self, piece):
        decoded.append("start")
        yield from batches(self, piece)
    monkeypatch.setattr(columnar.ParquetDocuments, "_batches", counted)
    got = [doc for lo in range(0, 60, 5) for doc in docs.read(lo, lo + 5)]
    assert got == [as_text(r) for r in rows]
    assert decoded.count("start") == 1  # one pass over the row group's 15 batches
    assert sum(n for n in decoded if n != "start") == 60  # each row decoded once
    assert docs.read(2, 4) == got[2:4]  # going back starts the row group again
    assert decoded.count("start") == 2


def test_two_processes_share_the_parquet_shards_like_one(tmp_path, rows, from_jsonl):
    shards = write_parquet(tmp_path / "corpus", rows)
    dc, result = data_config(tmp_path / "two", **{"data.source": f"parquet:{shards}/*.parquet",
                                                  **SMALL}), {}
    second = threading.Thread(target=lambda: result.update(
        folder=prepare(dc, verbose=False, process_index=1, process_count=2)))
    second.start()
    folder = prepare(dc, verbose=False, process_index=0, process_count=2)
    second.join(timeout=120)
    assert result["folder"] == folder and examples(folder) == from_jsonl[1]
    by = [m["process"] for n, m in done_markers(Path(folder).parent).items() if n != "tokenizer"]
    assert by == [0, 1, 0, 1, 0, 1, 0, 1]  # 60 documents in 8 shards, alternating


@pytest.mark.slow  # two processes through launch.local: about a minute
def test_two_processes_of_the_prepare_cli_make_the_one_process_folder(tmp_path, rows, from_jsonl):
    shards = write_parquet(tmp_path / "corpus", rows)
    result = subprocess.run([sys.executable, "-m", "launch.local", "--num_processes", "2", "--",
                             sys.executable, "-m", "pretrain.prepare",
                             *tiny_flags(tmp_path / "data", data__source=f"parquet:{shards}/*.parquet",
                                         data__shard_documents=8)],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (meta,) = (tmp_path / "data" / "prepared").glob("*/nsp-*/meta.json")
    assert examples(meta.parent) == from_jsonl[1]
    assert {m["process"] for n, m in done_markers(meta.parent.parent).items()
            if n != "tokenizer"} == {0, 1}


def test_parquet_on_a_bucket_prepares_like_the_local_files(gcs, tmp_path, rows, from_jsonl):
    shards = write_parquet(tmp_path / "corpus", rows)
    bucket = f"gs://{BUCKET}/{tmp_path.name}"
    storage.upload(shards, f"{bucket}/corpus")
    source = f"parquet:{bucket}/corpus/*.parquet"
    assert load_documents(source, "") == [as_text(r) for r in rows]
    folder = prepared(f"{bucket}/data", source)  # into the bucket, as a pod run prepares
    assert examples(folder) == from_jsonl[1]
    assert epath.Path(bucket, "data", "prepared", Path(folder).parent.name, "report.json").exists()


def test_a_mixture_of_parquet_and_jsonl_prepares(tmp_path, rows):
    shards = write_parquet(tmp_path / "corpus", rows)
    notes = write_jsonl(tmp_path / "notes.jsonl", [f"Note {i} is short. It has {i} items."
                                                   for i in range(30)])
    folder = prepared(tmp_path / "data", f"parquet:{shards}/*.parquet:0.6,files:{notes}:0.4")
    sources = json.loads((epath.Path(folder) / "report.json").read_text())["sources"]
    assert [(r["source"], r["weight"]) for r in sources] == [
        (f"parquet:{shards}/*.parquet", 0.6), (f"files:{notes}", 0.4)]
    assert sources[0]["train_documents"] > 0 and sources[0]["train_examples"] > 0


def test_a_mixture_takes_parquet_and_hf_sources():
    assert parse_sources("parquet:gs://b/c/*.parquet:body:0.3,hf:/data/wiki:train:text:0.7") == [
        ("parquet:gs://b/c/*.parquet:body", 0.3), ("hf:/data/wiki:train:text", 0.7)]
    assert parse_sources("parquet:gs://b/c/*.parquet:body") == [("parquet:gs://b/c/*.parquet:body", 1.0)]


def run_pretrain(workdir, data_dir, source, **extra) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "pretrain", "--workdir", str(workdir),
                             *tiny_flags(data_dir, data__source=source, train__steps=2,
                                         checkpoint__every_steps=2, **extra)],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow  # about 100 s each on the shared 2-core machine
@pytest.mark.parametrize("where", ["local", "gcs"])
def test_pretraining_runs_on_parquet(request, tmp_path, rows, where):
    shards = write_parquet(tmp_path / "corpus", rows)
    root = tmp_path
    if where == "gcs":
        request.getfixturevalue("gcs")
        root = epath.Path(f"gs://{BUCKET}/train-{tmp_path.name}")
        storage.upload(shards, f"{root}/corpus")
    out = run_pretrain(root / "run", root / "data", f"parquet:{root}/corpus/*.parquet").stdout
    assert "dropped_empty_documents=2" in out and "repaired_non_utf8_documents=1" in out
    assert (epath.Path(root) / "run" / "checkpoints" / "2").exists()


# ---------------------------------------------------------------------------------------------
# Must-show 2: a `datasets` save_to_disk folder prepares like the same texts in Parquet
# ---------------------------------------------------------------------------------------------

def test_a_saved_dataset_prepares_like_the_same_texts_in_parquet(tmp_path, rows):
    datasets = pytest.importorskip("datasets")
    texts = [None if r is None else as_text(r) for r in rows]  # Arrow strings are UTF-8
    single = datasets.Dataset.from_dict({"id": list(range(60)), "text": texts})
    single.save_to_disk(str(tmp_path / "saved"), max_shard_size="4KB")  # several Arrow files
    assert len(list((tmp_path / "saved").glob("*.arrow"))) > 1
    datasets.DatasetDict({"train": single, "validation": single.select(range(5))}).save_to_disk(
        str(tmp_path / "dict"))
    shards = write_parquet(tmp_path / "corpus", [t.encode() if t else t for t in texts])
    want = examples(prepared(tmp_path / "pq", f"parquet:{shards}/*.parquet"))
    assert examples(prepared(tmp_path / "hf", f"hf:{tmp_path}/saved")) == want
    assert examples(prepared(tmp_path / "hf_dict", f"hf:{tmp_path}/dict:train:text")) == want
    assert load_documents(f"hf:{tmp_path}/dict:validation", "") == texts[:5]
    with pytest.raises(DataError, match="no split 'test'; its splits are train, validation"):
        load_documents(f"hf:{tmp_path}/dict:test", "")


def test_a_dataset_in_the_datasets_cache_is_read_without_network(tmp_path, rows, monkeypatch):
    """A hub dataset's cache layout (NAME/config/version/hash/*-SPLIT.arrow), as load_dataset
    leaves it; made here from local Parquet files by the `parquet` builder."""
    datasets = pytest.importorskip("datasets")
    texts = [None if r is None else as_text(r) for r in rows]
    shards = write_parquet(tmp_path / "corpus", [t.encode() if t else t for t in texts])
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    datasets.load_dataset("parquet", data_files=sorted(map(str, shards.glob("*.parquet"))),
                          cache_dir=str(tmp_path / "cache"))
    assert load_documents("hf:parquet", "") == [as_text(t) for t in texts]
    assert load_documents("hf:parquet:train:text", "") == [as_text(t) for t in texts]


# ---------------------------------------------------------------------------------------------
# Must-show 4: bad input is one line, and nothing is written
# ---------------------------------------------------------------------------------------------

def test_bad_parquet_and_hf_sources_are_one_line_and_write_nothing(capsys, tmp_path, rows,
                                                                   monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty_cache"))
    write_parquet(tmp_path / "corpus", rows, files=1)
    (tmp_path / "corpus" / "notes.txt").write_text("not a parquet file\n")
    cases = {
        f"parquet:{tmp_path}/nowhere/*.parquet": "no files match",
        f"parquet:{tmp_path}/corpus/*.parquet:body": "has no column 'body'; its columns are id, text, url",
        f"parquet:{tmp_path}/corpus/*": "notes.txt is not a Parquet file",
        f"hf:{tmp_path}/corpus": "is not a dataset saved with save_to_disk",
        "hf:someone/missing": "nor a dataset with a 'train' split in the datasets cache",
    }
    for source, says in cases.items():
        data_dir = tmp_path / "data"
        err = cli_error(capsys, prepare_main, tiny_flags(data_dir, data__source=source))
        assert says in err, err
        assert not data_dir.exists(), f"{source} wrote {list(data_dir.rglob('*'))}"
