"""Fine-tuning any text family: where the encoder and tokenizer come from, and tokenised batches
of single texts, pairs or tagged words, for the family's sequence or token classifier.

`--init` names a pretraining workdir (its latest checkpoint), one checkpoint step folder, a
fine-tuning workdir, a HuggingFace folder of the family's, or "none" (a random encoder of
`model.size`, with `data.tokenizer` or a vocabulary of `data.tokenizer_kind` trained on the
task's train texts). The encoder shape and tokenizer always come from the source; a flag that
contradicts them is an error. What differs between families is their spec's (config class,
sizes) and their `Classifier` (the model on the encoder, its inputs, its depths):
finetune/bert.py, finetune/modernbert.py.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Callable

import jax
import numpy as np

from data.tasks import encode, load_task, subsample
from data.wheels import DataError
from finetune import span, tasks, token
from finetune.setup import FinetuneSetup
from models import family as families
from models.hf import FINETUNE_MODEL_KEYS
from models.tokenizer import Tokenizer
from training import storage
from training.errors import UserError
from training.init_source import (Source, check_overrides, finetune_source, load_encoder,
                                  load_tokenizer, model_record, take_params)

POOLINGS = ("cls", "mean")
# config.model fields that are this run's, not the source's: regularisation, precision, layout.
RUN_FIELDS = ("dropout", "attention_dropout", "dtype", "remat", "scan_layers", "attention")


@dataclasses.dataclass(frozen=True)
class Classifier:
    """A text family's classifiers. `model(encoder config, outputs, config.model, rngs)` builds
    the sequence classifier (params `{"encoder": ..., head}`), `token_model` the token classifier
    and `span_model` the extractive QA model (the same arguments, outputs on every position); `predict(model, batch, key)` gives either's
    output; `depth(num_layers)` their parameters' depths (finetune/methods.py); `take(source,
    fresh)` the parameters a source gives them (default: the encoder, the head fresh)."""
    model: Callable
    predict: Callable
    depth: Callable[[int], Callable[[tuple], int]]
    take: Callable[[Source, dict], dict] | None = None
    token_model: Callable | None = None
    span_model: Callable | None = None

    def builder(self, task: tasks.Task, family: str) -> Callable:
        build = {tasks.TOKEN: self.token_model, tasks.SPAN: self.span_model}.get(task.kind, self.model)
        if build is None:
            raise UserError(f"the {family} family has no model for {task.kind} tasks like {task.name}")
        return build


def take_encoder(source: Source, fresh: dict) -> dict:
    return {**fresh, "encoder": take_params(load_encoder(source), fresh["encoder"], source.init)[0]}


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

def encoder_config(config, spec: families.FamilySpec, source: Source, tokenizer: Tokenizer):
    """The source's encoder (config.model's for --init none, the vocabulary from the tokenizer)
    with this run's RUN_FIELDS; one line for a bad value."""
    try:
        if source.kind == "none":
            vocab = config.model.vocab_size or -(-tokenizer.vocab_size // 128) * 128
            source.encoder = dataclasses.asdict(spec.config_class.from_model_config(
                {**config.model.to_dict(), "vocab_size": vocab}, allow=FINETUNE_MODEL_KEYS))
        cfg = spec.config_class(**{**source.encoder, **{f: config.model[f] for f in RUN_FIELDS}})
    except ValueError as e:
        raise UserError(f"config.model: {e}") from None
    if tokenizer.vocab_size > cfg.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens but the encoder only "
                        f"{cfg.vocab_size} embeddings")
    if config.data.max_seq_len > cfg.max_position:
        raise UserError(f"data.max_seq_len={config.data.max_seq_len} exceeds the encoder's "
                        f"{cfg.max_position} positions")
    return cfg


def setup(config, workdir, init: str, explicit: set, classifier: Classifier) -> FinetuneSetup:
    dc, spec = config.data, families.of_config(config)
    task = tasks.get_task(dc.task)
    if config.model.pooling not in POOLINGS:
        raise UserError(f"model.pooling={config.model.pooling!r}; choose one of: {', '.join(POOLINGS)}")
    source, rerun = finetune_source(workdir, init, spec.name)
    if task.kind == tasks.SPAN:
        questions, v2 = span.load(config)
        tokenizer = _tokenizer(config, source, span.tokenizer_texts(questions), workdir, rerun)
        parts, num_outputs = span.setup_parts(config, questions, v2, tokenizer), 2
    else:
        data, splits = load_labelled(task, dc)
        tokenizer = _tokenizer(config, source, splits["train"], workdir, rerun)
        parts, num_outputs = labelled_parts(task, data, splits, tokenizer, dc.max_seq_len), data.num_outputs
    check_overrides(config, explicit, source, tokenizer)
    cfg = encoder_config(config, spec, source, tokenizer)
    print(f"{task.name}: " + ", ".join(f"{len(s)} {n}" for n, s in parts["splits"].items()) +
          f"; {spec.name} encoder {spec.size_of(cfg)} of {cfg.num_layers} layers from {source.kind}"
          + (f" {source.path}" if source.path else ""))

    mc, build = config.model, classifier.builder(task, spec.name)
    take = classifier.take or take_encoder
    return FinetuneSetup(task=task, **parts,
                         model_fn=lambda rngs: build(cfg, num_outputs, mc, rngs),
                         predict=classifier.predict, depth=classifier.depth(cfg.num_layers),
                         num_layers=cfg.num_layers,
                         initial_params=lambda fresh: fresh if source.kind == "none" else take(source, fresh),
                         save_assets=lambda folder: tokenizer.save(folder / "tokenizer"),
                         source=dataclasses.asdict(source),
                         results={"source": {k: getattr(source, k) for k in ("init", "kind", "path", "step")},
                                  "encoder": dataclasses.asdict(cfg)},
                         # run.json: the encoder used, field by field (an export reads it back)
                         resolved={"model": {**dataclasses.asdict(cfg), **model_record(spec, cfg)}})


def load_labelled(task, dc) -> tuple:
    """A labelled task's data and its (subsampled) splits; one line if bad."""
    try:
        tfds = [dc.task] if dc.task.startswith("glue/") or dc.task in TFDS_TASKS else []
        data = load_task(dc.task, storage.local_data_dir(dc.data_dir, tfds))
    except DataError as e:
        raise UserError(str(e)) from None
    assert task.regression == (data.label_names is None), task
    assert task.kind == tasks.REGRESSION or (task.kind == tasks.PAIR) == data.pair, task
    return data, {name: subsample(s, dc.max_train_examples if name == "train" else dc.max_eval_examples)
                  for name, s in data.splits.items()}


def labelled_parts(task, data, splits: dict, tokenizer, max_len: int) -> dict:
    """FinetuneSetup's data fields for labelled rows: the splits and their encoding, and for a
    token task its scoring and per-word predictions (finetune/token.py)."""
    parts = dict(splits=splits, label_names=data.label_names,
                 encode=rows_encoder(task, splits, tokenizer, max_len))
    if task.kind == tasks.TOKEN:
        # what finetune/token.py reads of a setup, and where it keeps each split's encoded tags
        view = types.SimpleNamespace(**parts, gold_labels={})
        parts.update(score=lambda split, out: (token.score(task, view, split, out), out),
                     write_predictions=lambda workdir, split, out: token.write_predictions(
                         workdir, view, split, out))
    return parts


TFDS_TASKS = ("conll2003",)  # besides glue/NAME: what a bucket's data_dir must mirror down


def rows_encoder(task, splits: dict, tokenizer: Tokenizer, max_len: int):
    """`encode(split, rows, positions)` of a text family: the kind's encoding of those rows (a
    token task's words and tags, data/conll.py), else data/tasks.py's texts and labels."""
    kind = tasks.kind_module(task)
    encode_split = kind.encode if kind is not None else encode

    def encode_rows(split: str, rows: np.ndarray, positions: np.ndarray) -> dict:
        out = encode_split(splits[split].take(rows), tokenizer, max_len)
        out["labels"] = out["labels"].astype(np.float32 if task.regression else np.int32)
        return out
    return encode_rows
