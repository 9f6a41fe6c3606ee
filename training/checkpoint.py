"""Orbax checkpoints in `<workdir>/checkpoints/<step>/`: the train state and the data-iterator state.

Saves are asynchronous (training goes on while the previous step is written); a save that dies
half-way leaves only an `*.orbax-checkpoint-tmp` folder, which restores never see.

Saves happen every `every_steps` steps and, when `every_seconds` > 0, once that much wall-clock time
has passed since the last save. Every process must save the same steps, so the clock is process
0's: it is read every `poll_every` steps and broadcast to the others (one small collective).

Restores heal: `restore_latest` reports a step whose files cannot be read (arrays missing or cut
short, lost metadata, a corrupt data-iterator JSON) in one line, moves it to
`<workdir>/checkpoints_quarantine/<step>` (never deletes it) and resumes from the newest step that
restores, the same on every process. Only such evidence moves a step: any other error while
restoring (a KeyError from code that changed) stops the run with one line and moves nothing. Storage errors while saving (a full disk, permissions, a
bucket), also those Orbax's background thread meets after training has moved on, become one
UserError line naming the step and the folder (`maybe_save`, `check`, `wait`); the steps already
written stay restorable. Reading one step's weights (`--init`, export) is
training/checkpoint_reader.py's.
"""

import contextlib
import json
import logging
import re
import sys
import time
import traceback

import jax
import numpy as np
import orbax.checkpoint as ocp

from models.layers import is_stacked
from training import collectives, storage
from training.errors import UserError


# What Orbax 0.12 logs from its threads when a background save fails. It hands the error on
# too, and we raise that (one UserError line for a storage error, else with its traceback).
_ORBAX_SAVE_FAILURES = ("_SignalingThread.run() raised an exception", "background save thread",
                        "Save Finalize thread", "Failed to write metadata")


def _no_orbax_tracebacks(record: logging.LogRecord) -> bool:
    """Drops Orbax's log records of a failed background save, and the tracebacks of its others."""
    if "orbax" not in record.pathname:
        return True
    if record.levelno >= logging.ERROR and any(s in record.getMessage() for s in _ORBAX_SAVE_FAILURES):
        return False
    record.exc_info, record.exc_text = None, None
    return True


def _no_orbax_sibling_failures(record: logging.LogRecord) -> bool:
    """When one write of a save fails, its sibling writes fail the same way and asyncio logs
    each ("Task/Future exception was never retrieved"); the first is raised as our line."""
    exc = record.exc_info[1] if record.exc_info else None
    if exc is None or "never retrieved" not in record.getMessage() or not storage_reason(exc):
        return True
    frames = traceback.extract_tb(exc.__traceback__)
    return not ("orbax" in record.getMessage() or any("orbax" in f.filename for f in frames))


logging.getLogger("absl").addFilter(_no_orbax_tracebacks)
logging.getLogger("asyncio").addFilter(_no_orbax_sibling_failures)


def _manager(directory, keep: int = 1, read_only: bool = False) -> ocp.CheckpointManager:
    # cleanup_tmp_directories: a rerun removes the unfinished folders of a killed save.
    options = ocp.CheckpointManagerOptions(max_to_keep=None if read_only else keep,
                                           create=not read_only, read_only=read_only,
                                           cleanup_tmp_directories=not read_only,
                                           enable_async_checkpointing=True)
    # Standard and PyTree handlers share one on-disk format; reading uses PyTree for its
    # partial restore.
    state_handler = ocp.PyTreeCheckpointHandler() if read_only else ocp.StandardCheckpointHandler()
    handlers = {"state": state_handler, "data": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(storage.absolute(directory), options=options, item_handlers=handlers)


# ---------------------------------------------------------------------------------------------
# What an error means: the step's files are damaged, or the storage refused
# ---------------------------------------------------------------------------------------------

# TensorStore raises ValueError("CODE: ...") with an absl status code. These codes say the
# files of a step are missing or cut short (FAILED_PRECONDITION: a JSON file it cannot parse).
# Transient codes (UNAVAILABLE, DEADLINE_EXCEEDED) and PERMISSION_DENIED are not damage: moving
# a good checkpoint aside because a bucket hiccupped would lose it for the rerun.
_DAMAGE_CODES = ("DATA_LOSS", "NOT_FOUND", "OUT_OF_RANGE", "FAILED_PRECONDITION")
# Codes of the storage refusing or failing (INVALID_ARGUMENT and UNIMPLEMENTED are bugs).
_STORAGE_CODES = _DAMAGE_CODES + ("CANCELLED", "UNKNOWN", "DEADLINE_EXCEEDED", "ALREADY_EXISTS",
                                  "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "ABORTED",
                                  "INTERNAL", "UNAVAILABLE", "UNAUTHENTICATED")
_STATUS = re.compile(r"([A-Z][A-Z_]+): ")


def _status(e: BaseException) -> str | None:
    """The absl status code a TensorStore error starts with, or None."""
    match = _STATUS.match(str(e)) if isinstance(e, (ValueError, RuntimeError)) else None
    return match.group(1) if match else None


class _Damaged(Exception):
    """The files of one step cannot be read; an older step may still restore."""


def _line(e: BaseException, limit: int = 300) -> str:
    text = str(e).strip()
    text = text.splitlines()[0] if text else type(e).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def damage_reason(e: BaseException) -> str | None:
    """Why `e` means the checkpoint's own files are damaged, or None."""
    if isinstance(e, (json.JSONDecodeError, UnicodeDecodeError)):
        return f"corrupt JSON: {_line(e)}"
    if isinstance(e, (FileNotFoundError, NotADirectoryError, IsADirectoryError)):
        return f"a file is missing: {_line(e)}"
    if _status(e) in _DAMAGE_CODES:
        return _line(e)
    return None


def storage_reason(e: BaseException) -> str | None:
    """One line for an error of the storage itself (disk full, permissions, a bucket), or None
    for anything else (a bug, which keeps its traceback)."""
    if isinstance(e, OSError):
        return _line(e)
    if _status(e) in _STORAGE_CODES:
        return _line(e)
    if type(e).__module__.split(".")[0] in ("google", "gcsfs", "fsspec"):  # bucket clients
        return _line(e)
    return damage_reason(e)


def _closed_loop(exc: BaseException) -> bool:
    return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


def _quiet_closed_loop() -> None:
    """When one read or write fails, TensorStore's other pending operations call back into
    Orbax's event loop, closed by then, and Python prints each RuntimeError as a traceback (as
    unraisable, or through sys.excepthook from TensorStore's threads): drop just that one."""
    previous, previous_excepthook = sys.unraisablehook, sys.excepthook
    if getattr(previous, "pretrax_quiet", False):
        return

    def hook(unraisable):
        if not _closed_loop(unraisable.exc_value):
            previous(unraisable)

    def excepthook(kind, value, tb):
        if not _closed_loop(value):
            previous_excepthook(kind, value, tb)

    hook.pretrax_quiet = True
    sys.unraisablehook, sys.excepthook = hook, excepthook


@contextlib.contextmanager
def _reading(where):
    """Errors while reading one step: _Damaged for broken files, one UserError line when the
    storage refuses (no healing then), anything else as it is."""
    _quiet_closed_loop()
    try:
        yield
    except (_Damaged, UserError):
        raise
    except Exception as e:  # noqa: BLE001  sorted below; unknown errors are re-raised
        reason = damage_reason(e)
        if reason:
            raise _Damaged(reason) from e
        reason = storage_reason(e)
        if reason:
            raise UserError(f"cannot read checkpoint {where}: {reason}; check that the folder is "
                            f"readable, then run again") from e
        raise


def _params_metadata(manager: ocp.CheckpointManager, step: int, where):
    with _reading(where):
        meta = manager.item_metadata(step)
        try:
            params = meta["state"]["params"]
        except (KeyError, TypeError):  # state/_METADATA gone: Orbax gives None
            params = None
    if params is None:
        # Damage only on evidence: with the file there, this is code or a library reading it.
        if not (where / "state" / "_METADATA").exists():
            raise _Damaged("its array metadata (state/_METADATA) is missing")
        raise UserError(f"checkpoint {where} has state/_METADATA but no params in what Orbax "
                        f"reads from it (written by another version of the code?); it was left "
                        f"in place: use the code that wrote it, or another --workdir")
    return params


def _flat_shapes(tree) -> dict[str, tuple]:
    # Orbax stores every dict key as a string (layer 0 comes back as '0'): compare by name.
    return {jax.tree_util.keystr(p, simple=True, separator="/"): tuple(v.shape)
            for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def _check_params_shapes(saved_params, target_params, where) -> None:
    if is_stacked(saved_params) != is_stacked(target_params):
        layout = lambda tree: "scanned" if is_stacked(tree) else "unrolled"
        raise UserError(f"checkpoint {where} holds the {layout(saved_params)} layer stack but this "
                        f"config's model is {layout(target_params)}; resume with "
                        f"--config.model.scan_layers={str(is_stacked(saved_params)).lower()}, or "
                        f"start another --workdir with --init from it (which converts)")
    saved, wanted = _flat_shapes(saved_params), _flat_shapes(target_params)
    for name, shape in wanted.items():
        if name not in saved:
            raise UserError(f"checkpoint {where} has no parameter {name}: it was written by a "
                            f"different model; use another --workdir or the matching config")
        if saved[name] != shape:
            raise UserError(f"checkpoint {where} holds {name} of shape {saved[name]} but this "
                            f"config's model needs {shape}; use another --workdir or the config "
                            f"it was trained with")


# ---------------------------------------------------------------------------------------------
# The run's checkpoints
# ---------------------------------------------------------------------------------------------

class Checkpointer:
    """Save every `every_steps` steps, every `every_seconds` seconds and on demand; keep the last
    `keep`; resume the newest step that restores.

    On every process, at the same steps: `restore_latest` once at the start, `maybe_save` after
    every step, `check` at log steps (surfaces a failed background save), `wait` and `close` at
    the end."""

    def __init__(self, workdir, every_steps: int, keep: int, every_seconds: float = 0.0,
                 poll_every: int = 1):
        self.directory = storage.as_path(workdir) / "checkpoints"
        self.quarantine = self.directory.with_name(self.directory.name + "_quarantine")
        self.every_steps = every_steps
        self.every_seconds = every_seconds
        self.poll_every = max(1, poll_every)
        self._last_save = time.monotonic()
        self._pending: int | None = None  # the step of a background save not known to be done
        self._failed = False  # a save failed and was reported
        self._manager = _manager(self.directory, keep)  # makes the folder at the first save
        _quiet_closed_loop()  # a failed save's pending writes call back into a closed loop

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        # A failing multi-process run leaves at once (training/distributed.py: leave): Orbax's
        # close would wait for peers that may be gone.
        if exc_type is None or jax.process_count() == 1:
            self.close()  # also when a step fails: Orbax's background threads end with it

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    # ---- restoring -------------------------------------------------------------------------

    def _read(self, step: int, abstract_state):
        """(state, data_state) of `step`; _Damaged when its files cannot be read.

        Reads through the item handlers, not the manager: the manager's restore ends in a
        barrier, which a process whose read failed would never reach."""
        where = self.directory / str(step)
        _check_params_shapes(_params_metadata(self._manager, step, where),
                             abstract_state["params"], where)
        folder = storage.absolute(where)
        with _reading(where):
            data_state = ocp.JsonCheckpointHandler().restore(folder / "data")
            handler = ocp.StandardCheckpointHandler()
            try:
                state = handler.restore(folder / "state", args=ocp.args.StandardRestore(abstract_state))
            finally:
                handler.close()
        if not isinstance(data_state, dict):
            raise _Damaged("its data-iterator state is not a JSON object")
        return state, data_state

    def restore(self, step: int, abstract_state):
        """Restore `step` into `abstract_state` (ShapeDtypeStructs with this run's shardings)."""
        try:
            return self._read(step, abstract_state)
        except _Damaged as e:
            raise UserError(f"checkpoint {self.directory / str(step)} cannot be read ({e}); move "
                            f"that folder into {self.quarantine}/ and run again to resume from "
                            f"the step before") from e

    def restore_latest(self, abstract_state):
        """(step, state, data_state) of the newest step that restores, or None when there is no
        checkpoint. A step that cannot be read is reported and moved to `self.quarantine`; when
        none restores, a UserError says so. Every process must call it, and all agree."""
        moved = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            reason, refusal = None, None
            try:
                state, data_state = self._read(step, abstract_state)
            except _Damaged as e:
                reason = str(e)
            except UserError as e:  # another model's checkpoint, or no access: not damage
                refusal = e
            except Exception as e:  # noqa: BLE001  no evidence of damage (a code or library change?)
                refusal = UserError(f"restoring checkpoint {self.directory / str(step)} failed "
                                    f"with {type(e).__name__}: {_line(e, 200)}; its files look "
                                    f"intact, so every checkpoint was left in place: fix the "
                                    f"cause (a code or library change?) and run again")
                refusal.__cause__ = e
            if collectives.any_process(refusal is not None):
                raise refusal or UserError(f"checkpoint {self.directory / str(step)} cannot be "
                                           f"restored on another process (see its error line)")
            if not collectives.any_process(reason is not None):
                return step, state, data_state
            moved.append(self._move_aside(step, reason))
        if moved:
            raise UserError(f"no checkpoint in {self.directory} can be read (moved to "
                            f"{', '.join(map(str, moved))}); start afresh with another --workdir, "
                            f"or move a step back once it is repaired")
        return None

    def _move_aside(self, step: int, reason: str | None):
        """Process 0 moves the step folder into the quarantine; the others wait for it."""
        source = self.directory / str(step)
        dest, n = self.quarantine / str(step), 0
        while dest.exists():
            n += 1
            dest = self.quarantine / f"{step}-{n}"
        collectives.barrier(f"pretrax_quarantine_{step}_named")  # all named it before the move
        if jax.process_index() == 0:
            self.quarantine.mkdir(parents=True, exist_ok=True)
            storage.move(source, dest)
        collectives.barrier(f"pretrax_quarantine_{step}")
        self._manager.reload()  # the manager lists steps from its cache: forget the moved one
        if jax.process_index() == 0:
            print(f"warning: checkpoint {source} cannot be read ({reason or 'on another process'}); "
                  f"moved it to {dest}, trying the one before", file=sys.stderr, flush=True)
        elif reason:
            print(f"warning: checkpoint {source} cannot be read here ({reason})", file=sys.stderr,
                  flush=True)
        return dest

    # ---- saving ----------------------------------------------------------------------------

    def _clock_due(self, step: int) -> bool:
        """Process 0's clock says a save is due; the same answer on every process."""
        if self.every_seconds <= 0 or step % self.poll_every:
            return False
        due = time.monotonic() - self._last_save >= self.every_seconds
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            due = bool(multihost_utils.broadcast_one_to_all(np.int32(due)))
        return due

    @contextlib.contextmanager
    def _saving(self, step: int | None):
        """A storage error while saving `step` -> one UserError line; others as they are."""
        try:
            yield
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001  sorted below; unknown errors are re-raised
            reason = storage_reason(e)
            if not reason:
                raise
            try:  # the steps on disk: the failed save's may have dropped some from the cache
                self._manager.reload()
                done = [s for s in self._manager.all_steps() if s != step]
                resume = f"step {max(done)}" if done else "the start (no complete checkpoint yet)"
            except Exception:  # noqa: BLE001  the storage may refuse this too
                resume = "the last complete checkpoint"
            what = "a checkpoint" if step is None else f"checkpoint step {step}"
            self._failed = True
            raise UserError(f"saving {what} to {self.directory} failed: {reason}; "
                            f"free space or fix access to the folder, then run again to resume "
                            f"from {resume}") from e

    def maybe_save(self, step: int, state, data_state: dict, force: bool = False) -> bool:
        """Save if due (or `force`). A storage error, of this save or of the previous one still
        written in the background, raises one UserError line."""
        due = force or (self.every_steps > 0 and step % self.every_steps == 0)
        if not self._clock_due(step) and not due:
            return False
        if step in self._manager.all_steps():
            return False
        self.wait()  # Orbax waits for the previous save here anyway; this names its step
        self._last_save = time.monotonic()
        with self._saving(step):
            saved = self._manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=True)
        self._pending = step if saved else None
        return saved

    def check(self) -> None:
        """Without blocking: raise the UserError of a background save that has failed. Call on
        every process at the same steps (one small collective in multi-process runs)."""
        failure = None
        if self._pending is not None and not self._manager.is_saving_in_progress():
            try:
                self.wait()
            except UserError as e:
                failure = e
        if collectives.any_process(failure is not None):
            raise failure or UserError(f"saving a checkpoint to {self.directory} failed on another "
                                       f"process (see its error line); fix the storage, then run "
                                       f"again to resume from the last complete checkpoint")

    def wait(self) -> None:
        """Block until the pending save is written; a failed one raises one UserError line."""
        step, self._pending = self._pending, None
        with self._saving(step):
            self._manager.wait_until_finished()

    def close(self) -> None:
        step, self._pending = self._pending, None
        reported = self._failed
        try:
            with self._saving(step):
                self._manager.close()
        except UserError:
            _finish_closing(self._manager)
            if not reported:
                raise
            # Orbax reports the failed save again as it closes; it was reported once already.


def _finish_closing(manager: ocp.CheckpointManager) -> None:
    """Orbax's close stops at a failed save's error before closing its checkpointer and metadata
    stores, whose threads may still be writing that save: close them too, so that nothing is
    written after `close` returns (a late write could still commit the step once the storage
    recovers, after the run said to resume from the one before)."""
    commits = getattr(getattr(manager._checkpointer, "_async_manager", None), "_commit_futures", None)
    for write in commits or ():  # Orbax stops waiting at the first failed item; wait for them all
        with contextlib.suppress(Exception):
            write.result()
    for part in ("_checkpointer", "_non_blocking_metadata_store", "_blocking_metadata_store",
                 "_checkpoint_deleter"):
        with contextlib.suppress(Exception):  # the same failure again, already reported
            getattr(manager, part).close()
