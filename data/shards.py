"""A folder that several processes prepare together, trusted only once it is committed.

The work is cut into named units (shards, the tokenizer). Process i of N does units i, i + N, ...
and after a unit's files writes its done marker (`done/<unit>.json`); process 0 waits for every
marker, then writes the manifest last. Nothing is renamed (a bucket has no atomic rename), a
rerun after a crash redoes only the units without a marker, and a reader trusts a folder only
once its manifest exists.
"""

from __future__ import annotations

import json
import time
from typing import NamedTuple

from etils import epath

from infra import storage

POLL_SECONDS = (0.05, 2.0)  # how often a process looks for the others' shards: first, at most


class Share(NamedTuple):
    """This process's place in a run: it prepares shards index, index + count, ..."""
    index: int = 0
    count: int = 1

    def of(self, items: list) -> list:
        return items[self.index::self.count]


def write_json(path: epath.Path, obj) -> None:
    """Whole or not at all, locally and on a bucket."""
    storage.write_whole(path, (json.dumps(obj, indent=1) + "\n").encode())


def done_path(folder: epath.Path, name: str) -> epath.Path:
    return folder / "done" / f"{name}.json"


def mark_done(folder: epath.Path, name: str, content: dict) -> None:
    """Says that the files of one unit of work (a shard, the tokenizer) are complete: written
    after them, so a rerun after a crash trusts what has a marker and redoes the rest."""
    done_path(folder, name).parent.mkdir(parents=True, exist_ok=True)
    write_json(done_path(folder, name), content)


def absent(paths: list[epath.Path]) -> list[epath.Path]:
    """The paths that do not exist yet, with one listing per folder (one request on a bucket,
    however many shards)."""
    present = {}
    for folder in {p.parent for p in paths}:
        present[folder] = {c.name for c in folder.iterdir()} if folder.exists() else set()
    return [p for p in paths if p.name not in present[p.parent]]


def wait_for(paths: list[epath.Path], what: str) -> None:
    """Until every path exists (written by other processes of the run). No time limit: the
    launcher (or jax.distributed) stops the run when a process fails."""
    delay, since, told = POLL_SECONDS[0], time.monotonic(), False
    missing = absent(paths)
    while missing:
        if not told and time.monotonic() - since > 60:
            print(f"prepare: waiting for {what} ({len(missing)} of {len(paths)} still missing, "
                  f"e.g. {missing[0]})", flush=True)
            told = True
        time.sleep(delay)
        delay = min(delay * 2, POLL_SECONDS[1])
        missing = absent(missing)


def commit(folder: epath.Path, share: Share, files: dict[str, dict]) -> None:
    """Writes the manifest files (the last one is what makes the folder trusted) on process 0;
    the other processes wait until the last exists."""
    if share.index == 0:
        for name, content in files.items():
            write_json(folder / name, content)
    else:
        wait_for([folder / list(files)[-1]], f"process 0 to commit {folder}")


def shards_of_all(folder: epath.Path, names: list[str]) -> list[dict]:
    """The counts of every shard once every process has marked its own done."""
    paths = [done_path(folder, n) for n in names]
    wait_for(paths, f"the other processes' shards of {folder}")
    return [json.loads(p.read_text()) for p in paths]


def todo(folder: epath.Path, names: list[str], share: Share) -> list[str]:
    """This process's shards that no earlier (interrupted) run has finished."""
    mine = share.of(names)
    missing = set(absent([done_path(folder, n) for n in mine]))
    todo = [n for n in mine if done_path(folder, n) in missing]
    if len(todo) < len(mine):
        print(f"prepare: {len(mine) - len(todo)} of {len(mine)} shards of {folder} were done "
              f"by an earlier run; preparing the other {len(todo)}", flush=True)
    return todo
