"""Orbax checkpoints in `<workdir>/checkpoints/<step>/`: the train state and the data-iterator state.

Saves are asynchronous (training goes on while the previous step is written); a save that dies
half-way leaves only an `*.orbax-checkpoint-tmp` folder, which restores never see.

Saves happen every `every_steps` steps and, when `every_seconds` > 0, once that much wall-clock time
has passed since the last save. Every process must save the same steps, so the clock is process
0's: it is read every `poll_every` steps and broadcast to the others (one small collective).
"""

import json
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from training.errors import UserError


def _manager(directory: Path, keep: int = 1, read_only: bool = False) -> ocp.CheckpointManager:
    # cleanup_tmp_directories: a rerun removes the unfinished folders of a killed save.
    options = ocp.CheckpointManagerOptions(max_to_keep=None if read_only else keep,
                                           create=not read_only, read_only=read_only,
                                           cleanup_tmp_directories=not read_only,
                                           enable_async_checkpointing=True)
    # Standard and PyTree handlers share one on-disk format; reading uses PyTree for its
    # partial restore.
    state_handler = ocp.PyTreeCheckpointHandler() if read_only else ocp.StandardCheckpointHandler()
    handlers = {"state": state_handler, "data": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(directory.absolute(), options=options, item_handlers=handlers)


def _flat_shapes(tree) -> dict[str, tuple]:
    # Orbax stores every dict key as a string (layer 0 comes back as '0'): compare by name.
    name = lambda path: "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
    return {name(p): tuple(v.shape) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def _check_params_shapes(saved_params, target_params, where: Path) -> None:
    saved, wanted = _flat_shapes(saved_params), _flat_shapes(target_params)
    for name, shape in wanted.items():
        if name not in saved:
            raise UserError(f"checkpoint {where} has no parameter {name}: it was written by a "
                            f"different model; use another --workdir or the matching config")
        if saved[name] != shape:
            raise UserError(f"checkpoint {where} holds {name} of shape {saved[name]} but this "
                            f"config's model needs {shape}; use another --workdir or the config "
                            f"it was trained with")


class Checkpointer:
    """Save every `every_steps` steps, every `every_seconds` seconds and on demand; keep the last
    `keep`; resume the latest. Call `maybe_save` on every process after every step."""

    def __init__(self, workdir: str | Path, every_steps: int, keep: int, every_seconds: float = 0.0,
                 poll_every: int = 1):
        self.directory = Path(workdir) / "checkpoints"
        self.every_steps = every_steps
        self.every_seconds = every_seconds
        self.poll_every = max(1, poll_every)
        self._last_save = time.monotonic()
        self._manager = _manager(self.directory, keep)

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()  # also when a step fails: Orbax's background threads end with it

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def _clock_due(self, step: int) -> bool:
        """Process 0's clock says a save is due; the same answer on every process."""
        if self.every_seconds <= 0 or step % self.poll_every:
            return False
        due = time.monotonic() - self._last_save >= self.every_seconds
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            due = bool(multihost_utils.broadcast_one_to_all(np.int32(due)))
        return due

    def maybe_save(self, step: int, state, data_state: dict, force: bool = False) -> bool:
        due = force or (self.every_steps > 0 and step % self.every_steps == 0)
        if not self._clock_due(step) and not due:
            return False
        if step in self._manager.all_steps():
            return False
        self._last_save = time.monotonic()
        return self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=True)

    def restore(self, step: int, abstract_state):
        """Restore into `abstract_state` (ShapeDtypeStructs with this run's shardings)."""
        _check_params_shapes(self._manager.item_metadata(step)["state"]["params"],
                             abstract_state["params"], self.directory / str(step))
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return restored["state"], restored["data"]

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def resolve_step_dir(src: str | Path) -> tuple[Path, int]:
    """A workdir (its latest complete step) or one step folder -> (checkpoints dir, step)."""
    src = Path(src)
    if (src / "checkpoints").is_dir():
        src = src / "checkpoints"
    if src.name.isdigit() and (src / "state").is_dir():
        return src.parent, int(src.name)
    if src.is_dir():
        steps = ocp.utils.checkpoint_steps(src.absolute())
        if steps:
            return src, max(steps)
    raise UserError(f"{src} holds no complete checkpoint; pass a workdir, a checkpoints/<step> "
                    f"folder, or a HuggingFace model folder")


def read_params(src: str | Path, shardings=None) -> tuple[dict, int]:
    """The `params` subtree of a checkpoint as host numpy arrays (or on `shardings`), and its step."""
    directory, step = resolve_step_dir(src)
    manager = _manager(directory, read_only=True)
    meta = manager.item_metadata(step)["state"]["params"]
    if shardings is None:
        target = jax.tree.map(lambda m: np.empty(m.shape, m.dtype), meta)
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
    else:
        target = jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s),
                              meta, shardings)
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    # Restore only the params: the optimizer state is never read.
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item={"params": target}, restore_args={"params": restore_args}, partial_restore=True)))
    manager.close()
    return _int_keys(restored["state"]["params"]), step


def _int_keys(tree):
    """Orbax returns list indices of an `nnx.List` ('0', '1', ...) as strings; make them ints."""
    if not isinstance(tree, dict):
        return tree
    return {int(k) if isinstance(k, str) and k.isdigit() else k: _int_keys(v) for k, v in tree.items()}


def load_checkpoint_params(src: str | Path) -> tuple[dict, dict, Path | None, str]:
    """A run's params, its `model` config group, its tokenizer folder and its kind.

    SRC is a pretraining or fine-tuning workdir or one of its `checkpoints/<step>` folders.
    """
    directory, _ = resolve_step_dir(src)
    workdir = directory.parent
    config_path = workdir / "config.json"
    if not config_path.is_file():
        raise UserError(f"{config_path} not found: pass a workdir written by python -m pretrain "
                        f"or python -m finetune (or one of its checkpoints/<step> folders)")
    config = json.loads(config_path.read_text())
    params, _ = read_params(src)
    tokenizer = workdir / "tokenizer"
    return params, config["model"], tokenizer if tokenizer.is_dir() else None, \
        "finetune" if "task" in config.get("data", {}) else "pretrain"
