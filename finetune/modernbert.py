"""The ModernBERT family for fine-tuning: transformers' ModernBertForSequenceClassification (the
encoder, pooling of the first token or the mean of the real ones, the prediction head, dropout,
a classifier with a bias), or for a token task ModernBertForTokenClassification (the same on
every position), or ModernBertForQuestionAnswering for a span task (the same with two outputs;
one class here, models/modernbert.py), on the text tasks of finetune/text.py.

`--init` names a ModernBERT pretraining workdir (its latest checkpoint), one checkpoint step
folder, a fine-tuning workdir of this family, or "none" (finetune/text.py). A pretraining
checkpoint gives the encoder and the MLM prediction head, as transformers does when it loads a
ModernBertForMaskedLM's weights into the classifier; the classifier starts fresh.
"""

from __future__ import annotations

import dataclasses

import jax

from finetune import text
from finetune.setup import FinetuneSetup
from infra.errors import UserError
from models.modernbert import (ModernBertConfig, ModernBertForPositionClassification,
                               ModernBertForSequenceClassification)
from training.init_source import load_params, take_params


def depth(num_layers: int):
    """Embeddings and their norm 0, layer i at i + 1, the final norm and heads above the layers."""
    def layer_depth(keys: tuple) -> int:
        if keys[0] in ("embed", "embed_norm"):
            return 0
        if keys[0] == "layers":
            return int(keys[1]) + 1
        return num_layers + 1
    return layer_depth


def teacher_model(encoder: ModernBertConfig, model: dict, num_outputs: int, dtype: str):
    """A distillation teacher (finetune/distill.py): the source's classifier, no dropout, in `dtype`."""
    cfg = dataclasses.replace(encoder, dropout=0.0, attention_dropout=0.0, dtype=dtype, scan_layers=False)
    return lambda rngs: ModernBertForSequenceClassification(cfg, num_outputs, rngs, pooling=model.get("pooling", "cls"),
                                                            classifier_dropout=0.0)


def predict(model, batch: dict, key=None) -> jax.Array:
    return model(batch["input_ids"], batch["attention_mask"], key=key)


def take(source, fresh: dict) -> dict:
    """The source's encoder and, where it has one, its prediction head."""
    loaded = load_params(source)
    taken = {part: take_params(loaded[part], fresh[part], source.init)[0]
             for part in ("encoder", "head") if part in loaded}
    if "encoder" not in taken:
        raise UserError(f"checkpoint {source.path} has no encoder parameters")
    return {**fresh, **taken}


CLASSIFIER = text.Classifier(
    model=lambda cfg, outputs, mc, rngs: ModernBertForSequenceClassification(
        cfg, outputs, rngs, pooling=mc.pooling, classifier_dropout=mc.classifier_dropout),
    predict=predict, depth=depth, take=take,
    token_model=lambda cfg, outputs, mc, rngs: ModernBertForPositionClassification(
        cfg, outputs, rngs, classifier_dropout=mc.classifier_dropout),
    span_model=lambda cfg, outputs, mc, rngs: ModernBertForPositionClassification(
        cfg, 2, rngs, classifier_dropout=mc.classifier_dropout, output="qa_outputs"))


def setup(config, workdir, init: str, explicit: set) -> FinetuneSetup:
    return text.setup(config, workdir, init, explicit, CLASSIFIER)
