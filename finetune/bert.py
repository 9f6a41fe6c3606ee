"""The BERT family for fine-tuning: the sequence and token classifiers and the extractive QA
model on the text tasks of finetune/text.py.

`--init` names a pretraining workdir (its latest checkpoint), one checkpoint step folder, a
fine-tuning workdir, a HuggingFace BERT folder, or "none" (finetune/text.py's text setup, which
every text family shares); this module gives it BERT's classifier, its inputs and its depths.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from finetune import text
from finetune.setup import FinetuneSetup
from models.bert import BertConfig, BertEncoder
from models.layers import dropout, fold, normal, zeros


class SequenceClassifier(nnx.Module):
    """`encoder` (BertEncoder) and `classifier` (D -> C, C = 1 for regression), with dropout on
    the pooled output. With `pooling="cls"` (BERT's tanh pooler over [CLS]) this is HuggingFace's
    BertForSequenceClassification, parameter for parameter, so `models/hf.py` exports it as such.
    `pooling="mean"` averages the last hidden states over the real tokens instead, the usual
    frozen-feature probe: the pooler only ever learned NSP, the hidden states learned MLM."""

    def __init__(self, cfg: BertConfig, num_outputs: int, classifier_dropout: float, rngs: nnx.Rngs,
                 pooling: str = "cls"):
        if pooling not in text.POOLINGS:
            raise ValueError(f"pooling must be one of {text.POOLINGS}, got {pooling!r}")
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
            # != 0: packed rows number their documents 1, 2, ... in attention_mask
            mask_BT1 = (attention_mask != 0)[..., None].astype(x_BTD.dtype)
            pooled_BD = jnp.sum(x_BTD * mask_BT1, axis=1) / jnp.maximum(jnp.sum(mask_BT1, axis=1), 1)
        pooled_BD = dropout(pooled_BD, self.classifier_dropout, fold(key, 1))
        return self.classifier(pooled_BD).astype(jnp.float32)


class PositionClassifier(nnx.Module):
    """`encoder` (BertEncoder) and a D -> C layer on every position's hidden state, after
    dropout. Named `token_classifier` (HF's `classifier`) it is HuggingFace's
    BertForTokenClassification; named `qa_outputs` with C = 2 (a start and an end logit) and
    no dropout, BertForQuestionAnswering; parameter for parameter, and the name tells export
    which. Neither has a pooler in HF: ours is kept, unused, so that any BERT source loads, and
    export leaves it out."""

    def __init__(self, cfg: BertConfig, num_outputs: int, classifier_dropout: float, rngs: nnx.Rngs,
                 output: str = "token_classifier"):
        self.encoder = BertEncoder(cfg, rngs)
        setattr(self, output, nnx.Linear(
            cfg.hidden_size, num_outputs, dtype=jnp.dtype(cfg.dtype),
            kernel_init=normal(cfg.initializer_range, "embed", None), bias_init=zeros(None), rngs=rngs))
        self.output, self.classifier_dropout = output, classifier_dropout

    def __call__(self, input_ids, token_type_ids, attention_mask, *, key=None):
        """Logits BTC in float32. `key=None` disables dropout."""
        x_BTD, _ = self.encoder(input_ids, token_type_ids, attention_mask, key=fold(key, 0))
        x_BTD = dropout(x_BTD, self.classifier_dropout, fold(key, 1))
        return getattr(self, self.output)(x_BTD).astype(jnp.float32)


def predict(model: SequenceClassifier | PositionClassifier, batch: dict, key=None) -> jax.Array:
    return model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"], key=key)


def teacher_model(encoder: BertConfig, model: dict, num_outputs: int, dtype: str):
    """A distillation teacher (finetune/distill.py): the source's classifier, no dropout, in `dtype`."""
    cfg = dataclasses.replace(encoder, dropout=0.0, attention_dropout=0.0, dtype=dtype, scan_layers=False)
    return lambda rngs: SequenceClassifier(cfg, num_outputs, 0.0, rngs, pooling=model.get("pooling", "cls"))


def encoder_depth(num_layers: int):
    """Embeddings 0, layer i at i + 1, the pooler above the layers (finetune/methods.py)."""
    def depth(keys: tuple) -> int:
        if keys[0] == "embed":
            return 0
        if keys[0] == "layers":
            return int(keys[1]) + 1
        return num_layers + 1
    return depth


CLASSIFIER = text.Classifier(
    model=lambda cfg, outputs, mc, rngs: SequenceClassifier(cfg, outputs, mc.classifier_dropout, rngs,
                                                            pooling=mc.pooling),
    predict=predict, depth=encoder_depth,
    token_model=lambda cfg, outputs, mc, rngs: PositionClassifier(cfg, outputs, mc.classifier_dropout, rngs),
    span_model=lambda cfg, outputs, mc, rngs: PositionClassifier(cfg, 2, 0.0, rngs, output="qa_outputs"))


def setup(config, workdir, init: str, explicit: set) -> FinetuneSetup:
    return text.setup(config, workdir, init, explicit, CLASSIFIER)
