"""The `token` kind of task: a tag for every word (named entities), on any text family.

The head gives logits BTC at every position; a word's first sub-token carries its tag and every
other position the label -1 (data/conll.py), ignored in the loss and in prediction, as the BERT
paper does. The loss is the mean cross-entropy over the labelled tokens of the global batch.
Predictions are read back per word (a word cut off by data.max_seq_len is predicted O) and
scored at the entity level exactly as `seqeval` does (its default, conlleval-compatible mode:
an I- tag after O or another type opens an entity, so IOB1, IOB2 and IOBES all read right),
plus the accuracy over words. `predictions_<split>.conll` holds word, gold tag, predicted tag.
"""

from __future__ import annotations

import warnings

import jax.numpy as jnp
import numpy as np
from seqeval import metrics as seqeval

from data.conll import encode_words as encode  # words -> sub-tokens, a tag at each first one
from finetune import tasks
from training.step import Objective


def loss_sums(logits_BTC, labels_BT, weights_B, label_smoothing: float = 0.0) -> dict:
    """{"loss", "correct", "count"} summed over the labelled tokens of rows with weight 1: the
    classification sums of finetune/tasks.py with every token an example."""
    w_BT = (labels_BT >= 0) & (weights_B[:, None] > 0)
    return tasks.loss_sums(logits_BTC.reshape(-1, logits_BTC.shape[-1]),
                           jnp.maximum(labels_BT, 0).reshape(-1), w_BT.reshape(-1),
                           regression=False, label_smoothing=label_smoothing)


def objective(task, predict, label_smoothing: float = 0.0, mix=None) -> Objective:
    """`predict(model, batch, key)` gives logits BTC; the batch has `labels` BT and `weights` B."""
    if mix is not None:
        raise ValueError(f"{task.name}: mixing examples has no meaning for token tags")

    def sums(model, batch, key):
        return loss_sums(predict(model, batch, key), batch["labels"], batch["weights"], label_smoothing)

    def normalisers(batch):
        tokens = (batch["labels"] >= 0) & (batch["weights"][:, None] > 0)
        return {"count": jnp.maximum(jnp.sum(tokens.astype(jnp.float32)), 1.0)}

    def summarize(sums, prefix):
        count = max(float(sums["count"]), 1.0)
        return {f"{prefix}/loss": float(sums["loss"]) / count,
                f"{prefix}/token_accuracy": float(sums["correct"]) / count}

    return Objective(sums, normalisers, lambda sums, norm: sums["loss"] / norm["count"], summarize)


# ---------------------------------------------------------------------------------------------
# Per-word predictions and entity-level metrics (host, numpy)
# ---------------------------------------------------------------------------------------------

def word_predictions(logits_NTC: np.ndarray, labels_NT: np.ndarray, num_words: list[int],
                     outside: int) -> list[np.ndarray]:
    """Each sentence's predicted tag ids, one per word: the argmax at its first sub-token (where
    labels_NT >= 0, in word order); `outside` (O) for words cut off by the sequence length."""
    out = []
    for logits_TC, labels_T, n in zip(logits_NTC, labels_NT, num_words):
        first = np.nonzero(labels_T >= 0)[0]
        preds = np.full(n, outside, np.int64)
        preds[:len(first)] = np.argmax(logits_TC[first], axis=-1)
        out.append(preds)
    return out


def entity_scores(gold: list[list[str]], predicted: list[list[str]]) -> dict[str, float]:
    """Entity precision, recall and F1 and word accuracy, as seqeval computes them."""
    with warnings.catch_warnings():  # no predicted (or gold) entity: seqeval warns and gives 0
        warnings.simplefilter("ignore")
        return {"f1": float(seqeval.f1_score(gold, predicted)),
                "precision": float(seqeval.precision_score(gold, predicted)),
                "recall": float(seqeval.recall_score(gold, predicted)),
                "accuracy": float(seqeval.accuracy_score(gold, predicted))}


def gold_labels(family, split: str) -> np.ndarray:
    """The split's sub-token labels NT (a tag at each word's first sub-token): the tokenizer's
    work on the whole split, done at its first evaluation and kept on the setup
    (`family.gold_labels`, finetune/text.py) for every later one."""
    if split not in family.gold_labels:
        rows = np.arange(len(family.splits[split]))
        family.gold_labels[split] = family.encode(split, rows, rows)["labels"]
    return family.gold_labels[split]


def _predicted(family, split: str, logits_NTC: np.ndarray) -> tuple[list, np.ndarray]:
    labels_NT = gold_labels(family, split)
    outside = family.label_names.index("O")
    words = [len(w) for w in family.splits[split].words]
    return word_predictions(logits_NTC, labels_NT, words, outside), labels_NT


def score(task, family, split: str, logits_NTC: np.ndarray) -> dict[str, float]:
    """The task's metrics on one split from the head's gathered outputs, and the mean loss over
    its labelled tokens (as the train loss, without smoothing)."""
    predicted, labels_NT = _predicted(family, split, logits_NTC)
    names = family.label_names
    gold = [[names[t] for t in tags] for tags in family.splits[split].tags]
    scores = entity_scores(gold, [[names[t] for t in p] for p in predicted])
    sums = loss_sums(jnp.asarray(logits_NTC), jnp.asarray(labels_NT),
                     jnp.ones(len(labels_NT), jnp.float32))
    return {**{m: scores[m] for m in task.metrics},
            "loss": float(sums["loss"]) / max(float(sums["count"]), 1.0)}


def write_predictions(workdir, family, split: str, logits_NTC: np.ndarray) -> None:
    """predictions_<split>.conll: word, gold tag, predicted tag a line; a blank line between
    sentences (the format data.task=conll:DIR reads, and conlleval's)."""
    predicted, _ = _predicted(family, split, logits_NTC)
    data, names = family.splits[split], family.label_names
    lines = []
    for words, tags, preds in zip(data.words, data.tags, predicted):
        lines += [f"{w}\t{names[t]}\t{names[p]}" for w, t, p in zip(words, tags, preds)] + [""]
    (workdir / f"predictions_{split}.conll").write_text("\n".join(lines), encoding="utf-8")
