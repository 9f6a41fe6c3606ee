"""The ModernBERT family for fine-tuning: transformers' ModernBertForSequenceClassification (the
encoder, pooling of the first token or the mean of the real ones, the prediction head, dropout,
a classifier with a bias) on the text tasks of finetune/text.py, and its
ModernBertForQuestionAnswering on span tasks (finetune/span.py).

`--init` names a ModernBERT pretraining workdir (its latest checkpoint), one checkpoint step
folder, a fine-tuning workdir of this family, or "none" (a random encoder of `model.size`, with
`data.tokenizer` or a vocabulary of `data.tokenizer_kind` trained on the task's train texts). A
pretraining checkpoint gives the encoder and the MLM prediction head, as transformers does when it
loads a ModernBertForMaskedLM's weights into the classifier; the classifier starts fresh.
"""

from __future__ import annotations

import dataclasses

import jax

from finetune import span, tasks
from finetune.setup import FinetuneSetup
from finetune.text import _tokenizer, classification_parts, load_labelled, text_records
from infra.errors import UserError
from models.modernbert import (ModernBertConfig, ModernBertForQuestionAnswering,
                               ModernBertForSequenceClassification)
from training.init_source import finetune_source, load_params, take_params

FINETUNE_FIELDS = ("dropout", "attention_dropout", "dtype", "remat", "scan_layers", "attention")
MODEL_KEYS = ("classifier_dropout", "pooling")  # config.model fields of the classifier, not the encoder


def encoder_config(config, source, tokenizer) -> ModernBertConfig:
    """The source's encoder (or config.model's for --init none) with this run's dropout, dtype
    and layout; one line for a bad value."""
    try:
        if source.kind == "none":
            vocab = config.model.vocab_size or -(-tokenizer.vocab_size // 128) * 128
            source.encoder = dataclasses.asdict(ModernBertConfig.from_model_config(
                {**config.model.to_dict(), "vocab_size": vocab}, allow=MODEL_KEYS))
        cfg = ModernBertConfig(**{**source.encoder,
                                  **{f: config.model[f] for f in FINETUNE_FIELDS}})
    except ValueError as e:
        raise UserError(f"config.model: {e}") from None
    if tokenizer.vocab_size > cfg.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens but the encoder only "
                        f"{cfg.vocab_size} embeddings")
    if config.data.max_seq_len > cfg.max_position:
        raise UserError(f"data.max_seq_len={config.data.max_seq_len} exceeds the encoder's "
                        f"max_position={cfg.max_position}")
    with config.unlocked():  # config.json tells the encoder used (an export reads it back)
        config.model.update(dataclasses.asdict(cfg))
    return cfg


def depth(num_layers: int):
    """Embeddings and their norm 0, layer i at i + 1, the final norm and heads above the layers."""
    def layer_depth(keys: tuple) -> int:
        if keys[0] in ("embed", "embed_norm"):
            return 0
        if keys[0] == "layers":
            return int(keys[1]) + 1
        return num_layers + 1
    return layer_depth


def predict(model, batch: dict, key=None) -> jax.Array:
    return model(batch["input_ids"], batch["attention_mask"], key=key)


def setup(config, workdir, init: str, explicit: set) -> FinetuneSetup:
    dc = config.data
    task = tasks.get_task(dc.task)
    source, rerun = finetune_source(workdir, init, config.family)
    if task.kind == tasks.SPAN:
        questions, v2 = span.load(config)
        tokenizer = _tokenizer(config, source, span.tokenizer_texts(questions), workdir, rerun)
    else:
        data, splits = load_labelled(task, dc)
        tokenizer = _tokenizer(config, source, splits["train"], workdir, rerun)
    cfg = encoder_config(config, source, tokenizer)
    if task.kind == tasks.SPAN:
        parts = span.setup_parts(config, questions, v2, tokenizer)
        model_fn = lambda rngs: ModernBertForQuestionAnswering(
            cfg, rngs, classifier_dropout=config.model.classifier_dropout)
    else:
        parts = classification_parts(task, data, splits, tokenizer, dc.max_seq_len)
        model_fn = lambda rngs: ModernBertForSequenceClassification(
            cfg, data.num_outputs, rngs, pooling=config.model.pooling,
            classifier_dropout=config.model.classifier_dropout)
    print(f"{task.name}: " + ", ".join(f"{len(s)} {n}" for n, s in parts["splits"].items()) +
          f"; ModernBERT encoder of {cfg.num_layers} layers from {source.kind}"
          + (f" {source.path}" if source.path else ""))

    def initial_params(fresh: dict) -> dict:
        if source.kind == "none":
            return fresh
        loaded = load_params(source)
        taken = {part: take_params(loaded[part], fresh[part], source.init)[0]
                 for part in ("encoder", "head") if part in loaded}
        if "encoder" not in taken:
            raise UserError(f"checkpoint {source.path} has no encoder parameters")
        return {**fresh, **taken}

    return FinetuneSetup(task=task, model_fn=model_fn, predict=predict, depth=depth(cfg.num_layers),
                         num_layers=cfg.num_layers, initial_params=initial_params, **parts,
                         **text_records(source, tokenizer, cfg))
