"""Extractive question answering (task kind `span`): the objective, answers decoded over all of a
question's windows, and SQuAD's official scores.

The head gives a start and an end logit at every position (BT2). Training is the mean of the
start and end cross-entropies of each window (BERT's run_squad); a window without the answer
points both at [CLS]. Decoding follows BERT's n-best search: in every window of a question, the
`n_best` highest start and end logits over the window's context tokens pair into candidates
(end >= start, at most `max_answer_len` tokens), scored start + end; the best over all windows is
the answer. The no-answer score is the lowest [CLS] start + end over the windows; SQuAD v2
answers "" where it beats the best candidate by more than a threshold, the one that maximises
F1 on dev (the official v2 script's `best_f1`).

Exact match and F1 are the official evaluate-v1.1 script's: lower case, punctuation and the
articles a/an/the removed, whitespace collapsed, the best over the gold answers, as percentages;
v2's impossible questions score 1 for an empty answer (evaluate-v2.0; its answerable questions
score as v1.1's, but for a gold answer that normalises to nothing, which v2 drops).
"""

from __future__ import annotations

import collections
import json
import re
import string

import jax.numpy as jnp
import numpy as np
import optax

from data.squad import TFDS_NAMES, Windows, load_squad
from data.tasks import Split, subsample
from data.wheels import DataError
from infra import storage
from infra.errors import UserError
from training.step import Objective

METRICS = ("f1", "exact_match")
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)


# ---------------------------------------------------------------------------------------------
# Official scores
# ---------------------------------------------------------------------------------------------

def normalize_answer(s: str) -> str:
    s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", s).split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    same = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def question_scores(prediction: str, answers) -> tuple[float, float]:
    """(exact match, F1) of one prediction, the best over the gold answers (v1.1's definitions);
    an impossible question (no answers) scores 1 for an empty prediction, else 0 (v2's)."""
    if not answers:
        return (float(not normalize_answer(prediction)),) * 2
    return max(exact_match(prediction, g) for g in answers), max(f1(prediction, g) for g in answers)


def squad_scores(predictions: dict[str, str], questions) -> dict[str, float]:
    """{"exact_match", "f1"} in percent over `questions` (Question records of data/squad.py)."""
    scores = np.array([question_scores(predictions.get(q.id, ""), q.answers) for q in questions])
    return {"exact_match": 100.0 * float(scores[:, 0].mean()), "f1": 100.0 * float(scores[:, 1].mean())}


def best_threshold(questions, answers: dict[str, str], no_answer_margin: dict[str, float]):
    """The official v2 script's find_best_thresh on F1: answer "" where the no-answer score beats
    the best span by more than the threshold; from all "" (threshold -inf), answer the questions
    in order of margin and keep the threshold of the best total. Returns (threshold, answers)."""
    total = best = sum(1.0 for q in questions if q.impossible)
    threshold = float("-inf")
    for q in sorted(questions, key=lambda q: no_answer_margin[q.id]):
        total += question_scores(answers[q.id], q.answers)[1] - float(q.impossible)
        if total > best:
            best, threshold = total, no_answer_margin[q.id]
    return threshold, {q.id: "" if no_answer_margin[q.id] > threshold else answers[q.id]
                       for q in questions}


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------

def window_candidates(start_T, end_T, first: int, length: int, n_best: int, max_answer_len: int):
    """(score, start, end) of the n-best pairs among context positions [first, first + length),
    best first."""
    lo, hi = first, first + length
    starts = lo + np.argsort(-start_T[lo:hi], kind="stable")[:n_best]
    ends = lo + np.argsort(-end_T[lo:hi], kind="stable")[:n_best]
    found = [(float(start_T[s] + end_T[e]), int(s), int(e)) for s in starts for e in ends
             if s <= e < s + max_answer_len]
    return sorted(found, key=lambda c: -c[0])[:n_best]


def decode(windows, logits_WT2: np.ndarray, n_best: int, max_answer_len: int):
    """Per question id: (best answer text, its score, the no-answer score); over all windows."""
    best: dict[int, tuple] = {}
    null: dict[int, float] = {}
    for w in range(len(windows)):
        q = int(windows.index[w])
        start_T, end_T = logits_WT2[w, :, 0], logits_WT2[w, :, 1]
        null[q] = min(null.get(q, np.inf), float(start_T[0] + end_T[0]))
        first = windows.context_at(w)
        found = window_candidates(start_T, end_T, first, int(windows.length[w]), n_best,
                                  max_answer_len)
        if found and (q not in best or found[0][0] > best[q][0]):
            score, s, e = found[0]
            token = int(windows.start[w]) - first  # context token = sequence position + token
            best[q] = (score, int(windows.offsets[q][s + token, 0]), int(windows.offsets[q][e + token, 1]))
    out = {}
    for q, question in enumerate(windows.questions):
        score, a, b = best.get(q, (-np.inf, 0, 0))
        out[question.id] = (question.context[a:b].strip(), score, null.get(q, np.inf))
    return out


def evaluate(windows, logits_WT2: np.ndarray, *, n_best: int, max_answer_len: int, v2: bool):
    """(metrics, {question id: answer}); metrics include the window loss, and for v2 the
    no-answer threshold chosen here (on this split)."""
    decoded = decode(windows, np.asarray(logits_WT2, np.float32), n_best, max_answer_len)
    answers = {qid: text for qid, (text, _, _) in decoded.items()}
    metrics = {}
    if v2:
        margins = {qid: null - score for qid, (_, score, null) in decoded.items()}
        metrics["threshold"], answers = best_threshold(windows.questions, answers, margins)
    metrics.update(squad_scores(answers, windows.questions))
    metrics["loss"] = float(np.mean(_window_nll(logits_WT2, windows.labels)))
    return metrics, answers


def write_predictions(path, answers: dict[str, str]) -> None:
    """{question id: answer}, the file the official evaluate script reads."""
    path.write_text(json.dumps(answers, indent=1, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------------
# Objective
# ---------------------------------------------------------------------------------------------

def _window_nll(logits_BT2, labels_B2):
    """Mean of the start and end cross-entropies of each window (numpy or jax arrays)."""
    logits = jnp.moveaxis(jnp.asarray(logits_BT2, jnp.float32), -1, 1)  # B2T
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(labels_B2)), -1)


def objective(task, predict, label_smoothing: float = 0.0, mix=None) -> Objective:
    """`predict(model, batch, key)` gives BT2; the batch has `labels` B2 and `weights` B.
    (finetune/train.py refuses label smoothing for span tasks; mixing has no meaning here.)"""
    if mix is not None:
        raise ValueError(f"{task.name}: mixing examples has no meaning for answer spans")

    def sums(model, batch, key):
        logits_BT2 = predict(model, batch, key)
        w_B = batch["weights"].astype(jnp.float32)
        hit_B = jnp.all(jnp.argmax(logits_BT2, axis=1) == batch["labels"], axis=-1)
        return {"loss": jnp.sum(_window_nll(logits_BT2, batch["labels"]) * w_B),
                "correct": jnp.sum(hit_B * w_B), "count": jnp.sum(w_B)}

    def summarize(sums, prefix):
        count = max(float(sums["count"]), 1.0)
        return {f"{prefix}/loss": float(sums["loss"]) / count,
                f"{prefix}/span_accuracy": float(sums["correct"]) / count}

    return Objective(sums, lambda batch: {"count": jnp.maximum(jnp.sum(batch["weights"]), 1.0)},
                     lambda sums, norm: sums["loss"] / norm["count"], summarize)



# ---------------------------------------------------------------------------------------------
# What a text family's setup takes from this kind
# ---------------------------------------------------------------------------------------------

def load(config) -> tuple[dict, bool]:
    """The task's questions per split (subsampled as data.max_*_examples say) and whether it is
    SQuAD v2; bad data is one UserError."""
    dc = config.data
    tfds = [dc.task] if dc.task in TFDS_NAMES else []
    try:
        questions, v2 = load_squad(dc.task, storage.local_data_dir(dc.data_dir, tfds))
    except DataError as e:
        raise UserError(str(e)) from None
    return {name: subsample(qs, dc.max_train_examples if name == "train" else dc.max_eval_examples)
            for name, qs in questions.items()}, v2


def tokenizer_texts(questions: dict) -> Split:
    """The train questions and their contexts, once each: what --init none trains a vocabulary on."""
    texts = list(dict.fromkeys(t for q in questions["train"] for t in (q.context, q.question)))
    return Split(texts, None, np.zeros(len(texts), np.int64), np.arange(len(texts)))


def setup_parts(config, questions: dict, v2: bool, tokenizer) -> dict:
    """FinetuneSetup's data fields for a span task: windows as the splits, their encoding, and
    scoring and predictions by question."""
    dc = config.data
    try:
        windows = {name: Windows(qs, tokenizer, dc.max_seq_len, dc.doc_stride, dc.max_query_len)
                   for name, qs in questions.items()}
    except DataError as e:
        raise UserError(str(e)) from None

    def score(split: str, outputs: np.ndarray):
        return evaluate(windows[split], outputs, n_best=dc.n_best, max_answer_len=dc.max_answer_len,
                        v2=v2)

    return dict(splits=windows, label_names=None, score=score,
                encode=lambda split, rows, positions: windows[split].encode(rows),
                write_predictions=lambda workdir, split, answers: write_predictions(
                    workdir / f"predictions_{split}.json", answers))
