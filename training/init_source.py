"""Where a run's first weights come from: `--init SRC` of `python -m pretrain` and `python -m finetune`.

SRC is a workdir of either trainer (its latest checkpoint), one of its `checkpoints/<step>`
folders, a HuggingFace BERT folder, or (fine-tuning only) `none`. `resolve_source` says what it
names without reading any weights; `load_params` reads them and `take_params` puts them into a
fresh model's tree, checking every shape. The model's shape and tokenizer always come from the
source: `check_overrides` refuses a command-line flag that contradicts them. A rerun keeps the
source it first resolved (`recorded_source`: its step stays pinned) and must name the same SRC.
"""

from __future__ import annotations

import dataclasses
import json
import jax
import numpy as np

from models.bert import SIZES, BertConfig
from models.layers import in_layout, is_stacked
from models.tokenizer import Tokenizer
from training import storage
from training.checkpoint import read_params, resolve_step_dir
from training.errors import UserError

USAGE = ("pass a pretraining workdir, one of its checkpoints/<step> folders, a HuggingFace BERT "
         "folder (config.json + model.safetensors), or none")


@dataclasses.dataclass
class Source:
    init: str                     # --init as given
    kind: str                     # "none" | "checkpoint" | "huggingface"
    path: str | None = None       # the step folder or HuggingFace folder read
    step: int | None = None
    encoder: dict | None = None   # BertConfig fields (None: from the config, --init none)
    tokenizer_dir: str | None = None
    architecture: str | None = None  # a HuggingFace folder's class (config.json "architectures")

    def bert_config(self) -> BertConfig:
        return BertConfig(**self.encoder)

    def describe(self) -> str:
        """`checkpoint /runs/x/checkpoints/7000`, `huggingface BertForMaskedLM /models/y`."""
        return " ".join(str(p) for p in (self.kind, self.architecture, self.path) if p)


def init_key(init: str) -> str:
    """What two --init values are compared by: the absolute path, a bucket URL, or `none`."""
    return init if init == "none" or storage.is_remote(init) else str(storage.as_path(init).resolve())


def resolve_source(init: str, usage: str = USAGE) -> Source:
    """What `--init` names, without reading any weights."""
    if init == "none":
        return Source(init, "none")
    path = storage.absolute(init)  # what a rerun from another folder reads too
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
            config = json.loads((path / "config.json").read_text())
            cfg = config_from_hf(config, family="bert")
        except (ConversionError, ValueError) as e:
            raise UserError(f"--init {init}: {e}") from None
        architecture = (config.get("architectures") or ["BertModel"])[0]
        return Source(init, "huggingface", str(path), None, dataclasses.asdict(cfg), str(path),
                      architecture)
    raise UserError(f"--init {init} is neither a checkpoint folder nor a HuggingFace model folder; {usage}")


def run_source(workdir, init: str | None, resolve=resolve_source) -> Source | None:
    """The source of a pretraining run in `workdir` (None: random weights). A workdir that has
    checkpoints resumes from them, never from SRC again: it keeps the source its config.json
    recorded (`init`) and must be given the same --init (none for a run from random weights)."""
    init = None if init == "none" else init
    try:
        resolve_step_dir(workdir)
    except UserError:  # no checkpoints yet: a fresh start
        return resolve(init) if init is not None else None
    config = storage.as_path(workdir) / "config.json"
    record = json.loads(config.read_text()).get("init") if config.is_file() else None
    if record is None:
        if init is not None:
            raise UserError(f"{workdir} already has checkpoints of a run from random weights; "
                            f"drop --init to resume it, or pass another --workdir")
        return None
    return recorded_source(record, init, workdir)


def recorded_source(record: dict, init: str | None, workdir) -> Source:
    """The source a run in `workdir` recorded when it started; `init` must name the same."""
    fields = {f.name for f in dataclasses.fields(Source)}
    source = Source(**{k: v for k, v in record.items() if k in fields})
    if init is None or init_key(init) != init_key(source.init):
        raise UserError(f"{workdir} was started with --init {source.init}; pass the same --init "
                        f"to resume, or another --workdir")
    return source


def load_tokenizer(where) -> Tokenizer:
    try:
        return Tokenizer.load(storage.as_path(where))
    except Exception as e:  # noqa: BLE001  FileNotFoundError, ValueError, or tokenizers' own
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load a tokenizer from {where}: {reason}") from None


# ---------------------------------------------------------------------------------------------
# The weights
# ---------------------------------------------------------------------------------------------

def load_params(source: Source, architecture: str | None = None) -> dict:
    """The source's parameters as host numpy arrays (int layer keys): a checkpoint's whole tree,
    or a HuggingFace folder's as `architecture` (default: the folder's own class)."""
    if source.kind == "checkpoint":
        return read_params(source.path)[0]
    from models.hf import ConversionError, import_params
    folder = source.path
    if storage.is_remote(folder):  # safetensors opens local files only
        folder = storage.mirror_path(folder)
        storage.download(source.path, folder, every_file=True)
    try:
        return import_params(folder, architecture=architecture)[0]
    except ConversionError as e:
        raise UserError(f"--init {source.init}: {e}") from None


def _name(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def take_params(loaded: dict, fresh: dict, init: str, optional=()) -> tuple[dict, list[str]]:
    """`fresh` (a model's parameter tree) with every leaf taken from `loaded`, shape-checked, as
    float32 numpy, and the `optional` parts (e.g. "nsp", "encoder/pooler") the source lacks: those
    keep their fresh values. Any other leaf the source lacks is an error. A source of the other
    layer layout (scanned vs unrolled stack) is converted to `fresh`'s."""
    loaded = in_layout(loaded, scanned=is_stacked(fresh), like=fresh)
    flat = {_name(p): x for p, x in jax.tree_util.tree_leaves_with_path(loaded)}
    kept = []

    def take(path, leaf):
        name = _name(path)
        if name not in flat:
            part = next((o for o in optional if name == o or name.startswith(o + "/")), None)
            if part is None:
                raise UserError(f"--init {init} has no parameter {name}")
            if part not in kept:
                kept.append(part)
            return leaf
        x = flat[name]
        if tuple(x.shape) != tuple(leaf.shape):
            raise UserError(f"--init {init}: parameter {name} has shape {tuple(x.shape)}, "
                            f"the model needs {tuple(leaf.shape)}")
        return np.asarray(x, np.float32)
    return jax.tree_util.tree_map_with_path(take, fresh), kept


# ---------------------------------------------------------------------------------------------
# The config: what the source fixes
# ---------------------------------------------------------------------------------------------

def size_name(cfg: BertConfig) -> str:
    """The SIZES name of an encoder shape, or "custom"."""
    for name, (layers, hidden, heads) in SIZES.items():
        if (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.intermediate_size) == (
                layers, hidden, heads, 4 * hidden):
            return name
    return "custom"


def check_overrides(config, explicit, source: Source, tokenizer: Tokenizer,
                    instead: str = "use --init none") -> None:
    """With a source, an explicit flag that contradicts its encoder or tokenizer is an error;
    `instead` says how to get what the flag asked for."""
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
                            f"{instead}")
    if "data.tokenizer" in explicit and config.data.tokenizer:
        if init_key(config.data.tokenizer) != init_key(source.tokenizer_dir):
            raise UserError(f"--config.data.tokenizer={config.data.tokenizer} contradicts --init "
                            f"{source.init}, which brings its own tokenizer ({source.tokenizer_dir}); "
                            f"drop the flag or {instead}")


SHAPE_FIELDS = ("vocab_size", "max_position", "num_layers", "hidden_size", "num_heads",
                "intermediate_size", "type_vocab_size", "layer_norm_eps", "initializer_range")


def describe_encoder(config, bert: BertConfig) -> None:
    """Writes the encoder's shape into config.model, field by field, so that config.json tells
    the encoder that was used (and `--init` of this run reads it back)."""
    with config.unlocked():
        name = size_name(bert)
        config.model.size = "" if name == "custom" else name
        for field in SHAPE_FIELDS:
            config.model[field] = getattr(bert, field)
