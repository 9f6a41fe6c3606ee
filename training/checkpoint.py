"""Orbax checkpoints in `<workdir>/checkpoints/<step>/`: the train state and the data-iterator state.

Saves are asynchronous (training goes on while the previous step is written); a save that dies
half-way leaves only an `*.orbax-checkpoint-tmp` folder, which restores never see.
"""

from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from training.errors import UserError


def _manager(directory: Path, keep: int = 1, read_only: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                           enable_async_checkpointing=True, read_only=read_only)
    return ocp.CheckpointManager(directory.absolute(), options=options, item_names=("state", "data"))


def _check_shapes(saved_tree, target_tree, where: Path) -> None:
    saved = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in
             jax.tree_util.tree_leaves_with_path(saved_tree) if hasattr(v, "shape")}
    for path, leaf in jax.tree_util.tree_leaves_with_path(target_tree):
        # Orbax stores dict keys as strings: layer 0 comes back as '0'.
        key = jax.tree_util.keystr(path).replace("[", "['").replace("]", "']").replace("''", "'")
        shape = saved.get(jax.tree_util.keystr(path), saved.get(key))
        if shape is None:
            raise UserError(f"checkpoint {where} has no {jax.tree_util.keystr(path)}: it was written "
                            f"by a different model; use another --workdir or the matching config")
        if shape != tuple(leaf.shape):
            raise UserError(f"checkpoint {where} holds {jax.tree_util.keystr(path)} of shape {shape} "
                            f"but this config's model needs {tuple(leaf.shape)}; use another "
                            f"--workdir or the config it was trained with")


class Checkpointer:
    """Save every `every_steps` steps (and on demand), keep the last `keep`, resume the latest."""

    def __init__(self, workdir: str | Path, every_steps: int, keep: int):
        self.directory = Path(workdir) / "checkpoints"
        self.every_steps = every_steps
        self._manager = _manager(self.directory, keep)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def maybe_save(self, step: int, state, data_state: dict, force: bool = False) -> bool:
        if not force and (self.every_steps <= 0 or step % self.every_steps):
            return False
        if step in self._manager.all_steps():
            return False
        return self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=True)

    def restore(self, step: int, abstract_state):
        """Restore into `abstract_state` (ShapeDtypeStructs with this run's shardings)."""
        _check_shapes(self._manager.item_metadata(step)["state"], abstract_state,
                      self.directory / str(step))
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
    # Restore only the params: optimizer state is never read (partial restore).
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item={"params": target}, restore_args={"params": restore_args}, partial_restore=True)))
    manager.close()
    return restored["state"]["params"], step
