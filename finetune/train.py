"""Fine-tuning a BERT encoder on a labelled task: the loop, top to bottom.

`train_and_evaluate(config, workdir, init)` restores only the encoder from `init` (a pretraining
workdir's latest step, one checkpoint step folder, a HuggingFace BERT folder, or "none" for a
random encoder), puts a fresh classifier on the pooled output, and trains with the method in
`config.method` (full fine-tuning, frozen encoder or bottom layers, L2-SP, layer-wise LR decay,
label smoothing). It evaluates on dev every epoch, keeps the best dev checkpoint in `best/`,
and at the end scores that checkpoint on dev and test into `results.json` and
`predictions_<split>.tsv`. A stopped run (SIGTERM, Ctrl-C) saves and resumes bitwise on rerun.

Frozen parameters get zero updates (`optax.set_to_zero` in a `multi_transform`, so they have no
optimizer state and no weight decay) and the step passes them through untouched: they stay
bitwise equal to the source.
"""

import dataclasses
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from flax.core import spmd
from tqdm import tqdm

from data.tasks import encode, load_task, subsample
from data.wheels import DataError
from finetune import tasks
from models.bert import SIZES, BertConfig
from models.tokenizer import Tokenizer
from training import mesh as mesh_lib
from training.checkpoint import Checkpointer, read_params, resolve_step_dir
from training.config import save_config
from training.errors import UserError
from training.loop import LogWindow
from training.metrics import MetricsWriter
from training.optim import decay_mask, learning_rate_schedule
from training.state import abstract_state, create_train_state, init_params
from training.preemption import StopRequest

_SHUFFLE_TAG = 0x46544E45  # "FTNE": epoch permutations of the train split


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
        if key in explicit and config[key.split(".")[0]][key.split(".")[1]] not in (value, 0):
            given = config[key.split(".")[0]][key.split(".")[1]]
            raise UserError(f"--config.{key}={given} contradicts --init {source.init}, whose "
                            f"{'tokenizer' if key.startswith('data') else 'encoder'} has {value}: the "
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


# ---------------------------------------------------------------------------------------------
# Methods: which parameters train, at which learning rate
# ---------------------------------------------------------------------------------------------

def _keys(path) -> list:
    return [getattr(k, "key", getattr(k, "idx", k)) for k in path]


def frozen_mask(params, method) -> dict:
    """True for parameters that never change: the encoder (freeze_encoder), or the embeddings and
    the bottom k layers (freeze_bottom = k >= 0). The classifier always trains."""
    def frozen(path, _):
        keys = _keys(path)
        if keys[0] != "encoder":
            return False
        if method.freeze_encoder:
            return True
        k = method.freeze_bottom
        return k >= 0 and (keys[1] == "embed" or (keys[1] == "layers" and keys[2] < k))
    return jax.tree_util.tree_map_with_path(frozen, params)


def layer_scales(params, decay: float, num_layers: int) -> dict:
    """Layer-wise LR decay: embeddings are depth 0, layer i depth i + 1, pooler and classifier
    depth L + 1; a parameter at depth d learns at lr * decay^(L + 1 - d)."""
    def scale(path, _):
        keys = _keys(path)
        if keys[0] == "encoder" and keys[1] == "embed":
            depth = 0
        elif keys[0] == "encoder" and keys[1] == "layers":
            depth = keys[2] + 1
        else:
            depth = num_layers + 1
        return decay ** (num_layers + 1 - depth)
    return jax.tree_util.tree_map_with_path(scale, params)


def _scale_updates(scales) -> optax.GradientTransformation:
    return optax.GradientTransformation(
        lambda params: optax.EmptyState(),
        lambda updates, state, params=None: (jax.tree.map(lambda u, s: u * s, updates, scales), state))


def make_optimizer(optim_cfg, total_steps: int, frozen, scales=None):
    """AdamW (no decay on norms and biases) with warmup + decay on the trained parameters, zero
    updates on the frozen ones; `scales` multiplies each parameter's update (layer decay).
    Returns (optimizer, learning-rate schedule)."""
    warmup = optim_cfg.warmup_steps if optim_cfg.warmup_steps >= 0 else round(
        optim_cfg.warmup_ratio * total_steps)
    schedule = learning_rate_schedule(ml_collections.ConfigDict(
        dict(lr=optim_cfg.lr, warmup_steps=warmup, decay=optim_cfg.decay, decay_steps=0,
             end_lr_ratio=optim_cfg.end_lr_ratio)), total_steps)
    adamw = optax.chain(
        optax.clip_by_global_norm(optim_cfg.clip_norm) if optim_cfg.clip_norm > 0 else optax.identity(),
        optax.scale_by_adam(b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps),
        optax.add_decayed_weights(optim_cfg.weight_decay, mask=decay_mask),
        optax.scale_by_learning_rate(schedule))
    labels = jax.tree.map(lambda f: "frozen" if f else "train", frozen)
    tx = optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()}, labels)
    if scales is not None:
        tx = optax.chain(tx, _scale_updates(scales))
    return tx, schedule


# ---------------------------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------------------------

def make_train_step(graphdef, tx, *, seed: int, grad_accum: int, regression: bool,
                    label_smoothing: float, frozen, l2sp_alpha: float = 0.0):
    """One update over the global batch in `grad_accum` microbatches (losses normalised by the
    global example count). With `state["anchor"]` (L2-SP) the loss gains
    alpha/2 * ||w - w0||^2 over the trained encoder weights. Dropout keys derive from
    (seed, step, microbatch)."""

    def loss_fn(params, micro, norm, key):
        # No gradient flows into frozen weights: XLA drops their part of the backward pass.
        params = jax.tree.map(lambda f, p: jax.lax.stop_gradient(p) if f else p, frozen, params)
        model = nnx.merge(graphdef, params)
        logits_BC = model(micro["input_ids"], micro["token_type_ids"], micro["attention_mask"], key=key)
        sums = tasks.loss_sums(logits_BC, micro["labels"], micro["weights"], regression=regression,
                               label_smoothing=label_smoothing)
        return sums["loss"] / norm, sums

    grad_fn = jax.grad(loss_fn, has_aux=True)

    def l2sp(encoder, anchor):
        terms = [jnp.sum(jnp.square(w - w0)) for f, w, w0 in
                 zip(jax.tree.leaves(frozen["encoder"]), jax.tree.leaves(encoder), jax.tree.leaves(anchor))
                 if not f]
        return 0.5 * l2sp_alpha * sum(terms, jnp.zeros((), jnp.float32))

    def train_step(state, batch):
        key = jax.random.fold_in(jax.random.key(seed), state["step"])
        norm = jnp.maximum(jnp.sum(batch["weights"]), 1.0)
        micro = jax.tree.map(lambda x: x.reshape(-1, grad_accum, *x.shape[1:]).swapaxes(0, 1), batch)

        def accumulate(carry, i):
            grads, sums = carry
            g, s = grad_fn(state["params"], jax.tree.map(lambda x: x[i], micro), norm,
                           jax.random.fold_in(key, i))
            return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, sums, s)), None

        zeros = jax.tree.map(jnp.zeros_like, state["params"])
        zero_sums = {k: jnp.zeros((), jnp.float32) for k in tasks.SUM_KEYS}
        (grads, sums), _ = jax.lax.scan(accumulate, (zeros, zero_sums), jnp.arange(grad_accum))
        penalty = jnp.zeros((), jnp.float32)
        if "anchor" in state:
            penalty, g = jax.value_and_grad(l2sp)(state["params"]["encoder"], state["anchor"])
            grads = {**grads, "encoder": jax.tree.map(jnp.add, grads["encoder"], g)}
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        # Frozen weights are passed through as they were (not w + 0, which turns -0.0 into 0.0).
        params = jax.tree.map(lambda f, new, old: old if f else new, frozen, params, state["params"])
        new_state = {**state, "params": params, "opt_state": opt_state, "step": state["step"] + 1}
        return new_state, {**sums, "l2sp": penalty, "grad_norm": optax.tree.norm(grads)}

    return train_step


def make_eval_step(graphdef):
    def eval_step(params, batch):
        model = nnx.merge(graphdef, params)
        return model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
    return eval_step


# ---------------------------------------------------------------------------------------------
# Batches: train rows a pure function of (seed, step); eval rows in order, padded with weight 0
# ---------------------------------------------------------------------------------------------

FEATURES = ("input_ids", "token_type_ids", "attention_mask", "labels")


class Batches:
    def __init__(self, arrays: dict[str, np.ndarray], seed: int):
        self.arrays, self.seed, self.n = arrays, seed, len(arrays["labels"])
        self._perms: dict[int, np.ndarray] = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            self._perms[epoch] = np.random.default_rng([self.seed, _SHUFFLE_TAG, epoch]).permutation(self.n)
        return self._perms[epoch]

    def _local(self, rows: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
        pi, pc = jax.process_index(), jax.process_count()
        local = slice(pi * len(rows) // pc, (pi + 1) * len(rows) // pc)
        batch = {k: self.arrays[k][rows[local]] for k in FEATURES}
        return {**batch, "weights": weights[local].astype(np.float32)}

    def train(self, step: int, batch_size: int) -> dict[str, np.ndarray]:
        """This process's rows of global batch `step` in the endless stream of shuffled epochs."""
        epochs, offsets = np.divmod(step * batch_size + np.arange(batch_size), self.n)
        rows = np.array([self._permutation(int(e))[o] for e, o in zip(epochs, offsets)], np.int64)
        return self._local(rows, np.ones(batch_size))

    def eval(self, index: int, batch_size: int) -> dict[str, np.ndarray]:
        """Eval batch `index`: rows in order; past the end, row 0 again with weight 0."""
        rows = index * batch_size + np.arange(batch_size)
        weights = rows < self.n
        return self._local(np.where(weights, rows, 0), weights)

    def num_eval_batches(self, batch_size: int) -> int:
        return -(-self.n // batch_size)


def _host(x) -> np.ndarray:
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _mean_loss(task: tasks.Task, logits: np.ndarray, labels: np.ndarray) -> float:
    if task.regression:
        return float(np.mean((logits[:, 0] - labels) ** 2))
    shifted = logits - logits.max(axis=-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return float(-np.mean(logp[np.arange(len(labels)), labels.astype(np.int64)]))


def _better(value: float, best: float | None) -> bool:
    return math.isfinite(value) and (best is None or value > best)


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

def train_and_evaluate(config, workdir: str | Path, init: str = "none", explicit=()) -> dict | None:
    """Fine-tune per `config`; returns the results (as in results.json), or None if stopped.

    `explicit`: the config keys the user set on the command line; with a source, those that
    contradict its encoder or tokenizer are refused."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tc, dc, method = config.train, config.data, config.method
    explicit = set(explicit)
    try:
        task = tasks.get_task(dc.task)
    except KeyError as e:
        raise UserError(e.args[0]) from None
    if task.regression and method.label_smoothing:
        raise UserError(f"method.label_smoothing={method.label_smoothing} applies to classification; "
                        f"{task.name} is a regression task")
    if config.model.pooling not in tasks.POOLINGS:
        raise UserError(f"model.pooling={config.model.pooling!r}; choose one of: {', '.join(tasks.POOLINGS)}")

    # ---- Source, data, tokenizer ------------------------------------------------------------
    recorded = workdir / "source.json"
    rerun = recorded.is_file()
    if rerun:  # a rerun: the source as first resolved (its step stays pinned)
        source = Source(**{k: v for k, v in json.loads(recorded.read_text()).items()
                           if k in {f.name for f in dataclasses.fields(Source)}})
        if _init_key(init) != _init_key(source.init):
            raise UserError(f"{workdir} was started with --init {source.init}; pass the same --init "
                            f"to resume, or another --workdir")
    else:
        source = resolve_source(init)
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
                                                allow=("pooling", "classifier_dropout"))
        except ValueError as e:
            raise UserError(f"--config.model.size: {e}") from None
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

    def arrays(split):
        out = encode(split, tokenizer, dc.max_seq_len)
        out["labels"] = out["labels"].astype(np.float32 if task.regression else np.int32)
        return out

    encoded = {name: arrays(s) for name, s in splits.items()}
    train_data = Batches(encoded["train"], tc.seed)
    print(f"{task.name}: " + ", ".join(f"{len(s)} {n}" for n, s in splits.items()) +
          f"; encoder {size_name(bert)} from {source.kind}" +
          (f" {source.path}" if source.path else ""))

    # ---- Mesh, durations --------------------------------------------------------------------
    mesh = mesh_lib.make_mesh(config.mesh)
    mesh_lib.check_divisible(tc.batch_size, mesh, grad_accum=tc.grad_accum)
    eval_batch = config.eval.batch_size or tc.batch_size
    mesh_lib.check_divisible(eval_batch, mesh, "eval.batch_size")
    steps_per_epoch = max(1, train_data.n // tc.batch_size)
    total = tc.steps or max(1, math.ceil(tc.epochs * steps_per_epoch))
    eval_every = config.eval.every_steps or steps_per_epoch

    # ---- Model, optimizer, train state ------------------------------------------------------
    model_fn = lambda rngs: tasks.SequenceClassifier(bert, data.num_outputs,
                                                     config.model.classifier_dropout, rngs,
                                                     pooling=config.model.pooling)
    shapes = jax.eval_shape(lambda: init_params(model_fn, 0))
    if method.freeze_bottom > bert.num_layers:
        raise UserError(f"method.freeze_bottom={method.freeze_bottom} but the encoder has "
                        f"{bert.num_layers} layers")
    frozen = frozen_mask(shapes, method)
    scales = layer_scales(shapes, method.layer_decay, bert.num_layers) if method.layer_decay != 1.0 else None
    tx, lr = make_optimizer(config.optim, total, frozen, scales)
    target, shardings, graphdef = abstract_state(model_fn, tx, mesh)
    if method.l2sp_alpha > 0:  # the anchor w0 lives in the state, so a resumed run keeps it
        target["anchor"], shardings["anchor"] = target["params"]["encoder"], shardings["params"]["encoder"]
    ckpt = Checkpointer(workdir, config.checkpoint.every_steps, config.checkpoint.keep)
    best_ckpt = Checkpointer(workdir / "best", 0, 1)
    start = ckpt.latest_step()
    if start is None:
        params = init_params(model_fn, tc.seed)  # fresh head (and encoder, for --init none)
        if source.kind != "none":
            params["encoder"] = _checked_encoder(load_encoder(source), params["encoder"], source)
        state, _, _ = create_train_state(model_fn, tx, mesh, tc.seed, params=params)
        if method.l2sp_alpha > 0:
            state["anchor"] = jax.device_put(params["encoder"], shardings["anchor"])
        progress = {"next_step": 0, "best_step": None, "best": None}
        start = 0
    else:
        state, progress = ckpt.restore(start, target)
        assert progress["next_step"] == start, progress
    if jax.process_index() == 0:  # only now: a run refused above leaves no trace to resume
        # best/ is a run folder of its own: `--init WORKDIR/best` and `python -m models.hf export
        # --checkpoint WORKDIR/best` read the best dev checkpoint with its config and tokenizer.
        for folder in (workdir, workdir / "best"):
            (folder / "source.json").write_text(json.dumps(dataclasses.asdict(source), indent=1) + "\n")
            save_config(config, folder / "config.json")
        tokenizer.save(workdir / "best" / "tokenizer")

    batch_sharding = mesh_lib.batch_sharding(mesh)
    train_step = jax.jit(
        make_train_step(graphdef, tx, seed=tc.seed, grad_accum=tc.grad_accum,
                        regression=task.regression, label_smoothing=method.label_smoothing,
                        frozen=frozen, l2sp_alpha=method.l2sp_alpha),
        in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None), donate_argnums=0)
    eval_step = jax.jit(make_eval_step(graphdef), in_shardings=(shardings["params"], batch_sharding))

    def predict(params, split: str) -> np.ndarray:
        data_ = Batches(encoded[split], 0)
        logits = [_host(eval_step(params, mesh_lib.global_batch(data_.eval(i, eval_batch), mesh)))
                  for i in range(data_.num_eval_batches(eval_batch))]
        return np.concatenate(logits)[:data_.n]

    def evaluate(params, split: str) -> tuple[dict[str, float], np.ndarray]:
        logits = predict(params, split)
        labels = encoded[split]["labels"]
        if not splits[split].labelled:
            return {}, logits
        return {**task.evaluate(labels, task.predictions(logits)),
                "loss": _mean_loss(task, logits, labels)}, logits

    # ---- Loop -------------------------------------------------------------------------------
    metrics = MetricsWriter(workdir, config.wandb.project, config=config.to_dict(), after_step=start)
    stop = StopRequest()
    bar = tqdm(total=total, initial=start, disable=jax.process_index() != 0, unit="step",
               dynamic_ncols=True, desc=f"finetune {task.name}")
    window = LogWindow(start)
    step, stopping = start, False
    try:
        with jax.set_mesh(mesh), spmd.logical_axis_rules(mesh_lib.RULES):
            while step < total and not stopping:
                state, sums = train_step(state, mesh_lib.global_batch(train_data.train(step, tc.batch_size), mesh))
                step += 1
                window.add(step, sums)
                stopping = stop.should_stop(step)  # the same step on every process
                bar.update(1)

                if step % tc.log_every == 0 or step == total:
                    host, window_steps, steps_per_sec = window.take()
                    count = max(float(host["count"]), 1.0)
                    out = {"train/loss": float(host["loss"]) / count,
                           "train/l2sp": float(host["l2sp"]) / window_steps,
                           "train/grad_norm": float(host["grad_norm"]) / window_steps,
                           "train/lr": float(lr(step - 1)), "epoch": step / steps_per_epoch}
                    if not task.regression:
                        out["train/accuracy"] = float(host["correct"]) / count
                    if not math.isfinite(out["train/loss"]):
                        raise UserError(f"loss became {out['train/loss']} by step {step}; lower "
                                        f"optim.lr, then rerun to resume from the last good checkpoint")
                    if steps_per_sec:
                        out["perf/steps_per_sec"] = steps_per_sec
                        out["perf/examples_per_sec"] = steps_per_sec * tc.batch_size
                    metrics.write(step, out)
                    bar.set_postfix(loss=f"{out['train/loss']:.3f}", refresh=False)

                evaluated = step % eval_every == 0 or step == total
                if evaluated:
                    dev, _ = evaluate(state["params"], "dev")
                    metrics.write(step, {"epoch": step / steps_per_epoch,
                                         **{f"dev/{k}": v for k, v in dev.items()}})
                    if jax.process_index() == 0:  # tqdm.write prints even when the bar is disabled
                        bar.write(f"step {step} (epoch {step / steps_per_epoch:.2f}): " +
                                  ", ".join(f"dev/{k}={v:.4f}" for k, v in dev.items()))
                    if _better(dev[task.primary], progress["best"] and progress["best"][task.primary]):
                        progress["best_step"], progress["best"] = step, dev
                        best_ckpt.maybe_save(step, {"params": state["params"]}, {"dev": dev}, force=True)
                    window.restart_timer()
                progress["next_step"] = step
                ckpt.maybe_save(step, state, progress,
                                force=evaluated or step == total or stopping)
    finally:
        stop.restore()
        bar.close()
        ckpt.wait()
        best_ckpt.wait()
        metrics.close()
    if stopping and step < total:
        ckpt.close()
        best_ckpt.close()
        print(f"{stop.reason}: stopped at step {step}, checkpoint saved in {ckpt.directory}; "
              f"run the same command again to resume")
        return None

    # ---- The best dev checkpoint on dev and test ---------------------------------------------
    best_step = progress["best_step"]
    if best_step is None:
        raise UserError(f"dev {task.primary} was never finite; no checkpoint to report")
    params = best_ckpt.restore(best_step, {"params": target["params"]})[0]["params"]
    ckpt.close()
    best_ckpt.close()
    results = {"task": task.name, "metric": task.primary, "best_step": best_step,
               "best_epoch": best_step / steps_per_epoch, "steps": total,
               "steps_per_epoch": steps_per_epoch}
    with jax.set_mesh(mesh), spmd.logical_axis_rules(mesh_lib.RULES):
        for split in [s for s in splits if s != "train"]:
            scores, logits = evaluate(params, split)
            results[split] = scores or None  # None: labels hidden (GLUE test)
            if jax.process_index() == 0:
                _write_predictions(workdir / f"predictions_{split}.tsv", splits[split], task,
                                   data.label_names, task.predictions(logits))
    results["examples"] = {name: len(s) for name, s in splits.items()}
    results["source"] = {"init": source.init, "kind": source.kind, "path": source.path,
                         "step": source.step}
    results["encoder"] = dataclasses.asdict(bert)
    results["config"] = config.to_dict()
    if jax.process_index() == 0:
        (workdir / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    summary = ", ".join(f"{split}/{task.primary}={results[split][task.primary]:.4f}"
                        for split in ("dev", "test") if results.get(split))
    print(f"best dev checkpoint: step {best_step}; {summary}; see {workdir / 'results.json'}")
    return results


def _checked_encoder(loaded: dict, wanted: dict, source: Source) -> dict:
    """The source's encoder, checked against the model's shapes, as float32 numpy."""
    name = lambda path: "/".join(str(k) for k in _keys(path))
    flat = {name(p): x for p, x in jax.tree_util.tree_leaves_with_path(loaded)}

    def take(path, leaf):
        if name(path) not in flat:
            raise UserError(f"--init {source.init} has no encoder parameter {name(path)}")
        x = flat[name(path)]
        if tuple(x.shape) != tuple(leaf.shape):
            raise UserError(f"--init {source.init}: encoder parameter {name(path)} has shape "
                            f"{tuple(x.shape)}, the model needs {tuple(leaf.shape)}")
        return np.asarray(x, np.float32)
    return jax.tree_util.tree_map_with_path(take, wanted)


def _write_predictions(path: Path, split, task: tasks.Task, label_names, predictions) -> None:
    """index, prediction (label name or score) and label (empty where hidden), one row each."""
    lines = ["index\tprediction\tlabel"]
    name = (lambda v: f"{float(v):.9g}") if task.regression else (lambda v: label_names[int(v)])
    for i, p, y in zip(split.index, predictions, split.labels):
        lines.append(f"{int(i)}\t{name(p)}\t{name(y) if y >= 0 else ''}")
    path.write_text("\n".join(lines) + "\n")
