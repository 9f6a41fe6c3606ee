"""Fine-tuning tasks: the registry, the classifier head, losses, and the official metrics.

A task is one of three kinds: single-sentence classification, sentence-pair classification, or
regression (one score per example or pair). Its data comes from `data/tasks.py`; here live what
the trainer needs to train and score it. Metrics are computed on the host with numpy from the
gathered predictions, never inside jit, so they are the textbook (and GLUE) definitions.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.bert import BertConfig, BertEncoder
from models.layers import dropout, fold, normal, zeros

SINGLE, PAIR, REGRESSION = "single", "pair", "regression"


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    kind: str                 # SINGLE | PAIR | REGRESSION
    metrics: tuple[str, ...]  # official first; metrics[0] picks the best dev checkpoint

    @property
    def regression(self) -> bool:
        return self.kind == REGRESSION

    @property
    def primary(self) -> str:
        return self.metrics[0]

    def predictions(self, logits_BC: np.ndarray) -> np.ndarray:
        """Class ids (argmax) or scores (the single output) from the head's outputs."""
        logits_BC = np.asarray(logits_BC)
        return logits_BC[:, 0] if self.regression else np.argmax(logits_BC, axis=-1)

    def evaluate(self, labels: np.ndarray, predictions: np.ndarray) -> dict[str, float]:
        return {m: float(METRICS[m](np.asarray(labels), np.asarray(predictions)))
                for m in self.metrics}


TASKS = {t.name: t for t in [
    Task("rt_polarity", SINGLE, ("accuracy", "f1")),
    Task("reuters_r8", SINGLE, ("accuracy", "macro_f1")),
    Task("newsgroups20", SINGLE, ("accuracy", "macro_f1")),
    # GLUE, with the metrics of its leaderboard (Wang et al. 2019), the official one first.
    Task("glue/cola", SINGLE, ("matthews_corr", "accuracy")),
    Task("glue/sst2", SINGLE, ("accuracy",)),
    Task("glue/mrpc", PAIR, ("f1", "accuracy")),
    Task("glue/qqp", PAIR, ("f1", "accuracy")),
    Task("glue/stsb", REGRESSION, ("pearson", "spearman")),
    Task("glue/mnli", PAIR, ("accuracy",)),
    Task("glue/qnli", PAIR, ("accuracy",)),
    Task("glue/rte", PAIR, ("accuracy",)),
    Task("glue/wnli", PAIR, ("accuracy",)),
]}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; choose one of: {', '.join(TASKS)}")
    return TASKS[name]


# ---------------------------------------------------------------------------------------------
# The model: BERT encoder + a classifier on the pooled output
# ---------------------------------------------------------------------------------------------

POOLINGS = ("cls", "mean")


class SequenceClassifier(nnx.Module):
    """`encoder` (BertEncoder) and `classifier` (D -> C, C = 1 for regression), with dropout on
    the pooled output. With `pooling="cls"` (BERT's tanh pooler over [CLS]) this is HuggingFace's
    BertForSequenceClassification, parameter for parameter, so `models/hf.py` exports it as such.
    `pooling="mean"` averages the last hidden states over the real tokens instead, the usual
    frozen-feature probe: the pooler only ever learned NSP, the hidden states learned MLM."""

    def __init__(self, cfg: BertConfig, num_outputs: int, classifier_dropout: float, rngs: nnx.Rngs,
                 pooling: str = "cls"):
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.encoder = BertEncoder(cfg, rngs)
        self.classifier = nnx.Linear(
            cfg.hidden_size, num_outputs, dtype=jnp.dtype(cfg.dtype),
            kernel_init=normal(cfg.initializer_range, "embed", None), bias_init=zeros(None), rngs=rngs)
        self.classifier_dropout = classifier_dropout
        self.pooling = pooling

    def __call__(self, input_ids, token_type_ids, attention_mask, *, key=None):
        """Logits (or scores) BC in float32. `key=None` disables dropout."""
        x_BTD, pooled_BD = self.encoder(input_ids, token_type_ids, attention_mask, key=fold(key, 0))
        if self.pooling == "mean":
            mask_BT1 = attention_mask[..., None].astype(x_BTD.dtype)
            pooled_BD = jnp.sum(x_BTD * mask_BT1, axis=1) / jnp.maximum(jnp.sum(mask_BT1, axis=1), 1)
        pooled_BD = dropout(pooled_BD, self.classifier_dropout, fold(key, 1))
        return self.classifier(pooled_BD).astype(jnp.float32)


# ---------------------------------------------------------------------------------------------
# Losses, as sums over the weighted examples (normalised by the caller, like pretraining)
# ---------------------------------------------------------------------------------------------

def loss_sums(logits_BC, labels_B, weights_B, *, regression: bool, label_smoothing: float = 0.0):
    """{"loss", "correct", "count"} summed over examples with weight 1 (padding has weight 0).

    Classification: cross-entropy against (1 - eps) one-hot + eps / C. Regression: squared error
    of the single output."""
    w_B = weights_B.astype(jnp.float32)
    if regression:
        err_B = logits_BC[:, 0] - labels_B.astype(jnp.float32)
        return {"loss": jnp.sum(err_B ** 2 * w_B), "correct": jnp.zeros((), jnp.float32),
                "count": jnp.sum(w_B)}
    C = logits_BC.shape[-1]
    labels_B = labels_B.astype(jnp.int32)
    targets_BC = jax.nn.one_hot(labels_B, C) * (1.0 - label_smoothing) + label_smoothing / C
    nll_B = -jnp.sum(targets_BC * jax.nn.log_softmax(logits_BC, axis=-1), axis=-1)
    correct_B = (jnp.argmax(logits_BC, axis=-1) == labels_B).astype(jnp.float32)
    return {"loss": jnp.sum(nll_B * w_B), "correct": jnp.sum(correct_B * w_B), "count": jnp.sum(w_B)}


SUM_KEYS = ("loss", "correct", "count")


# ---------------------------------------------------------------------------------------------
# Metrics (host, numpy). All are "higher is better".
# ---------------------------------------------------------------------------------------------

def accuracy(labels, preds) -> float:
    return float(np.mean(np.asarray(labels) == np.asarray(preds))) if len(labels) else 0.0


def _f1(labels, preds, positive) -> float:
    tp = np.sum((preds == positive) & (labels == positive))
    fp = np.sum((preds == positive) & (labels != positive))
    fn = np.sum((preds != positive) & (labels == positive))
    return float(2 * tp / (2 * tp + fp + fn)) if tp + fp + fn else 0.0


def f1(labels, preds) -> float:
    """Binary F1 of the positive class (label 1), as GLUE scores MRPC and QQP."""
    return _f1(np.asarray(labels), np.asarray(preds), 1)


def macro_f1(labels, preds) -> float:
    """Unweighted mean of per-class F1 over the classes that occur in labels or predictions."""
    labels, preds = np.asarray(labels), np.asarray(preds)
    classes = np.union1d(labels, preds)
    return float(np.mean([_f1(labels, preds, c) for c in classes])) if len(classes) else 0.0


def matthews_corr(labels, preds) -> float:
    """Matthews correlation; the multi-class form (Gorodkin 2004), equal to the binary one for
    two classes. 0 when it is undefined (a constant labelling or prediction), as scikit-learn."""
    labels, preds = np.asarray(labels), np.asarray(preds)
    classes, idx = np.unique(np.concatenate([labels, preds]), return_inverse=True)
    k, n = len(classes), len(labels)
    confusion = np.zeros((k, k), np.float64)
    np.add.at(confusion, (idx[:n], idx[n:]), 1)
    t, p = confusion.sum(axis=1), confusion.sum(axis=0)
    c, s = np.trace(confusion), confusion.sum()
    denominator = np.sqrt((s * s - p @ p) * (s * s - t @ t))
    return float((c * s - t @ p) / denominator) if denominator > 0 else 0.0


def pearson(labels, preds) -> float:
    """Pearson correlation; 0 when either side is constant (where it is undefined)."""
    x, y = np.asarray(labels, np.float64), np.asarray(preds, np.float64)
    x, y = x - x.mean(), y - y.mean()
    denominator = np.sqrt((x @ x) * (y @ y))
    return float(x @ y / denominator) if denominator > 0 else 0.0


def average_ranks(x) -> np.ndarray:
    """1-based ranks, ties sharing their average rank (scipy.stats.rankdata's default)."""
    _, inverse, counts = np.unique(np.asarray(x), return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - counts + 1 + ends) / 2.0)[inverse]


def spearman(labels, preds) -> float:
    """Spearman rank correlation: Pearson of the average ranks."""
    return pearson(average_ranks(labels), average_ranks(preds))


METRICS = {"accuracy": accuracy, "f1": f1, "macro_f1": macro_f1, "matthews_corr": matthews_corr,
           "pearson": pearson, "spearman": spearman}
