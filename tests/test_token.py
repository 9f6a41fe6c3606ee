"""Token classification (the `token` kind): CoNLL reading and its one-line errors, word-to-sub-token
alignment, the loss and per-word predictions, seqeval's entity scores on hand-counted cases, and
parity of the BERT and ModernBERT token classifiers with transformers' in both directions."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from seqeval import metrics as seqeval

from data.conll import IGNORE, TokenSplit, detect_scheme, encode_words, load_token_task, read_conll
from data.tasks import load_task
from data.wheels import DataError
from finetune import token
from finetune.__main__ import main as finetune_main
from finetune.tasks import TOKEN, get_task
from finetune.bert import PositionClassifier
from finetune.text import labelled_parts
from models import hf, hf_cli
from models.bert import BertConfig
from models.modernbert import ModernBertConfig, ModernBertForPositionClassification
from models.tokenizer import Tokenizer
from conftest import TINY_FT, cli_error, perturbed_params

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-5
LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


# ---------------------------------------------------------------------------------------------
# Entity scores: hand-counted cases, every scheme, and seqeval itself
# ---------------------------------------------------------------------------------------------

# (gold, predicted, hand-counted (true positives, predicted entities, gold entities))
CASES = {
    # IOB2: a PER cut short (its I- predicted O), a LOC found.
    "iob2_cut": ([["B-PER", "I-PER", "O", "B-LOC"]], [["B-PER", "O", "O", "B-LOC"]], (1, 2, 2)),
    # A wrong I- tag in the middle cuts one ORG into ORG, PER, ORG (conlleval: I- opens an entity).
    "wrong_i_tag": ([["B-ORG", "I-ORG", "I-ORG", "O"]], [["B-ORG", "I-PER", "I-ORG", "O"]], (0, 3, 1)),
    # IOB1: I- opens an entity, B- only splits two adjacent ones of a type.
    "iob1": ([["I-PER", "I-PER", "B-PER", "O", "I-LOC"]], [["I-PER", "I-PER", "I-PER", "O", "I-LOC"]],
             (1, 2, 3)),
    # IOBES: single-word and multi-word entities, one with the wrong type.
    "iobes": ([["S-LOC", "O", "B-PER", "I-PER", "E-PER", "S-ORG"]],
              [["S-LOC", "O", "B-PER", "I-PER", "E-PER", "S-LOC"]], (2, 3, 3)),
}


@pytest.mark.parametrize("case", CASES)
def test_entity_scores_are_seqeval_and_the_hand_counts(case):
    gold, pred, (tp, n_pred, n_gold) = CASES[case]
    got = token.entity_scores(gold, pred)
    p, r = tp / n_pred, tp / n_gold
    want_f1 = 2 * p * r / (p + r) if p + r else 0.0
    words = [g == q for gs, qs in zip(gold, pred) for g, q in zip(gs, qs)]
    assert got["precision"] == pytest.approx(p) and got["recall"] == pytest.approx(r)
    assert got["f1"] == pytest.approx(want_f1) and got["accuracy"] == pytest.approx(np.mean(words))
    assert got["f1"] == seqeval.f1_score(gold, pred)


def test_detect_scheme():
    assert detect_scheme(CASES["iob2_cut"][0]) == "IOB2"
    assert detect_scheme(CASES["iob1"][0]) == "IOB1"
    assert detect_scheme(CASES["iobes"][0]) == "IOBES"


def test_word_predictions_read_first_sub_tokens_only():
    # Sentence of 3 words: tokens [CLS] w0 w0## w1 w2 [SEP]; the third word of the second row is cut.
    labels = np.array([[IGNORE, 1, IGNORE, 2, 0, IGNORE], [IGNORE, 3, 4, IGNORE, IGNORE, IGNORE]])
    logits = np.zeros((2, 6, 5), np.float32)
    logits[0, 1, 1] = logits[0, 3, 2] = logits[0, 4, 3] = 5.0
    logits[0, 2, 4] = logits[0, 0, 4] = logits[0, 5, 4] = 50.0  # ignored positions: never read
    logits[1, 1, 3] = logits[1, 2, 4] = 5.0
    preds = token.word_predictions(logits, labels, [3, 3], outside=0)
    assert [p.tolist() for p in preds] == [[1, 2, 3], [3, 4, 0]]


def test_loss_counts_labelled_tokens_of_real_rows():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 4, 5)).astype(np.float32)
    labels = np.array([[IGNORE, 2, IGNORE, 0], [IGNORE, 1, 1, IGNORE]], np.int32)
    weights = np.array([1.0, 0.0], np.float32)  # the second row is eval padding
    sums = token.loss_sums(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(weights))
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    assert float(sums["count"]) == 2
    assert float(sums["loss"]) == pytest.approx(-(logp[0, 1, 2] + logp[0, 3, 0]), rel=1e-6)
    changed = logits.copy()
    changed[0, 0] += 9.0
    changed[1] += 9.0  # ignored positions and padding rows do not count
    again = token.loss_sums(jnp.asarray(changed), jnp.asarray(labels), jnp.asarray(weights))
    assert float(again["loss"]) == pytest.approx(float(sums["loss"]), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Data: the embedded tweets, CoNLL folders, alignment
# ---------------------------------------------------------------------------------------------

def test_wnut_tweets_fixed_split(data_dir):
    data = load_task("wnut_tweets", data_dir)
    assert get_task("wnut_tweets").kind == TOKEN and data.scheme == "IOB2"
    assert {k: len(s) for k, s in data.splits.items()} == {"train": 1916, "dev": 239, "test": 239}
    assert len(data.label_names) == 21 and data.label_names[0] == "O"
    ids = [set(s.index.tolist()) for s in data.splits.values()]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    tags = [data.label_names[t] for s in data.splits.values() for tt in s.tags for t in tt]
    assert sum(t.startswith("B-") for t in tags) == 1496 and len(tags) == 46469
    first = data.splits["train"] if 0 in ids[0] else data.splits["dev"] if 0 in ids[1] else data.splits["test"]
    row = first.index.tolist().index(0)
    assert first.words[row][14:17] == ["Empire", "State", "Building"]
    assert [data.label_names[t] for t in first.tags[row][14:17]] == ["B-facility", "I-facility", "I-facility"]


def write(folder, name, text):
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(text)
    return folder / name


CONLL = "-DOCSTART- -X- -X- O\n\nEU NNP B-NP I-ORG\nrejects VBZ B-VP O\nGerman JJ B-NP I-MISC\n\n" \
        "Peter NNP B-NP I-PER\nBlackburn NNP I-NP I-PER\n"


def test_conll_folder(tmp_path):
    for split in ("train", "dev", "test"):
        write(tmp_path, f"{split}.conll", CONLL)
    data = load_task(f"conll:{tmp_path}", tmp_path)
    assert data.scheme == "IOB1" and data.label_names == ["O", "I-MISC", "I-ORG", "I-PER"]
    train = data.splits["train"]
    assert train.words == [["EU", "rejects", "German"], ["Peter", "Blackburn"]]
    assert [[data.label_names[t] for t in s] for s in train.tags] == [["I-ORG", "O", "I-MISC"], ["I-PER", "I-PER"]]


@pytest.mark.parametrize("line, what", [("Berlin X-LOC", "tag 'X-LOC' is outside"),
                                        ("Berlin", "has no tag column"),
                                        ("Berlin S-LOC", "tag 'S-LOC' is outside the IOB1 scheme")])
def test_bad_line_names_file_and_line(tmp_path, line, what):
    write(tmp_path, "train.conll", CONLL)
    write(tmp_path, "test.conll", CONLL)
    bad = write(tmp_path, "dev.conll", CONLL + "\n" + line + "\n")
    with pytest.raises(DataError) as e:
        load_token_task(f"conll:{tmp_path}", tmp_path)
    assert str(e.value).startswith(f"{bad}:10: ") and what in str(e.value), str(e.value)


def test_bad_file_through_the_cli_is_one_line_and_writes_nothing(tmp_path, capsys):
    data = tmp_path / "data"
    for split in ("train", "test"):
        write(data, f"{split}.conll", CONLL)
    write(data, "dev.conll", "EU I-ORG\nrejects\n")
    workdir = tmp_path / "run"
    err = cli_error(capsys, finetune_main, [
        "--config", "configs/finetune_wnut_tweets.py", "--init", "none", "--workdir", str(workdir),
        f"--config.data.task=conll:{data}"])
    assert f"{data / 'dev.conll'}:2: " in err
    assert not workdir.exists() or not any(p.name not in ("lease.json",) for p in workdir.iterdir())


def test_each_split_is_encoded_once_for_all_its_evaluations(tmp_path, monkeypatch):
    for split in ("train", "dev", "test"):
        write(tmp_path, f"{split}.conll", CONLL)
    task, data = get_task(f"conll:{tmp_path}"), load_task(f"conll:{tmp_path}", tmp_path)
    tokenizer = Tokenizer.train(["the eu rejects german beef, peter blackburn said"] * 5, 120)
    encoded = []
    monkeypatch.setattr(token, "encode", lambda split, *a: (encoded.append(len(split)), encode_words(split, *a))[1])
    parts = labelled_parts(task, data, data.splits, tokenizer, 16)
    logits = np.random.default_rng(0).normal(size=(2, 16, len(data.label_names))).astype(np.float32)
    first = parts["score"]("dev", logits)[0]
    assert encoded == [2]  # the two dev sentences, once
    assert [parts["score"]("dev", logits)[0] for _ in range(3)] == [first] * 3 and encoded == [2]
    parts["write_predictions"](tmp_path, "dev", logits)
    parts["score"]("test", logits)
    assert encoded == [2, 2]  # test's own, once
    # what the cached labels score is what a fresh encoding scores (seqeval on the words' tags)
    labels = encode_words(data.splits["dev"], tokenizer, 16)["labels"]
    words = [len(w) for w in data.splits["dev"].words]
    predicted = token.word_predictions(logits, labels, words, data.label_names.index("O"))
    names = data.label_names
    gold = [[names[t] for t in tags] for tags in data.splits["dev"].tags]
    assert first["f1"] == seqeval.f1_score(gold, [[names[t] for t in p] for p in predicted])


@pytest.mark.parametrize("kind", ["wordpiece", "bpe"])
def test_first_sub_token_carries_the_tag(kind):
    words = [["Empire", "State", "Buildingz", "!"], ["paulwalk", "sees", "ESB"]]
    # Trained on other text, so most of these words split into several pieces.
    tokenizer = Tokenizer.train(["the empress saw statesmen building a walkway, paulownia trees and "
                                 "buzzing bees!"] * 5, 300, kind=kind)
    split = TokenSplit(words, [np.array([3, 4, 4, 0]), np.array([1, 0, 3])], np.arange(2))
    out = encode_words(split, tokenizer, 32)
    for row, ws in enumerate(words):
        n = int(out["attention_mask"][row].sum())
        ids = out["input_ids"][row, :n].tolist()
        # The words' pieces in a row are the tokenizer's encoding of the sentence as running text.
        assert ids == [tokenizer.cls_id, *tokenizer.encode(" ".join(ws)), tokenizer.sep_id]
        tagged = np.nonzero(out["labels"][row] >= 0)[0]
        assert out["labels"][row, tagged].tolist() == split.tags[row].tolist()
        assert len(tagged) == len(ws) and n > len(ws) + 2  # some word has a continuation
    cut = encode_words(split, tokenizer, 4)  # [CLS] two tokens [SEP]: later words lose their tag
    assert (cut["labels"][0] >= 0).sum() < len(words[0]) and cut["input_ids"][0, 3] == tokenizer.sep_id


# ---------------------------------------------------------------------------------------------
# Parity with transformers, both ways (float32)
# ---------------------------------------------------------------------------------------------


def _ours(make, params):
    with nnx.use_eager_sharding(False):
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: make(nnx.Rngs(0))))
    return nnx.merge(graphdef, jax.tree.map(jnp.asarray, params))


def _inputs(vocab, seed=0):
    rng = np.random.default_rng(seed)
    mask = (np.arange(40)[None] < np.array([40, 23, 6])[:, None]).astype(np.int64)
    ids = np.where(mask == 1, rng.integers(5, vocab, mask.shape), 0)
    ids[:, 0] = 2
    return ids, mask


def _hf_logits(model, ids, mask, **kw):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), **kw).logits.numpy()


BERT = BertConfig(vocab_size=300, num_layers=2, hidden_size=32, num_heads=4, intermediate_size=48,
                  max_position=64, dropout=0.0, attention_dropout=0.0)
MODERNBERT = ModernBertConfig(vocab_size=320, num_layers=4, hidden_size=64, num_heads=4,
                              intermediate_size=96, max_position=512, local_window=16)
FAMILIES = {
    "bert": (BERT, "BertForTokenClassification",
             lambda cfg, rngs: PositionClassifier(cfg, len(LABELS), 0.0, rngs),
             lambda m, ids, mask: m(ids, jnp.zeros_like(ids), mask)),
    "modernbert": (MODERNBERT, "ModernBertForTokenClassification",
                   lambda cfg, rngs: ModernBertForPositionClassification(cfg, len(LABELS), rngs),
                   lambda m, ids, mask: m(ids, mask)),
}


# The QA model is the same class with two outputs named as HF's QA head (tests/test_hf_qa.py
# has its parity with transformers).
CLASSES = {"bert": lambda cfg, n, rngs, **kw: PositionClassifier(cfg, n, 0.0, rngs, **kw),
           "modernbert": lambda cfg, n, rngs, **kw: ModernBertForPositionClassification(cfg, n, rngs, **kw)}


@pytest.mark.parametrize("family", FAMILIES)
def test_one_per_position_class_is_the_token_and_the_qa_model(family):
    cfg, architecture, _, _ = FAMILIES[family]
    with nnx.use_eager_sharding(False):  # abstract: the parameter trees alone
        token_params, qa_params = (nnx.to_pure_dict(nnx.state(nnx.eval_shape(
            lambda: CLASSES[family](cfg, n, nnx.Rngs(0), **kw)), nnx.Param))
            for n, kw in ((len(LABELS), {}), (2, {"output": "qa_outputs"})))
    assert hf.infer_architecture(token_params, family) == architecture
    assert hf.infer_architecture(qa_params, family) == architecture.replace("TokenClassification", "QuestionAnswering")
    assert qa_params["qa_outputs"]["kernel"].shape == (cfg.hidden_size, 2)
    assert token_params["token_classifier"]["kernel"].shape == (cfg.hidden_size, len(LABELS))
    rest = lambda params, name: jax.tree.map(lambda x: x.shape, {k: v for k, v in params.items() if k != name})
    assert rest(token_params, "token_classifier") == rest(qa_params, "qa_outputs")


# ModernBERT's (4 layers, a window) takes ~20 s a direction: the slow suite's.
PARITY = [pytest.param("bert"), pytest.param("modernbert", marks=pytest.mark.slow)]


@pytest.mark.parametrize("family", PARITY)
def test_export_parity(family, tmp_path):
    cfg, architecture, make, call = FAMILIES[family]
    with nnx.use_eager_sharding(False):
        params = perturbed_params(make(cfg, nnx.Rngs(3)), seed=3)
    hf.export_params(params, cfg, tmp_path / "out", architecture=architecture, id2label=LABELS)
    model, info = transformers.AutoModelForTokenClassification.from_pretrained(
        tmp_path / "out", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert type(model).__name__ == architecture and model.config.id2label[2] == "I-PER"
    assert model.config.label2id["B-LOC"] == 3
    ids, mask = _inputs(cfg.vocab_size)
    ours = np.asarray(call(_ours(lambda r: make(cfg, r), params), jnp.asarray(ids), jnp.asarray(mask)))
    diff = np.abs(ours - _hf_logits(model.eval(), ids, mask))[mask == 1].max()
    print(f"\n[{family}] export: token logits max |diff| {diff:.3g}")
    assert diff < TOL
    back, _, arch = hf.import_params(tmp_path / "out")
    assert arch == architecture and "pooler" not in back["encoder"]


@pytest.mark.parametrize("family", PARITY)
def test_import_parity(family, tmp_path):
    cfg, architecture, make, call = FAMILIES[family]
    torch.manual_seed(0)
    if family == "bert":
        config = transformers.BertConfig(
            vocab_size=cfg.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=48, max_position_embeddings=64, hidden_act="gelu", num_labels=len(LABELS))
    else:
        config = transformers.ModernBertConfig(
            vocab_size=cfg.vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
            num_attention_heads=4, max_position_embeddings=512, local_attention=16, pad_token_id=0,
            cls_token_id=2, bos_token_id=2, sep_token_id=3, eos_token_id=3, num_labels=len(LABELS))
    model = getattr(transformers, architecture)(config).eval()
    with torch.no_grad():  # biases and norms off 0 and 1, so a weight in the wrong place shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or name.endswith("norm.weight") or "LayerNorm.weight" in name:
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "hf")
    params, got_cfg, arch = hf.import_params(tmp_path / "hf")
    assert arch == architecture and got_cfg.num_layers == cfg.num_layers
    if family == "bert":  # BertForTokenClassification has no pooler; ours is unused: any weights
        with nnx.use_eager_sharding(False):
            fresh = nnx.to_pure_dict(nnx.state(make(got_cfg, nnx.Rngs(0)), nnx.Param))
        params["encoder"]["pooler"] = jax.tree.map(np.asarray, fresh["encoder"]["pooler"])
    ids, mask = _inputs(cfg.vocab_size, seed=1)
    ours = np.asarray(call(_ours(lambda r: make(got_cfg, r), params), jnp.asarray(ids), jnp.asarray(mask)))
    diff = np.abs(ours - _hf_logits(model, ids, mask))[mask == 1].max()
    print(f"\n[{family}] import: token logits max |diff| {diff:.3g}")
    assert diff < TOL


# ---------------------------------------------------------------------------------------------
# End to end: fine-tune, predictions per word, export, transformers reads the same tags
# ---------------------------------------------------------------------------------------------

CONFIGS = {"bert": "configs/finetune_wnut_tweets.py",
           "modernbert": "configs/finetune_modernbert_reuters_r8.py"}


@pytest.mark.slow
@pytest.mark.parametrize("family", CONFIGS)
def test_finetune_predict_export(family, data_dir, tmp_path):
    workdir = tmp_path / "run"
    flags = {**TINY_FT, "data.task": "wnut_tweets", "data.data_dir": str(data_dir),
             "data.vocab_size": 512, "train.steps": 8, "optim.lr": 3e-3}
    finetune_main(["--config", CONFIGS[family], "--init", "none", "--workdir", str(workdir),
                   *(f"--config.{k}={v}" for k, v in flags.items())])
    results = json.loads((workdir / "results.json").read_text())
    rows = [line.split("\t") for line in (workdir / "predictions_test.conll").read_text().split("\n")]
    gold, pred, words = [[]], [[]], [[]]
    for row in rows:
        if row == [""]:
            gold.append([]), pred.append([]), words.append([])
        else:
            words[-1].append(row[0]), gold[-1].append(row[1]), pred[-1].append(row[2])
    gold, pred, words = ([s for s in x if s] for x in (gold, pred, words))
    assert len(gold) == 32 and results["test"]["f1"] == pytest.approx(seqeval.f1_score(gold, pred))
    assert results["test"]["accuracy"] == pytest.approx(seqeval.accuracy_score(gold, pred))

    data = load_task("wnut_tweets", data_dir)
    names = data.label_names
    out = tmp_path / "hf"
    hf_cli.main(["export", "--checkpoint", str(workdir / "best"), "--out", str(out),
                 "--labels", ",".join(names)])
    model = transformers.AutoModelForTokenClassification.from_pretrained(out).eval()
    assert model.config.id2label[1] == names[1]
    tokenizer = Tokenizer.load(workdir / "best" / "tokenizer")
    split = TokenSplit(words, [np.array([names.index(t) for t in g]) for g in gold], np.arange(len(words)))
    batch = encode_words(split, tokenizer, TINY_FT["data.max_seq_len"])
    logits = _hf_logits(model, batch["input_ids"].astype(np.int64), batch["attention_mask"].astype(np.int64))
    again = token.word_predictions(logits, batch["labels"], [len(w) for w in words], names.index("O"))
    assert [[names[t] for t in p] for p in again] == pred
