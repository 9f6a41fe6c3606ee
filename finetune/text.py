"""The BERT text family for fine-tuning: where the encoder and tokenizer come from, the sequence
classifier, and tokenised batches of single texts or pairs.

`--init` names a pretraining workdir (its latest checkpoint), one checkpoint step folder, a
fine-tuning workdir, a HuggingFace BERT folder, or "none" (a random encoder of `model.size`,
with `data.tokenizer` or a WordPiece vocabulary trained on the task's train texts). The encoder
shape and tokenizer always come from the source; a flag that contradicts them is an error.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data.tasks import encode, load_task, subsample
from data.wheels import DataError
from finetune import tasks
from finetune.setup import FinetuneSetup
from models.bert import SPEC, BertConfig, BertEncoder
from models.hf import FINETUNE_MODEL_KEYS
from models.layers import dropout, fold, normal, zeros
from models.tokenizer import Tokenizer
from training import storage
from training.errors import UserError
from training.init_source import (Source, check_overrides, describe_model, finetune_source,
                                  load_encoder, load_tokenizer, take_params)

POOLINGS = ("cls", "mean")


# ---------------------------------------------------------------------------------------------
# The model: BERT encoder + a classifier on the pooled output
# ---------------------------------------------------------------------------------------------

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
            # != 0: packed rows number their documents 1, 2, ... in attention_mask
            mask_BT1 = (attention_mask != 0)[..., None].astype(x_BTD.dtype)
            pooled_BD = jnp.sum(x_BTD * mask_BT1, axis=1) / jnp.maximum(jnp.sum(mask_BT1, axis=1), 1)
        pooled_BD = dropout(pooled_BD, self.classifier_dropout, fold(key, 1))
        return self.classifier(pooled_BD).astype(jnp.float32)


def predict(model: SequenceClassifier, batch: dict, key=None) -> jax.Array:
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


# ---------------------------------------------------------------------------------------------
# Where the encoder (and its tokenizer) come from
# ---------------------------------------------------------------------------------------------

def _tokenizer(config, source: Source, train, workdir, rerun: bool) -> Tokenizer:
    """The source's tokenizer, else data.tokenizer, else WordPiece trained on the train texts;
    a rerun loads the copy this run saved in workdir/tokenizer."""
    saved = workdir / "tokenizer"
    where = saved if rerun and (saved / "tokenizer.json").is_file() else (
        source.tokenizer_dir or config.data.tokenizer)
    if where:
        tokenizer = load_tokenizer(where)
    else:
        kind = config.data.get("tokenizer_kind", "wordpiece")
        print(f"--init none: training a {config.data.vocab_size}-token {kind} vocabulary on "
              f"{len(train)} train examples (set --config.data.tokenizer=DIR to reuse one)")
        tokenizer = Tokenizer.train(train.text_a + (train.text_b or []), config.data.vocab_size,
                                    kind=kind)
    if jax.process_index() == 0 and where != saved:
        tokenizer.save(saved)
    return tokenizer


# ---------------------------------------------------------------------------------------------
# The setup
# ---------------------------------------------------------------------------------------------

def setup(config, workdir, init: str, explicit: set) -> FinetuneSetup:
    dc = config.data
    task = tasks.get_task(dc.task)
    if config.model.pooling not in POOLINGS:
        raise UserError(f"model.pooling={config.model.pooling!r}; choose one of: {', '.join(POOLINGS)}")
    source, rerun = finetune_source(workdir, init, config.family)
    try:
        tfds = [dc.task] if dc.task.startswith("glue/") else []  # GLUE is TFDS: glue/NAME
        data = load_task(dc.task, storage.local_data_dir(dc.data_dir, tfds))
    except DataError as e:
        raise UserError(str(e)) from None
    assert task.regression == (data.label_names is None), task
    assert task.kind == tasks.REGRESSION or (task.kind == tasks.PAIR) == data.pair, task
    splits = {name: subsample(s, dc.max_train_examples if name == "train" else dc.max_eval_examples)
              for name, s in data.splits.items()}
    tokenizer = _tokenizer(config, source, splits["train"], workdir, rerun)
    check_overrides(config, explicit, source, tokenizer)
    if source.kind == "none":
        vocab = config.model.vocab_size or -(-tokenizer.vocab_size // 128) * 128
        try:
            bert = BertConfig.from_model_config({**config.model.to_dict(), "vocab_size": vocab},
                                                allow=FINETUNE_MODEL_KEYS)
        except ValueError as e:
            raise UserError(f"config.model: {e}") from None
        source.encoder = dataclasses.asdict(bert)
    bert = dataclasses.replace(source.model_config(), dropout=config.model.dropout,
                               attention_dropout=config.model.attention_dropout,
                               dtype=config.model.dtype, remat=config.model.remat,
                               scan_layers=config.model.scan_layers,
                               attention=config.model.attention)
    if tokenizer.vocab_size > bert.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens but the encoder only "
                        f"{bert.vocab_size} embeddings")
    if dc.max_seq_len > bert.max_position:
        raise UserError(f"data.max_seq_len={dc.max_seq_len} exceeds the encoder's {bert.max_position} "
                        f"positions")
    describe_model(config, SPEC, bert)
    print(f"{task.name}: " + ", ".join(f"{len(s)} {n}" for n, s in splits.items()) +
          f"; encoder {SPEC.size_of(bert)} from {source.kind}" + (f" {source.path}" if source.path else ""))

    def encode_rows(split: str, rows: np.ndarray, positions: np.ndarray) -> dict:
        out = encode(splits[split].take(rows), tokenizer, dc.max_seq_len)
        out["labels"] = out["labels"].astype(np.float32 if task.regression else np.int32)
        return out

    num_outputs = data.num_outputs
    model_fn = lambda rngs: SequenceClassifier(bert, num_outputs, config.model.classifier_dropout,
                                               rngs, pooling=config.model.pooling)
    def initial_params(fresh: dict) -> dict:
        if source.kind == "none":
            return fresh
        return {**fresh, "encoder": take_params(load_encoder(source), fresh["encoder"], source.init)[0]}

    return FinetuneSetup(task=task, splits=splits, label_names=data.label_names, encode=encode_rows,
                         model_fn=model_fn, predict=predict, depth=encoder_depth(bert.num_layers),
                         num_layers=bert.num_layers, initial_params=initial_params,
                         **text_records(source, tokenizer, bert))


def text_records(source: Source, tokenizer: Tokenizer, encoder) -> dict:
    """What a text family's setup keeps besides its model: the tokenizer saved with every
    checkpoint, the source, and what results.json says of both (`encoder`: its config)."""
    return dict(save_assets=lambda folder: tokenizer.save(folder / "tokenizer"),
                source=dataclasses.asdict(source),
                results={"source": {k: getattr(source, k) for k in ("init", "kind", "path", "step")},
                         "encoder": dataclasses.asdict(encoder)})
