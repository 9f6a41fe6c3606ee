"""Preparation at scale: shares of the shards per process, the manifest as the commit, SIGKILL
and rerun, TFDS read in batches.

The processes of a run each prepare shards index, index + count, ... of the same deterministic
shard list; process 0 writes the manifest (report.json, meta.json) after every shard's done
marker exists. The prepared folder (its examples, in order) must not depend on how many
processes or workers made it, and nothing without a manifest or marker may be trusted.

`storage` names where the shared folders live: a tmp folder, or a `gs://` bucket on the fake GCS
server of tests/gcs.py (every process prepares its share into the bucket).
"""

import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from etils import epath

from conftest import tiny_config, tiny_flags
from data import records
from data.corpora import load_documents
from gcs import BUCKET
from data.preparation import prepare
from test_distributed import assert_close, compilation_cache, env, losses, run  # noqa: F401
from test_pipeline import _tiny_tfds

REPO = Path(__file__).resolve().parents[1]
SHARDS = {"data.shard_documents": 10}  # pydocs' 79 documents in 8 shards: work for everyone
STORAGES = ["local", "gcs"]


@pytest.fixture(params=STORAGES)
def storage(request, tmp_path):
    """The root of the shared folders (workdirs and data dirs) of one test."""
    if request.param == "gcs":
        request.getfixturevalue("gcs")
        return epath.Path(f"gs://{BUCKET}/{tmp_path.name}")
    return epath.Path(tmp_path / "shared")


def examples(folder) -> dict:
    """What a prepared folder holds for training: its examples in order, and its vocabulary."""
    folder = epath.Path(folder)
    meta = json.loads((folder / "meta.json").read_text())
    out = {split: [r for name in meta[f"{split}_files"]
                   for r in records.read_records(folder / name)] for split in ("train", "eval")}
    out["vocab"] = (folder.parent / "tokenizer" / "vocab.txt").read_text()
    out["dtype"] = meta["dtype"]
    return out


def done_markers(folder) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text())
            for p in sorted(epath.Path(folder, "done").glob("*.json"))}


def data_config(data_dir, **overrides):
    return tiny_config(**{"data.data_dir": str(data_dir), **SHARDS, **overrides}).data


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The examples one process prepares (in this process, no workers)."""
    folder = prepare(data_config(tmp_path_factory.mktemp("reference")), verbose=False)
    return folder, examples(folder)


# ---------------------------------------------------------------------------------------------
# Shares: two processes' halves make the one-process folder
# ---------------------------------------------------------------------------------------------

def test_two_shares_make_the_single_process_folder(tmp_path, reference):
    """Two callers of one run (threads here; processes below), each with its share."""
    dc, result = data_config(tmp_path), {}
    second = threading.Thread(target=lambda: result.update(
        folder=prepare(dc, verbose=False, process_index=1, process_count=2)))
    second.start()
    folder = prepare(dc, verbose=False, process_index=0, process_count=2)
    second.join(timeout=120)
    assert result["folder"] == folder
    assert examples(folder) == reference[1]
    assert Path(folder).name == Path(reference[0]).name  # the same cache key
    tokens_by = [m["process"] for n, m in done_markers(Path(folder).parent).items()
                 if n != "tokenizer"]
    assert tokens_by == [0, 1] * 4  # shards 0, 2, 4, 6 by process 0; 1, 3, 5, 7 by process 1
    examples_by = [m["process"] for m in done_markers(folder).values()]
    assert set(examples_by) == {0, 1} and len(examples_by) > 8
    report = json.loads((Path(folder).parent / "report.json").read_text())
    assert report["processes"] == 2 and report["shards"] == 8


# ---------------------------------------------------------------------------------------------
# Must-show 2: 2 processes x 4 devices prepare a share each and train like 1 process
# ---------------------------------------------------------------------------------------------

STEPS = 4


def pretrain_flags(root, name):
    return ["--workdir", str(root / name), *tiny_flags(
        root / f"data_{name}", train__steps=STEPS, checkpoint__every_steps=STEPS, mesh__data=2,
        mesh__fsdp=2, mesh__tensor=2, data__shard_documents=10)]


def prepared_folder(data_dir) -> epath.Path:
    (meta,) = epath.Path(data_dir, "prepared").glob("*/nsp-*/meta.json")
    return meta.parent


@pytest.mark.slow  # about 2 minutes on the shared 2-core machine
def test_two_processes_prepare_shares_and_train_like_one(storage):
    run([sys.executable, "-m", "pretrain", "--cpu_devices", "8", *pretrain_flags(storage, "one")])
    out = run([sys.executable, "-m", "launch.local", "--num_processes", "2",
               "--devices_per_process", "4", "--", sys.executable, "-m", "pretrain",
               *pretrain_flags(storage, "two")])
    one, two = prepared_folder(storage / "data_one"), prepared_folder(storage / "data_two")
    assert examples(two) == examples(one)
    for stage in (two.parent, two):  # every process prepared a share of both stages
        by = {m["process"] for name, m in done_markers(stage).items() if name != "tokenizer"}
        assert by == {0, 1}, stage
    assert json.loads((two / "report.json").read_text())["processes"] == 2
    assert "[0] pretraining data pydocs:" in out and "[1] pretraining data" not in out
    assert sorted(losses(storage / "two")) == list(range(1, STEPS + 1))
    assert_close(losses(storage / "two"), losses(storage / "one"), range(1, STEPS + 1), tol=1e-5)


def test_prepare_cli_on_two_processes_makes_the_single_process_folder(storage, reference):
    out = run([sys.executable, "-m", "launch.local", "--num_processes", "2", "--",
               sys.executable, "-m", "pretrain.prepare",
               *tiny_flags(storage / "data", data__shard_documents=10)])
    folder = prepared_folder(storage / "data")
    assert examples(folder) == reference[1]
    assert {m["process"] for n, m in done_markers(folder.parent).items() if n != "tokenizer"} \
        == {0, 1}
    assert "[0] pretraining data pydocs:" in out and "[1] pretraining data" not in out


# ---------------------------------------------------------------------------------------------
# Must-show 4: SIGKILL during preparation; the rerun trusts only what was complete
# ---------------------------------------------------------------------------------------------

# Stops for good just before the done marker of one shard: that shard's files are written but
# not marked, earlier shards are marked, no manifest exists. Then the test SIGKILLs it.
HOLD_MARKER = """
import os, sys, time
from data import shards
from pretrain import prepare
hold, mark = os.environ["PRETRAX_TEST_HOLD_MARKER"], shards.mark_done
def held(folder, name, content):
    if name == hold:
        print(f"holding the marker of {folder}/{name}", flush=True)
        time.sleep(3600)
    mark(folder, name, content)
shards.mark_done = held
sys.argv[0] = "pretrain.prepare"
prepare.main()
"""


@pytest.mark.parametrize("stage, shard", [("tokens", "docs-00002"), ("examples", "train-00002")])
def test_sigkill_during_preparation_then_rerun_gets_the_same_examples(storage, tmp_path, reference,
                                                                        stage, shard):
    data_dir = storage / "data"
    flags = tiny_flags(data_dir, data__shard_documents=10)
    log = tmp_path / "prepare.log"
    with open(log, "w") as out:
        held = subprocess.Popen([sys.executable, "-c", HOLD_MARKER, *flags], cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT,
                                env=env(PRETRAX_TEST_HOLD_MARKER=shard))
    try:
        deadline = time.time() + 120
        while "holding the marker" not in log.read_text():
            assert held.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        held.send_signal(signal.SIGKILL)
        held.wait(timeout=30)
    finally:
        if held.poll() is None:
            held.kill()
    (tokens,) = [p for p in (data_dir / "prepared").iterdir() if not p.name.startswith(".")]
    folder = tokens if stage == "tokens" else next(tokens.glob("nsp-*"))
    assert not (folder / "report.json").exists() and not (folder / "meta.json").exists()
    kind = "docs" if stage == "tokens" else "train"
    assert set(done_markers(folder)) - {"tokenizer"} == {f"{kind}-00000", f"{kind}-00001"}
    assert list(folder.glob(f"*{shard.split('-')[1]}.array_record")), "the unmarked shard's files"

    result = subprocess.run([sys.executable, "-m", "pretrain.prepare", *flags], cwd=REPO,
                            capture_output=True, text=True, timeout=300, env=env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    resumed = re.search(rf"2 of (\d+) shards of {re.escape(str(folder))} were done by an earlier "
                        rf"run; preparing the other (\d+)", result.stdout)
    assert resumed and int(resumed[1]) - 2 == int(resumed[2]), result.stdout
    assert examples(prepared_folder(data_dir)) == reference[1]


# ---------------------------------------------------------------------------------------------
# TFDS text sources, read a batch of records at a time
# ---------------------------------------------------------------------------------------------

def test_tfds_text_documents_are_read_in_batches(tmp_path, monkeypatch):
    _tiny_tfds(tmp_path)  # 12 documents
    from tensorflow_datasets.core.data_sources import array_record

    batches = []
    getitems = array_record.ArrayRecordDataSource.__getitems__
    monkeypatch.setattr(array_record.ArrayRecordDataSource, "__getitems__",
                        lambda self, keys: batches.append((threading.get_ident(), list(keys)))
                        or getitems(self, keys))
    monkeypatch.setattr(array_record.ArrayRecordDataSource, "__getitem__", None)  # never one by one
    monkeypatch.setattr("data.corpora.READ_BATCH", 5)
    docs = load_documents("tfds:tiny_pretrax_text", tmp_path)
    assert len(docs) == 12 and docs == load_documents("tfds:tiny_pretrax_text", tmp_path)
    assert [keys for _, keys in batches[:3]] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11]]
    # Each process of a run reads only its own shards' records (two callers, as above).
    batches.clear()
    monkeypatch.setattr("data.corpora.READ_BATCH", 100)  # the vocabulary's pass: one read of 12
    dc = tiny_config(**{"data.data_dir": str(tmp_path), "data.source": "tfds:tiny_pretrax_text",
                        "data.shard_documents": 3, "data.vocab_size": 120,
                        "data.max_seq_len": 16}).data
    second = threading.Thread(target=prepare, args=(dc,),
                              kwargs=dict(verbose=False, process_index=1, process_count=2))
    second.start()
    prepare(dc, verbose=False, process_index=0, process_count=2)
    second.join(timeout=120)
    # The vocabulary is learned from one pass (tokenizers pulls it from a thread of its own).
    assert [keys for _, keys in batches].count(list(range(12))) == 1
    by_thread = {}
    for thread, keys in batches:
        if len(keys) <= 3:
            by_thread.setdefault(thread, []).append(keys)
    assert by_thread == {threading.main_thread().ident: [[0, 1, 2], [6, 7, 8]],
                         second.ident: [[3, 4, 5], [9, 10, 11]]}


def test_two_shares_of_a_mixture_make_the_single_process_folders(tmp_path):
    """A mixture: one vocabulary learned by process 0, each source's shards shared, the mixture's
    manifest written by process 0."""
    (tmp_path / "notes.jsonl").write_text("".join(
        json.dumps({"text": f"Note {i} is short. It has two sentences about {i * 3} items."}) + "\n"
        for i in range(40)))
    mix = {"data.source": f"pydocs:0.7,files:{tmp_path}/notes.jsonl:0.3"}
    one = prepare(data_config(tmp_path / "one", **mix), verbose=False)
    dc, result = data_config(tmp_path / "two", **mix), {}
    second = threading.Thread(target=lambda: result.update(
        folder=prepare(dc, verbose=False, process_index=1, process_count=2)))
    second.start()
    two = prepare(dc, verbose=False, process_index=0, process_count=2)
    second.join(timeout=120)
    assert result["folder"] == two and Path(two).name == Path(one).name
    meta = json.loads((Path(two) / "meta.json").read_text())
    assert meta == json.loads((Path(one) / "meta.json").read_text())
    for part in meta["parts"]:
        got, want = (Path(root, "prepared", part["folder"]) for root in (tmp_path / "two",
                                                                         tmp_path / "one"))
        assert examples(got) == examples(want)


def test_a_tfds_dataset_on_a_bucket_prepares_like_the_local_one(gcs, tmp_path):
    """TFDS data on the bucket (as a pod reads it): the dataset is copied down for reading, the
    examples are prepared into the bucket, and they equal a local data dir's."""
    from training import storage as files
    _tiny_tfds(tmp_path / "local")
    bucket = f"gs://{BUCKET}/{tmp_path.name}/data"
    files.upload(tmp_path / "local" / "tiny_pretrax_text", f"{bucket}/tiny_pretrax_text")
    tfds = dict(source="tfds:tiny_pretrax_text", vocab_size=120, max_seq_len=16)
    local = prepare(data_config(tmp_path / "local", **tfds), verbose=False)
    mirrored = prepare(data_config(bucket, **tfds), verbose=False)
    assert examples(mirrored) == examples(local)
    assert str(mirrored).startswith(str(files.mirror_path(bucket)))  # training reads the mirror
    assert epath.Path(bucket, "prepared", local.parent.name, "report.json").exists()
