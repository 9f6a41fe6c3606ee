"""Where a run's first weights come from: `--init SRC` of `python -m pretrain` and `python -m finetune`.

SRC is a workdir of either trainer (its latest checkpoint), one of its `checkpoints/<step>`
folders, a HuggingFace folder of a family's (its `model_type` names the family), or (fine-tuning
only) `none`. Every family goes through the same code: what differs (its config class, size
table, shape fields, tokenizer kind, HF record) comes from its spec (models/family.py).
`resolve_source` says what it names without reading any weights; `load_params` reads them and `take_params` puts them into a
fresh model's tree, checking every shape. The model's shape and tokenizer always come from the
source: `check_overrides` refuses a command-line flag that contradicts them. A rerun keeps the
source it first resolved (`recorded_source`: its step stays pinned) and must name the same SRC.
"""

from __future__ import annotations

import dataclasses
import json
import jax
import numpy as np

from models import family as families
from models.layers import in_layout, is_stacked
from models.tokenizer import Tokenizer
from training import run_record, storage
from training.checkpoint_reader import read_params, resolve_step_dir
from training.errors import UserError

USAGE = ("pass a pretraining workdir, one of its checkpoints/<step> folders, a HuggingFace model "
         "folder (config.json + model.safetensors), or none")


@dataclasses.dataclass
class Source:
    init: str                     # --init as given
    kind: str                     # "none" | "checkpoint" | "huggingface"
    path: str | None = None       # the step folder or HuggingFace folder read
    step: int | None = None
    encoder: dict | None = None   # the family's config fields (None: from the config, --init none)
    tokenizer_dir: str | None = None
    architecture: str | None = None  # a HuggingFace folder's class (config.json "architectures")
    family: str = families.DEFAULT   # records from before this field were all of the default

    def spec(self) -> families.FamilySpec:
        return families.get(self.family)

    def model_config(self):
        """The source's model config (its family's config class)."""
        return self.spec().config_class(**self.encoder)

    def describe(self) -> str:
        """`checkpoint /runs/x/checkpoints/7000`, `huggingface BertForMaskedLM /models/y`."""
        return " ".join(str(p) for p in (self.kind, self.architecture, self.path) if p)


def init_key(init: str) -> str:
    """What two --init values are compared by: the absolute path, a bucket URL, or `none`."""
    return init if init == "none" or storage.is_remote(init) else str(storage.as_path(init).resolve())


def resolve_source(init: str, usage: str = USAGE, family: str | None = None) -> Source:
    """What `--init` names, without reading any weights; with `family`, a source of another
    family is refused."""
    source = _resolve(init, usage)
    if family is not None and source.kind != "none" and source.family != family:
        raise UserError(f"--init {init} holds a {source.family} model, but this config trains the "
                        f"{family} family; {usage}")
    return source


def _resolve(init: str, usage: str) -> Source:
    if init == "none":
        return Source(init, "none")
    path = storage.absolute(init)  # what a rerun from another folder reads too
    if not path.is_dir():
        raise UserError(f"--init {init}: no such folder; {usage}")
    if (path / "checkpoints").is_dir() or path.name == "checkpoints" or path.name.isdigit():
        directory, step = resolve_step_dir(path)
        run_dir = directory.parent
        if not (run_dir / "config.json").is_file():
            raise UserError(f"{run_dir} has checkpoints but no config.json; {usage}")
        run_config, record = run_record.read(run_dir)
        spec = families.of_config(run_config)
        if record["trainer"] == "finetune":  # a fine-tuning workdir: its encoder as recorded
            encoder = _finetune_record(run_dir, record)["encoder"]
        else:
            try:
                encoder = dataclasses.asdict(spec.config_class.from_model_config(run_config["model"]))
            except (KeyError, ValueError, TypeError) as e:
                raise UserError(f"{run_dir / 'config.json'} does not describe a {spec.name} model ({e})") from None
        tokenizer_dir = None
        if spec.tokenizer != "none":
            if not (run_dir / "tokenizer").is_dir():
                raise UserError(f"{run_dir} has no tokenizer/ folder; the encoder needs the tokenizer "
                                f"it was trained with")
            tokenizer_dir = str(run_dir / "tokenizer")
        return Source(init, "checkpoint", str(directory / str(step)), step, encoder,
                      tokenizer_dir, family=spec.name)
    if (path / "config.json").is_file():
        from models.hf import ConversionError, config_from_hf, family_name
        try:
            config = json.loads((path / "config.json").read_text())
            name = family_name(config)
            cfg = config_from_hf(config, family=name)
        except (ConversionError, ValueError) as e:
            raise UserError(f"--init {init}: {e}") from None
        spec = families.get(name)
        architecture = (config.get("architectures") or [spec.hf_record().base])[0]
        return Source(init, "huggingface", str(path), None, dataclasses.asdict(cfg),
                      None if spec.tokenizer == "none" else str(path), architecture, family=name)
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
    record = run_record.read(workdir)[0].get("init") if config.is_file() else None
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


def finetune_source(workdir, init: str, family: str) -> tuple[Source, bool]:
    """(the source of a fine-tuning run, whether this is a rerun): a rerun keeps the source as
    first recorded in its run.json (its step stays pinned) and must name the same --init."""
    workdir = storage.as_path(workdir)
    if (workdir / "config.json").is_file() and run_record.read(workdir)[1]["trainer"] == "finetune":
        record = {"family": family, **_finetune_record(workdir, run_record.read(workdir)[1])}
        return recorded_source(record, init, workdir), True  # older records name no family
    return resolve_source(init, family=family), False


def _finetune_record(run_dir, record: dict) -> dict:
    """A fine-tuning run's source as it recorded it: run.json's, or source.json before run.json."""
    return record.get("source") or json.loads((run_dir / "source.json").read_text())


def load_encoder(source: Source) -> dict:
    """The source's encoder parameters (its family's `encoder` subtree) as host numpy arrays."""
    spec = source.spec()
    params = load_params(source, architecture=spec.hf_record().base if spec.hf else None)
    if spec.encoder not in params:
        raise UserError(f"--init {source.init}: {source.path} has no {spec.encoder} parameters")
    return params[spec.encoder]


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

def check_overrides(config, explicit, source: Source, tokenizer: Tokenizer | None,
                    instead: str = "use --init none") -> None:
    """With a source, an explicit flag that contradicts its model shape or tokenizer is an error;
    `instead` says how to get what the flag asked for."""
    if source.kind == "none":
        return
    spec, cfg = source.spec(), source.model_config()
    has = {"model.size": spec.size_of(cfg)}
    has.update({f"model.{field}": getattr(cfg, field) for field in spec.shape_fields})
    if tokenizer is not None:
        has["data.vocab_size"] = tokenizer.vocab_size
    for key, value in has.items():
        group, field = key.split(".")
        if key in explicit and config[group][field] not in (value, 0):
            raise UserError(f"--config.{key}={config[group][field]} contradicts --init {source.init}, "
                            f"whose {'tokenizer' if group == 'data' else 'model'} has {value}: the "
                            f"model's shape and tokenizer come from the source; drop the flag or "
                            f"{instead}")
    if "data.tokenizer" in explicit and config.data.tokenizer:
        if init_key(config.data.tokenizer) != init_key(source.tokenizer_dir):
            raise UserError(f"--config.data.tokenizer={config.data.tokenizer} contradicts --init "
                            f"{source.init}, which brings its own tokenizer ({source.tokenizer_dir}); "
                            f"drop the flag or {instead}")


def model_record(spec: families.FamilySpec, cfg) -> dict:
    """The model's shape as config.model's fields (size and the spec's shape fields): what a
    setup records in run.json, so that `--init` of the run and export read the model back."""
    name = spec.size_of(cfg)
    return {"size": "" if name == "custom" else name,
            **{field: getattr(cfg, field) for field in spec.shape_fields}}


def pretrain_source(config, workdir, init: str | None, explicit) -> tuple[Source | None, dict]:
    """(the --init source of a pretraining run (None: random weights), for any family, checked
    against the config (the family, flags that contradict it, the architectures its record
    takes); what it fixes, nested as the config (the model's shape, data.tokenizer), for the
    setup's record)."""
    spec = families.of_config(config)
    classes = spec.pretrain_sources or (tuple(spec.hf_record().architectures) if spec.hf else ())
    usage = ("pass a pretraining workdir, one of its checkpoints/<step> folders, or a HuggingFace "
             + (" / ".join(classes) or spec.name) + " folder")
    source = run_source(workdir, init, lambda i: resolve_source(i, usage, family=spec.name))
    if source is None:
        return None, {}
    if source.kind == "huggingface" and source.architecture not in classes:
        raise UserError(f"--init {source.init} holds a {source.architecture}; {usage}")
    tokenizer = load_tokenizer(source.tokenizer_dir) if source.tokenizer_dir else None
    check_overrides(config, explicit, source, tokenizer,
                    instead="drop --init to pretrain from random weights")
    cfg = source.model_config()
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise UserError(f"--init {source.init}: its tokenizer has {tokenizer.vocab_size} tokens "
                        f"but its model only {cfg.vocab_size} embeddings")
    # A published model's carried fields are facts of its weights; a run of ours is continued with
    # the config's (a context extension raises them), and a flag always wins.
    carried = spec.carried_fields if source.kind == "huggingface" else ()
    resolved = {"model": {**model_record(spec, cfg), **{
        field: getattr(cfg, field) for field in carried if f"model.{field}" not in explicit}}}
    if source.tokenizer_dir:
        resolved["data"] = {"tokenizer": init_key(source.tokenizer_dir)}
    problem = spec.cross_check(run_record.view(config, resolved), "pretrain") if spec.cross_check else None
    if problem:
        raise UserError(f"{problem} (the model's shape is --init {source.init}'s)")
    return source, resolved


def source_params(source: Source, fresh: dict) -> dict:
    """SRC's weights in the shape of `fresh` (a pretraining model's random parameters); the
    family's `heads` the source lacks keep their fresh values, said in one line."""
    loaded = load_params(source)
    params, missing = take_params(loaded, fresh, source.init, optional=source.spec().heads)
    unused = sorted(set(loaded) - set(fresh))  # a fine-tuning checkpoint's classifier
    at = f" at step {source.step}" if source.step is not None else ""
    if jax.process_index() == 0:
        print(f"--init: weights from {source.describe()}{at}"
              + (f"; it has no {', '.join(missing)}: created fresh" if missing else "; every head loaded")
              + (f"; its {', '.join(unused)} not used" if unused else ""))
    return params
