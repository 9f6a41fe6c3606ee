"""Labelled datasets: the embedded tasks' fixed splits, encoding, and GLUE through mock TFDS data."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from data.tasks import GLUE, GLUE_LABELS, encode, load_task, subsample
from data.wheels import DataError
from finetune import tasks
from models.tokenizer import Tokenizer


def test_rt_polarity_fixed_split_without_leaks(data_dir):
    data = load_task("rt_polarity", data_dir)
    s = data.splits
    assert data.label_names == ["rotten", "fresh"] and not data.pair
    n = sum(len(x) for x in s.values())
    assert 12_700 < n <= 12_752  # 12,808 snippets, duplicates dropped
    for name in ("dev", "test"):
        assert 0.09 < len(s[name]) / n < 0.12
        assert 0.5 < s[name].labels.mean() < 0.7  # fresh is the majority, as overall (58%)
    texts = [set(x.text_a) for x in s.values()]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    again = load_task("rt_polarity", data_dir)  # fixed: the same every time
    assert again.splits["test"].text_a == s["test"].text_a
    assert np.array_equal(again.splits["dev"].labels, s["dev"].labels)


@pytest.mark.parametrize("name,classes,sizes", [("reuters_r8", 8, (4937, 548, 2189)),
                                                ("newsgroups20", 20, (10164, 1129, 7528))])
def test_orange_tasks(data_dir, name, classes, sizes):
    data = load_task(name, data_dir)
    assert len(data.label_names) == classes
    assert tuple(len(data.splits[k]) for k in ("train", "dev", "test")) == sizes
    assert set(np.unique(data.splits["test"].labels)) == set(range(classes))


def test_subsample_is_fixed_and_nested_in_the_split(data_dir):
    train = load_task("rt_polarity", data_dir).splits["train"]
    a, b = subsample(train, 100), subsample(train, 100)
    assert len(a) == 100 and a.text_a == b.text_a and set(a.text_a) <= set(train.text_a)
    assert subsample(train, 0) is train


def test_encode_matches_the_tokenizers_pair_encoding():
    texts_a = ["the quick brown fox jumps over the lazy dog " * 3, "short one", "a b c"]
    texts_b = ["tiny", "a much longer second sentence about many things " * 2, "d e f g"]
    tok = Tokenizer.train(texts_a + texts_b, vocab_size=120)
    from data.tasks import Split
    split = Split(texts_a, texts_b, np.array([0, 1, 0]), np.arange(3))
    for max_len in (8, 13, 64):
        out = encode(split, tok, max_len)
        for i in range(3):
            ids, types = tok.encode_pair(texts_a[i], texts_b[i], max_len)
            n = len(ids)
            assert out["input_ids"][i, :n].tolist() == ids and out["token_type_ids"][i, :n].tolist() == types
            assert out["attention_mask"][i].sum() == n and not out["input_ids"][i, n:].any()
    single = encode(Split(texts_a, None, np.zeros(3), np.arange(3)), tok, 10)
    assert single["input_ids"][0, 0] == tok.cls_id and not single["token_type_ids"].any()


# ---- GLUE through tfds.data_source, on TFDS's mock data -------------------------------------

def hand_metrics(task, labels, preds):
    """The GLUE metrics from counts, written out independently of finetune/tasks.py."""
    out = {"accuracy": float(np.mean(labels == preds))}
    if task.regression:
        x, y = labels - labels.mean(), preds - preds.mean()
        out["pearson"] = float(x @ y / np.sqrt((x @ x) * (y @ y)))
        import scipy.stats
        out["spearman"] = float(scipy.stats.spearmanr(labels, preds).statistic)
        return out
    tp = np.sum((preds == 1) & (labels == 1)); tn = np.sum((preds == 0) & (labels == 0))
    fp = np.sum((preds == 1) & (labels == 0)); fn = np.sum((preds == 0) & (labels == 1))
    out["f1"] = float(2 * tp / (2 * tp + fp + fn))
    out["matthews_corr"] = float((tp * tn - fp * fn) / np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
    return out


@pytest.mark.parametrize("config", list(GLUE))
def test_glue_wiring_on_mock_data(config, tmp_path):
    name = f"glue/{config}"
    task = tasks.get_task(name)
    with tfds.testing.mock_data(num_examples=12):
        data = load_task(name, tmp_path)
    fields, split_names = GLUE[config]
    assert set(data.splits) == set(split_names)
    assert data.pair == (len(fields) == 2) and task.regression == (config == "stsb")
    assert task.kind == (tasks.REGRESSION if task.regression else tasks.PAIR if data.pair else tasks.SINGLE)
    assert data.label_names == GLUE_LABELS[config] and data.num_outputs == (len(GLUE_LABELS[config] or [0]))
    dev = data.splits["dev"]
    assert len(dev) == 12 and all(isinstance(t, str) for t in dev.text_a)
    assert (dev.text_b is not None) == (len(fields) == 2)

    tok = Tokenizer.train(data.splits["train"].text_a + (data.splits["train"].text_b or []), 64)
    enc = encode(dev, tok, 16)
    assert enc["input_ids"].shape == (12, 16) and (enc["token_type_ids"].any() == (len(fields) == 2))

    # Metrics of predictions that get some examples wrong, against the hand formulas.
    labels = dev.labels
    if task.regression:
        preds = labels + np.linspace(-0.3, 0.3, len(labels)) ** 2
    else:
        labels = np.array([0, 1] * 6) if data.num_outputs == 2 else np.arange(12) % 3
        preds = labels.copy()
        preds[[0, 3, 4]] = (preds[[0, 3, 4]] + 1) % data.num_outputs
    got = task.evaluate(labels, preds)
    want = hand_metrics(task, labels.astype(float), preds.astype(float))
    assert set(got) == set(task.metrics)
    for metric in task.metrics:
        assert got[metric] == pytest.approx(want[metric], abs=1e-9), metric


def test_glue_not_prepared_is_one_line(tmp_path):
    with pytest.raises(DataError) as e:
        load_task("glue/rte", tmp_path)
    msg = str(e.value)
    assert "not prepared" in msg and "tfds build glue --config rte" in msg and "\n" not in msg
    assert not (tmp_path / "downloads").exists()  # nothing was downloaded


def test_unknown_task(tmp_path):
    with pytest.raises(DataError, match="unknown task 'glue/sst3'"):
        load_task("glue/sst3", tmp_path)
