"""The production data pipeline: prepare (sources, bad input, reports, TFDS), grain resume and
per-process shares, packed and SOP examples."""

import functools
import json

import numpy as np
import pytest

from conftest import tiny_config, unmasked
from data import records
from data.corpora import load_documents
from data.pipeline import ArrayRecordSource, batch_bits
from data.pretraining import KEYS, PretrainingData
from data.wheels import DataError
from pretrain import prepare as prepare_mod
from data.preparation import prepare
from training.errors import UserError

BATCH = dict(seed=3, max_predictions=5)


def data_config(data_dir, **overrides):
    c = tiny_config().data  # pydocs, vocab 512, length 32, dupe 1
    c.data_dir = str(data_dir)
    c.prepare_workers = 0
    for k, v in overrides.items():
        c[k] = v
    return c


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """pydocs NSP examples of 32 tokens, about 30k of them."""
    return PretrainingData(prepare(data_config(tmp_path_factory.mktemp("pipe")), verbose=False))


def same(a: dict, b: dict) -> bool:
    return all(np.array_equal(a[k], b[k]) for k in KEYS)


# ---------------------------------------------------------------------------------------------
# Resume and sharding
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("workers", [0, 2])
def test_resume_from_saved_state_equals_uninterrupted_stream(small, workers):
    kwargs = dict(BATCH, workers=workers, prefetch=2)
    it = small.train_iterator(8, **kwargs)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint holds
    expected = [next(it) for _ in range(3)]
    it.close()
    resumed = small.train_iterator(8, **kwargs)
    resumed.set_state(state)
    got = [next(resumed) for _ in range(3)]
    resumed.close()
    assert all(same(e, g) for e, g in zip(expected, got))
    # Worker processes change nothing: the stream is that of batches read directly.
    assert all(same(e, small.batch(3 + i, 8, **BATCH)) for i, e in enumerate(expected))


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_shares_are_disjoint_balanced_and_make_the_global_batch(small, process_count):
    glob_ds = small.train_dataset(16, **BATCH)
    shares = [small.train_dataset(16, process_index=i, process_count=process_count, **BATCH)
              for i in range(process_count)]
    for step in (0, 1, 7):
        parts = [s[step] for s in shares]
        assert {len(p["input_ids"]) for p in parts} == {16 // process_count}  # balanced
        full = glob_ds[step]
        for key in KEYS:  # masks included: they do not depend on the process count
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), full[key])
    # Disjoint: the shares are different stream positions (rows of the global batch); their
    # masks come from different (step, index) keys, so even equal texts are masked differently.
    rows = [tuple(r) for s in shares for r in s[0]["input_ids"]]
    assert len(set(rows)) == len(rows)


def test_dynamic_masks_are_a_pure_function_of_seed_step_and_row(small):
    records_ = [small.source("train")[i] for i in range(4)]
    masker = small._masker(range(0, 4), 3, 1, 5, 0.15, False)
    first = masker(0, records_)
    assert same(first, masker(0, records_))  # a pure function of where the rows sit
    # The same records as another step's rows, in other rows of the batch, or with another seed
    # get other masks.
    others = [masker(1, records_), masker(1000, records_),
              small._masker(range(4, 8), 3, 1, 5, 0.15, False)(0, records_),
              small._masker(range(0, 4), 4, 1, 5, 0.15, False)(0, records_)]
    for other in others:
        assert not np.array_equal(first["masked_positions"], other["masked_positions"])
        np.testing.assert_array_equal(unmasked(first), unmasked(other))


def test_batch_bits_of_a_row_range_are_those_rows_of_the_whole_batch():
    whole = batch_bits(3, 7, 11, range(0, 12), 2 * 33)  # words per row not a multiple of 4
    assert whole.shape == (12, 66) and whole.dtype == np.uint64
    for rows in (range(0, 1), range(5, 9), range(11, 12)):
        np.testing.assert_array_equal(batch_bits(3, 7, 11, rows, 66), whole[rows.start:rows.stop])
    for seed, tag, step in ((4, 7, 11), (3, 8, 11), (3, 7, 12)):
        assert not np.array_equal(batch_bits(seed, tag, step, range(0, 12), 66), whole)
    # Uniform: the high bits split evenly (an eighth each, within 5 sigma).
    eighths = np.bincount((batch_bits(0, 0, 0, range(0, 1000), 256) >> np.uint64(61)).ravel())
    assert (abs(eighths / 256_000 - 1 / 8) < 5 * np.sqrt(1 / 8 * 7 / 8 / 256_000)).all()


def test_array_record_source_reads_what_grain_reads(small, tmp_path):
    import pickle

    import grain

    source = small.source("train")
    paths = [str(tmp_path / f"part-{i}.array_record") for i in range(3)]
    for path, (start, stop) in zip(paths, [(0, 120), (120, 120), (120, 200)]):  # one is empty
        records.write_records(path, [source[i] for i in range(start, stop)])
    ours, grains = ArrayRecordSource(paths), grain.sources.ArrayRecordDataSource(paths)
    assert len(ours) == len(grains) == 200
    picks = [0, 119, 120, 199, *np.random.default_rng(0).integers(0, 200, 100)]
    assert [ours[i] for i in picks] == [grains[i] for i in picks]
    copy = pickle.loads(pickle.dumps(ours))  # what grain worker processes get
    assert [copy[i] for i in picks] == [grains[i] for i in picks]
    with pytest.raises(IndexError):
        ours[200]


# ---------------------------------------------------------------------------------------------
# Prepare: parallel shards, bad input, reports, cache
# ---------------------------------------------------------------------------------------------

def _write_bad_corpus(folder):
    lines = [
        b"A normal document. It has two sentences here.\nAnd a third line.\n\n",
        b"Bytes that are not UTF-8: \xff\xfe here. Another sentence follows it.\n\n",
        b"Only one sentence in this document.\n\n",
        b"\x01\x02\x03\n\n",  # control characters: tokenises to nothing
        b"word " * 400 + b"\n\n",  # one sentence far longer than a sequence
        b"".join(b"Sentence number %d is here.\n" % i for i in range(60)) + b"\n",  # long doc
    ]
    (folder / "bad.txt").write_bytes(b"".join(lines))
    (folder / "more.jsonl").write_text(json.dumps({"text": "   "}) + "\n"
                                       + json.dumps({"text": "Last doc. Two parts."}) + "\n")


def test_bad_input_is_repaired_counted_and_training_goes_on(tmp_path):
    (tmp_path / "text").mkdir()
    _write_bad_corpus(tmp_path / "text")
    dc = data_config(tmp_path / "cache", source=f"files:{tmp_path}/text/*", vocab_size=200,
                     eval_fraction=0.0, max_doc_tokens=120, shard_documents=3)
    folder = prepare(dc, verbose=False)
    report = json.loads((folder.parent / "report.json").read_text())
    assert report["documents_read"] == 8
    assert report["repaired_non_utf8_documents"] == 1
    assert report["dropped_empty_documents"] == 2  # control characters, blank JSONL text
    assert report["one_sentence_documents"] == 2  # the one-sentence doc and the 400 words
    assert report["long_documents_split"] == 1
    assert report["train_documents"] > 6  # the long document became several
    examples = json.loads((folder / "report.json").read_text())
    assert examples["long_sentences_split"] >= 1
    data = PretrainingData(folder)
    batch = data.batch(0, 8, **BATCH)
    assert batch["input_ids"].shape == (8, 32)


def test_empty_corpus_is_one_clear_line(tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text(json.dumps({"text": ""}) + "\n")
    with pytest.raises(UserError, match="gave no training documents with text"):
        prepare(data_config(tmp_path / "c", source=f"files:{tmp_path}/*.jsonl"), verbose=False)
    with pytest.raises(SystemExit) as exit_info:
        prepare_mod.main([f"--config.data.source=files:{tmp_path}/*.jsonl",
                          f"--config.data.data_dir={tmp_path / 'c'}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "no training documents" in err


def test_worker_processes_write_the_same_files(tmp_path):
    serial = prepare(data_config(tmp_path / "a", shard_documents=20), verbose=False)
    # The same tokenizer: WordPiece training itself is not reproducible across processes.
    parallel = prepare(data_config(tmp_path / "b", shard_documents=20, prepare_workers=2,
                                   tokenizer=str(serial.parent / "tokenizer")), verbose=False)
    names = sorted(p.name for p in serial.glob("*.array_record"))
    assert len(names) >= 4 and names == sorted(p.name for p in parallel.glob("*.array_record"))
    for name in names:
        assert (serial / name).read_bytes() == (parallel / name).read_bytes()


# ---------------------------------------------------------------------------------------------
# Objectives: packed MLM-only rows, sentence order
# ---------------------------------------------------------------------------------------------

def test_packed_sequences_respect_length_and_separators(tmp_path):
    folder = prepare(data_config(tmp_path, objective="mlm_packed"), verbose=False)
    data = PretrainingData(folder)
    tok = data.tokenizer
    dtype = np.dtype(data.meta["dtype"])
    rows = [records.decode_example(r, dtype) for r in data.source("train")]
    lengths = np.array([len(ids) for ids, _, _ in rows])
    assert lengths.max() <= 32 and np.median(lengths) >= 28  # full sentences fill the rows
    boundaries = 0
    for ids, type_start, label in rows:
        assert ids[0] == tok.cls_id and ids[-1] == tok.sep_id and label == 0
        assert type_start == len(ids)  # one segment: token types all 0
        assert tok.cls_id not in ids[1:] and tok.pad_id not in ids
        inner = ids[1:-1]
        boundaries += (inner == tok.sep_id).sum()
        assert not (len(inner) and (inner[0] == tok.sep_id or inner[-1] == tok.sep_id))
    documents = json.loads((folder.parent / "report.json").read_text())["train_documents"]
    assert 0 < boundaries < documents  # [SEP] between documents, inside rows only
    batch = data.batch(0, 8, **BATCH)
    assert (batch["next_sentence_labels"] == 0).all() and (batch["token_type_ids"] == 0).all()


def _document_numbers_by_loop(ids, sep_id):
    """attention_mask as agreed with the model: 0 on padding, documents numbered 1, 2, ...; the
    [SEP] that ends a document is that document's."""
    out, doc = [], 1
    for token in ids.tolist():
        out.append(doc if token else 0)
        doc += token == sep_id
    return out


def test_packed_rows_number_their_documents(tmp_path):
    data = PretrainingData(prepare(data_config(tmp_path, objective="mlm_packed"), verbose=False))
    sep = data.tokenizer.sep_id
    ds = data.train_dataset(16, **BATCH)
    for step in range(8):
        batch = ds[step]
        original = unmasked(batch)  # [SEP] is never masked, nor put in by a random replacement
        expected = [_document_numbers_by_loop(row, sep) for row in original]
        np.testing.assert_array_equal(batch["attention_mask"], expected)
        # Masks see only real tokens, whatever their number.
        rows, slots = np.nonzero(batch["masked_weights"])
        assert (batch["attention_mask"][rows, batch["masked_positions"][rows, slots]] > 0).all()
    # Rows that cross a document boundary (under 1% of pydocs rows: its documents are long).
    dtype = np.dtype(data.meta["dtype"])
    crossing = [r for r in data.source("train")
                if (records.decode_example(r, dtype)[0][1:-1] == sep).any()][:16]
    assert len(crossing) >= 8
    batch = data._masker(range(0, len(crossing)), 3, 1, 5, 0.15, False)(0, crossing)
    expected = [_document_numbers_by_loop(row, sep) for row in unmasked(batch)]
    np.testing.assert_array_equal(batch["attention_mask"], expected)
    assert (batch["attention_mask"].max(axis=1) == 2).all()
    # Shares of the processes number the same: the rows are the same.
    parts = [data.train_dataset(16, process_index=i, process_count=2, **BATCH)[3]
             for i in range(2)]
    np.testing.assert_array_equal(np.concatenate([p["attention_mask"] for p in parts]),
                                  ds[3]["attention_mask"])
    # Sentence pairs keep 1 on every real token.
    pairs = PretrainingData(prepare(data_config(tmp_path), verbose=False)).batch(0, 16, **BATCH)
    assert set(np.unique(pairs["attention_mask"]).tolist()) <= {0, 1}


def test_sop_labels_are_balanced_and_mean_swapped(tmp_path):
    folder = prepare(data_config(tmp_path, objective="sop"), verbose=False)
    data = PretrainingData(folder)
    labels = np.array([records.decode_example(r, np.dtype(data.meta["dtype"]))[2]
                       for r in data.source("train")])
    assert 0.45 < labels.mean() < 0.55


# ---------------------------------------------------------------------------------------------
# TFDS without TensorFlow
# ---------------------------------------------------------------------------------------------

@functools.cache  # TFDS registers a builder class by name, once per session
def _tiny_tfds_builder():
    import tensorflow_datasets as tfds

    class TinyPretraxText(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                {"title": tfds.features.Text(), "text": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(12):
                yield i, {"title": f"Title {i}",
                          "text": f"Document {i} starts here. It goes on for a while.\nEnd {i}."}

    return TinyPretraxText


def _tiny_tfds(data_dir):
    _tiny_tfds_builder()(data_dir=str(data_dir), file_format="array_record").download_and_prepare()


def test_tfds_source_from_a_prepared_builder(tmp_path):
    _tiny_tfds(tmp_path)
    docs = load_documents("tfds:tiny_pretrax_text", tmp_path)
    assert len(docs) == 12
    assert sorted(docs)[0] == "Title 0\nDocument 0 starts here. It goes on for a while.\nEnd 0."
    folder = prepare(data_config(tmp_path, source="tfds:tiny_pretrax_text", vocab_size=120,
                                 max_seq_len=16), verbose=False)
    assert json.loads((folder.parent / "report.json").read_text())["sentences"] == 12 * 4


def test_missing_tfds_dataset_is_one_line(tmp_path):
    with pytest.raises(DataError) as info:
        load_documents("tfds:wikipedia/20230601.en", tmp_path)
    message = str(info.value)
    assert "\n" not in message and "not prepared" in message
    assert f"tfds build wikipedia --data_dir {tmp_path} --file_format=array_record" in message
    with pytest.raises(UserError, match="not prepared"):
        prepare(data_config(tmp_path, source="tfds:wikipedia/20230601.en"), verbose=False)
