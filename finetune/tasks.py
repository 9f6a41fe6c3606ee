"""Fine-tuning tasks: the registry, the objective on a head's outputs, and the official metrics.

A task is one of four kinds: single-example classification, pair classification, regression
(one score per example or pair), token classification (a tag per word), or extractive
question answering (`span`: a start and an end in a context). Kinds with more than one
label per example live in a module of their own (`KINDS`: finetune/token.py, finetune/span.py,
with the kind's objective, encoding, decoding and metrics). Its data comes from
`data/tasks.py`; here live what every
family's trainer needs to train and score it. Metrics are computed on the host with numpy from
the gathered predictions, never inside jit, so they are the textbook (and GLUE) definitions.
"""

from __future__ import annotations

import dataclasses
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.stats

from data import squad
from finetune import span
from training.step import Objective

SINGLE, PAIR, REGRESSION, TOKEN, SPAN = "single", "pair", "regression", "token", "span"
# kind -> the module with its objective(task, predict, label_smoothing, mix); a text family's
# setup takes the kind's encoding and scoring from it (finetune/text.py)
KINDS = {TOKEN: "finetune.token", SPAN: "finetune.span"}
TOKEN_METRICS = ("f1", "precision", "recall", "accuracy")  # entity-level (seqeval), then words


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    kind: str                 # SINGLE | PAIR | REGRESSION | TOKEN | SPAN
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
    Task("mnist", SINGLE, ("accuracy", "macro_f1")),  # images: the embedded digits
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
    Task("wnut_tweets", TOKEN, TOKEN_METRICS),  # data/conll.py
    Task("conll2003", TOKEN, TOKEN_METRICS),
]}


def get_task(name: str) -> Task:
    if name.startswith("tfds:") and len(name) > len("tfds:"):  # any TFDS image classification set
        return Task(name, SINGLE, ("accuracy", "macro_f1"))
    if name.startswith("conll:") and len(name) > len("conll:"):  # the user's CoNLL files
        return Task(name, TOKEN, TOKEN_METRICS)
    if (name.startswith("squad:") and len(name) > len("squad:")) or name in squad.TFDS_NAMES:
        return Task(name, SPAN, span.METRICS)  # a folder of SQuAD-format files, or TFDS squad
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; choose one of: {', '.join(TASKS)}, "
                       f"{', '.join(squad.TFDS_NAMES)}, squad:DIR")
    return TASKS[name]


def kind_module(task: Task):
    """The module of a kind with more than one label per example (None for the others)."""
    return importlib.import_module(KINDS[task.kind]) if task.kind in KINDS else None


# ---------------------------------------------------------------------------------------------
# Losses, as sums over the weighted examples (normalised by the global count, like pretraining)
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
    labels_B = labels_B.astype(jnp.int32)
    if label_smoothing:
        targets_BC = optax.smooth_labels(jax.nn.one_hot(labels_B, logits_BC.shape[-1]), label_smoothing)
        nll_B = optax.softmax_cross_entropy(logits_BC, targets_BC)
    else:
        nll_B = optax.softmax_cross_entropy_with_integer_labels(logits_BC, labels_B)
    correct_B = (jnp.argmax(logits_BC, axis=-1) == labels_B).astype(jnp.float32)
    return {"loss": jnp.sum(nll_B * w_B), "correct": jnp.sum(correct_B * w_B), "count": jnp.sum(w_B)}


def mean_loss(task: Task, logits_BC: np.ndarray, labels_B: np.ndarray) -> float:
    """The dev/test loss of gathered outputs, as the train loss defines it (no smoothing)."""
    weights = np.ones(len(labels_B), np.float32)
    sums = loss_sums(jnp.asarray(logits_BC), jnp.asarray(labels_B), jnp.asarray(weights),
                     regression=task.regression)
    return float(sums["loss"]) / max(len(labels_B), 1)


def objective(task: Task, predict, label_smoothing: float = 0.0, mix=None) -> Objective:
    """The fine-tuning objective of any family: `predict(model, batch, key)` gives the head's
    outputs BC; the batch has `labels` and `weights` (0 on padding rows). With `mix` (training
    only), the loss is lam x the loss on the labels + (1 - lam) x the loss on the partners'.
    A token or span task's is its kind module's (KINDS)."""

    def sums(model, batch, key):
        if mix is None or key is None:
            return loss_sums(predict(model, batch, key), batch["labels"], batch["weights"],
                             regression=task.regression, label_smoothing=label_smoothing)
        mix_key, key = jax.random.split(key)
        batch, partner_labels, lam = mix(batch, mix_key)
        logits = predict(model, batch, key)
        own, partner = (loss_sums(logits, labels, batch["weights"], regression=task.regression,
                                  label_smoothing=label_smoothing)
                        for labels in (batch["labels"], partner_labels))
        return {**own, "loss": lam * own["loss"] + (1.0 - lam) * partner["loss"]}

    def summarize(sums, prefix):
        count = max(float(sums["count"]), 1.0)
        out = {f"{prefix}/loss": float(sums["loss"]) / count}
        if not task.regression:
            out[f"{prefix}/accuracy"] = float(sums["correct"]) / count
        return out

    return Objective(sums, lambda batch: {"count": jnp.maximum(jnp.sum(batch["weights"]), 1.0)},
                     lambda sums, norm: sums["loss"] / norm["count"], summarize)


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
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return 0.0
    return float(scipy.stats.pearsonr(x, y).statistic)


def spearman(labels, preds) -> float:
    """Spearman rank correlation (ties share their average rank); 0 where undefined."""
    x, y = np.asarray(labels, np.float64), np.asarray(preds, np.float64)
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return 0.0
    return float(scipy.stats.spearmanr(x, y).statistic)


METRICS = {"accuracy": accuracy, "f1": f1, "macro_f1": macro_f1, "matthews_corr": matthews_corr,
           "pearson": pearson, "spearman": spearman}
