"""Reading a run's checkpointed weights: `--init` of both trainers and `python -m models.hf export`.

Apart from the run's Checkpointer (training/checkpoint.py), which writes, heals and restores a
run's whole state: these only read the `params` of one complete step, never move anything.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from infra import storage
from infra.errors import UserError
from training import run_record
from training.checkpoint import _Damaged, _line, _manager, _params_metadata, _reading

def resolve_step_dir(src):
    """A workdir (its latest complete step) or one step folder, local or gs:// ->
    (checkpoints dir as an epath.Path, step)."""
    src = storage.as_path(src)
    if (src / "checkpoints").is_dir():
        src = src / "checkpoints"
    if src.name.isdigit() and (src / "state").is_dir():
        return src.parent, int(src.name)
    if src.is_dir():
        steps = ocp.utils.checkpoint_steps(storage.absolute(src))
        if steps:
            return src, max(steps)
    raise UserError(f"{src} holds no complete checkpoint; pass a workdir, a checkpoints/<step> "
                    f"folder, or a HuggingFace model folder")


def read_params(src, shardings=None) -> tuple[dict, int]:
    """The `params` subtree of a checkpoint as host numpy arrays (or on `shardings`), and its step.

    Read only: a damaged step is reported (one UserError line), never moved."""
    directory, step = resolve_step_dir(src)
    where = directory / str(step)
    manager = _manager(directory, read_only=True)
    try:
        meta = _params_metadata(manager, step, where)
        if shardings is None:
            target = jax.tree.map(lambda m: np.empty(m.shape, m.dtype), meta)
            restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
        else:
            target = jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s),
                                  meta, shardings)
            restore_args = ocp.checkpoint_utils.construct_restore_args(target)
        # Restore only the params: the optimizer state is never read.
        with _reading(where):
            restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                item={"params": target}, restore_args={"params": restore_args},
                partial_restore=True)))
    except _Damaged as e:
        raise UserError(f"checkpoint {where} cannot be read ({e}); pass one of its older "
                        f"checkpoints/<step> folders, or move this one out of {directory}/") from e
    finally:
        manager.close()
    # Orbax gives the list indices of an `nnx.List` ('0', '1', ...) back as strings.
    return nnx.restore_int_paths(restored["state"]["params"]), step


def load_checkpoint_params(src) -> tuple[dict, dict, object, str]:
    """A run's params, its `model` config group, its tokenizer folder and its kind.

    SRC is a pretraining or fine-tuning workdir or one of its `checkpoints/<step>` folders.
    """
    directory, _ = resolve_step_dir(src)
    workdir = directory.parent
    config_path = workdir / "config.json"
    if not config_path.is_file():
        raise UserError(f"{config_path} not found: pass a workdir written by python -m pretrain "
                        f"or python -m finetune (or one of its checkpoints/<step> folders)")
    try:
        config, record = run_record.read(workdir)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{config_path} is not valid JSON ({_line(e)}); restore it from the run "
                        f"that wrote it") from e
    params, _ = read_params(src)
    tokenizer = workdir / "tokenizer"
    return params, config["model"], tokenizer if tokenizer.is_dir() else None, record["trainer"]
