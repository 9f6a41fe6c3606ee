"""The BERT text family for fine-tuning: where the encoder and tokenizer come from, the sequence
classifier, and tokenised batches of single texts or pairs.

`--init` names a pretraining workdir (its latest checkpoint), one checkpoint step folder, a
fine-tuning workdir, a HuggingFace BERT folder, or "none" (a random encoder of `model.size`,
with `data.tokenizer` or a WordPiece vocabulary trained on the task's train texts). The encoder
shape and tokenizer always come from the source; a flag that contradicts them is an error.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data.tasks import encode, load_task, subsample
from data.wheels import DataError
from finetune import tasks
from finetune.families import Setup, checked_params
from models.bert import SIZES, BertConfig, BertEncoder
from models.hf import FINETUNE_MODEL_KEYS
from models.layers import dropout, fold, normal, zeros
from models.tokenizer import Tokenizer
from training.checkpoint import read_params, resolve_step_dir
from training.errors import UserError

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
            mask_BT1 = attention_mask[..., None].astype(x_BTD.dtype)
            pooled_BD = jnp.sum(x_BTD * mask_BT1, axis=1) / jnp.maximum(jnp.sum(mask_BT1, axis=1), 1)
        pooled_BD = dropout(pooled_BD, self.classifier_dropout, fold(key, 1))
        return self.classifier(pooled_BD).astype(jnp.float32)


def predict(model: SequenceClassifier, batch: dict, key=None) -> jax.Array:
    return model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"], key=key)


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

@dataclasses.dataclass
class Source:
    init: str                     # --init as given
    kind: str                     # "none" | "checkpoint" | "huggingface"
    path: str | None = None       # the step folder or HuggingFace folder read
    step: int | None = None
    encoder: dict | None = None   # BertConfig fields (None: from the config, --init none)
    tokenizer_dir: str | None = None

    def bert_config(self) -> BertConfig:
        return BertConfig(**self.encoder)


def _init_key(init: str) -> str:
    return init if init == "none" else str(Path(init).expanduser().resolve())


def resolve_source(init: str) -> Source:
    """What `--init` names, without reading any weights."""
    if init == "none":
        return Source(init, "none")
    path = Path(init).expanduser()
    usage = ("pass a pretraining workdir, one of its checkpoints/<step> folders, a HuggingFace BERT "
             "folder (config.json + model.safetensors), or none")
    if not path.is_dir():
        raise UserError(f"--init {init}: no such folder; {usage}")
    if (path / "checkpoints").is_dir() or path.name == "checkpoints" or path.name.isdigit():
        directory, step = resolve_step_dir(path)
        run_dir = directory.parent
        encoder = None
        if (run_dir / "source.json").is_file():  # a fine-tuning workdir: its encoder as recorded
            encoder = json.loads((run_dir / "source.json").read_text())["encoder"]
        elif (run_dir / "config.json").is_file():
            try:
                model = json.loads((run_dir / "config.json").read_text())["model"]
                encoder = dataclasses.asdict(BertConfig.from_model_config(model))
            except (KeyError, ValueError, TypeError) as e:
                raise UserError(f"{run_dir / 'config.json'} does not describe a BERT model ({e})") from None
        if encoder is None:
            raise UserError(f"{run_dir} has checkpoints but no config.json; {usage}")
        if not (run_dir / "tokenizer").is_dir():
            raise UserError(f"{run_dir} has no tokenizer/ folder; the encoder needs the tokenizer "
                            f"it was trained with")
        return Source(init, "checkpoint", str(directory / str(step)), step, encoder,
                      str(run_dir / "tokenizer"))
    if (path / "config.json").is_file():
        from models.hf import ConversionError, config_from_hf
        try:
            cfg = config_from_hf(json.loads((path / "config.json").read_text()), family="bert")
        except (ConversionError, ValueError) as e:
            raise UserError(f"--init {init}: {e}") from None
        return Source(init, "huggingface", str(path), None, dataclasses.asdict(cfg), str(path))
    raise UserError(f"--init {init} is neither a checkpoint folder nor a HuggingFace model folder; {usage}")


def load_encoder(source: Source) -> dict:
    """The source's encoder parameters as host numpy arrays (int layer keys)."""
    if source.kind == "checkpoint":
        params, _ = read_params(source.path)
        if "encoder" not in params:
            raise UserError(f"checkpoint {source.path} has no encoder parameters")
        return params["encoder"]
    from models.hf import ConversionError, import_params
    try:
        params, _, _ = import_params(source.path, architecture="BertModel")
    except ConversionError as e:
        raise UserError(f"--init {source.init}: {e}") from None
    return params["encoder"]


def size_name(cfg: BertConfig) -> str:
    """The SIZES name of an encoder shape, or "custom"."""
    for name, (layers, hidden, heads) in SIZES.items():
        if (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.intermediate_size) == (
                layers, hidden, heads, 4 * hidden):
            return name
    return "custom"


def check_overrides(config, explicit, source: Source, tokenizer: Tokenizer) -> None:
    """With a source, an explicit flag that contradicts its encoder or tokenizer is an error."""
    if source.kind == "none":
        return
    enc = source.bert_config()
    has = {"model.size": size_name(enc), "model.vocab_size": enc.vocab_size,
           "model.max_position": enc.max_position, "data.vocab_size": tokenizer.vocab_size}
    for key, value in has.items():
        group, field = key.split(".")
        if key in explicit and config[group][field] not in (value, 0):
            raise UserError(f"--config.{key}={config[group][field]} contradicts --init {source.init}, "
                            f"whose {'tokenizer' if group == 'data' else 'encoder'} has {value}: the "
                            f"encoder shape and tokenizer come from the source; drop the flag or "
                            f"use --init none")
    if "data.tokenizer" in explicit and config.data.tokenizer:
        if Path(config.data.tokenizer).expanduser().resolve() != Path(source.tokenizer_dir).resolve():
            raise UserError(f"--config.data.tokenizer={config.data.tokenizer} contradicts --init "
                            f"{source.init}, which brings its own tokenizer ({source.tokenizer_dir}); "
                            f"drop the flag or use --init none")


def _tokenizer(config, source: Source, train, workdir: Path, rerun: bool) -> Tokenizer:
    """The source's tokenizer, else data.tokenizer, else WordPiece trained on the train texts;
    a rerun loads the copy this run saved in workdir/tokenizer."""
    saved = workdir / "tokenizer"
    where = saved if rerun and (saved / "tokenizer.json").is_file() else (
        source.tokenizer_dir or config.data.tokenizer)
    if where:
        try:
            tokenizer = Tokenizer.load(Path(where).expanduser())
        except Exception as e:  # noqa: BLE001  FileNotFoundError, ValueError, or tokenizers' own
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"cannot load a tokenizer from {where}: {reason}") from None
    else:
        print(f"--init none: training a {config.data.vocab_size}-token WordPiece vocabulary on "
              f"{len(train)} train examples (set --config.data.tokenizer=DIR to reuse one)")
        tokenizer = Tokenizer.train(train.text_a + (train.text_b or []), config.data.vocab_size)
    if jax.process_index() == 0 and where != saved:
        tokenizer.save(saved)
    return tokenizer


def _source(workdir: Path, init: str) -> tuple[Source, bool]:
    """(the source, whether this is a rerun): a rerun keeps the source as first resolved (its
    step stays pinned) and must name the same --init."""
    recorded = workdir / "source.json"
    if not recorded.is_file():
        return resolve_source(init), False
    fields = {f.name for f in dataclasses.fields(Source)}
    source = Source(**{k: v for k, v in json.loads(recorded.read_text()).items() if k in fields})
    if _init_key(init) != _init_key(source.init):
        raise UserError(f"{workdir} was started with --init {source.init}; pass the same --init "
                        f"to resume, or another --workdir")
    return source, True


# ---------------------------------------------------------------------------------------------
# The setup
# ---------------------------------------------------------------------------------------------

def setup(config, workdir: Path, init: str, explicit: set) -> Setup:
    dc = config.data
    task = tasks.get_task(dc.task)
    if config.model.pooling not in POOLINGS:
        raise UserError(f"model.pooling={config.model.pooling!r}; choose one of: {', '.join(POOLINGS)}")
    source, rerun = _source(workdir, init)
    try:
        data = load_task(dc.task, dc.data_dir)
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
    bert = dataclasses.replace(source.bert_config(), dropout=config.model.dropout,
                               attention_dropout=config.model.attention_dropout,
                               dtype=config.model.dtype, remat=config.model.remat)
    if tokenizer.vocab_size > bert.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens but the encoder only "
                        f"{bert.vocab_size} embeddings")
    if dc.max_seq_len > bert.max_position:
        raise UserError(f"data.max_seq_len={dc.max_seq_len} exceeds the encoder's {bert.max_position} "
                        f"positions")
    with config.unlocked():  # config.json tells the encoder that was used, field by field
        name = size_name(bert)
        config.model.size = "" if name == "custom" else name
        for field in ("vocab_size", "max_position", "num_layers", "hidden_size", "num_heads",
                      "intermediate_size", "type_vocab_size", "layer_norm_eps", "initializer_range"):
            config.model[field] = getattr(bert, field)
    print(f"{task.name}: " + ", ".join(f"{len(s)} {n}" for n, s in splits.items()) +
          f"; encoder {size_name(bert)} from {source.kind}" + (f" {source.path}" if source.path else ""))

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
        return {**fresh, "encoder": checked_params(load_encoder(source), fresh["encoder"],
                                                   f"--init {source.init}")}

    return Setup(task=task, splits=splits, label_names=data.label_names, encode=encode_rows,
                 model_fn=model_fn, predict=predict, depth=encoder_depth(bert.num_layers),
                 num_layers=bert.num_layers, initial_params=initial_params,
                 save_assets=lambda folder: tokenizer.save(folder / "tokenizer"),
                 source=dataclasses.asdict(source),
                 results={"source": {k: getattr(source, k) for k in ("init", "kind", "path", "step")},
                          "encoder": dataclasses.asdict(bert)})
