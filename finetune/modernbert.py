"""The ModernBERT family for fine-tuning: transformers' ModernBertForSequenceClassification (the
encoder, pooling of the first token or the mean of the real ones, the prediction head, dropout,
a classifier with a bias) on the text tasks of finetune/text.py.

`--init` names a ModernBERT pretraining workdir (its latest checkpoint), one checkpoint step
folder, a fine-tuning workdir of this family, or "none" (a random encoder of `model.size`, with
`data.tokenizer` or a vocabulary of `data.tokenizer_kind` trained on the task's train texts). A
pretraining checkpoint gives the encoder and the MLM prediction head, as transformers does when it
loads a ModernBertForMaskedLM's weights into the classifier; the classifier starts fresh.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from data.tasks import encode, load_task, subsample
from data.wheels import DataError
from finetune import tasks
from finetune.setup import FinetuneSetup
from finetune.text import _tokenizer, text_records
from infra import storage
from infra.errors import UserError
from models.modernbert import ModernBertConfig, ModernBertForSequenceClassification
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


def teacher_model(encoder: ModernBertConfig, model: dict, num_outputs: int, dtype: str):
    """A distillation teacher (finetune/distill.py): the source's classifier, no dropout, in `dtype`."""
    cfg = dataclasses.replace(encoder, dropout=0.0, attention_dropout=0.0, dtype=dtype, scan_layers=False)
    return lambda rngs: ModernBertForSequenceClassification(cfg, num_outputs, rngs, pooling=model.get("pooling", "cls"),
                                                            classifier_dropout=0.0)


def predict(model, batch: dict, key=None) -> jax.Array:
    return model(batch["input_ids"], batch["attention_mask"], key=key)


def setup(config, workdir, init: str, explicit: set) -> FinetuneSetup:
    dc = config.data
    task = tasks.get_task(dc.task)
    source, rerun = finetune_source(workdir, init, config.family)
    try:
        tfds = [dc.task] if dc.task.startswith("glue/") else []
        data = load_task(dc.task, storage.local_data_dir(dc.data_dir, tfds))
    except DataError as e:
        raise UserError(str(e)) from None
    splits = {name: subsample(s, dc.max_train_examples if name == "train" else dc.max_eval_examples)
              for name, s in data.splits.items()}
    tokenizer = _tokenizer(config, source, splits["train"], workdir, rerun)
    cfg = encoder_config(config, source, tokenizer)
    print(f"{task.name}: " + ", ".join(f"{len(s)} {n}" for n, s in splits.items()) +
          f"; ModernBERT encoder of {cfg.num_layers} layers from {source.kind}"
          + (f" {source.path}" if source.path else ""))

    def encode_rows(split: str, rows: np.ndarray, positions: np.ndarray) -> dict:
        out = encode(splits[split].take(rows), tokenizer, dc.max_seq_len)
        out["labels"] = out["labels"].astype(np.float32 if task.regression else np.int32)
        return out

    num_outputs = data.num_outputs
    model_fn = lambda rngs: ModernBertForSequenceClassification(
        cfg, num_outputs, rngs, pooling=config.model.pooling,
        classifier_dropout=config.model.classifier_dropout)

    def initial_params(fresh: dict) -> dict:
        if source.kind == "none":
            return fresh
        loaded = load_params(source)
        taken = {part: take_params(loaded[part], fresh[part], source.init)[0]
                 for part in ("encoder", "head") if part in loaded}
        if "encoder" not in taken:
            raise UserError(f"checkpoint {source.path} has no encoder parameters")
        return {**fresh, **taken}

    return FinetuneSetup(task=task, splits=splits, label_names=data.label_names, encode=encode_rows,
                         model_fn=model_fn, predict=predict, depth=depth(cfg.num_layers),
                         num_layers=cfg.num_layers, initial_params=initial_params,
                         **text_records(source, tokenizer, cfg))
