"""Where a run's files live: a local path or a `gs://bucket/...` URL alike, through etils.epath.

    path = storage.as_path(text)                   # epath.Path: local (~ expanded) or gs://
    storage.check_writable(workdir, "--workdir")   # before any work: one line, within seconds

epath sends `gs://` through fsspec and gcsfs (TensorFlow is not installed); Orbax writes the
arrays of a checkpoint through TensorStore. Both take their endpoint and credentials from the
environment (the tests point them at a fake-gcs-server on loopback: tests/gcs.py).

Two readers open local files only: ArrayRecord (its open-source build has no gs:// file system)
and safetensors. One bucket file goes through a temporary local copy (`local_file`: read after
it is copied down, uploaded whole after it is written); folders that training reads are copied
into a local mirror (`mirror_path`, `download`; `upload` sends a locally written folder back).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable

import fsspec
from etils import epath

from infra.errors import UserError

SCHEMES = ("gs://",)

# No cached bucket listings: the processes of a run learn of each other's files (done markers,
# the manifest, the lease) by listing, and a cached listing would hide them forever. Every
# gs:// client of the process, epath's and Orbax's alike, is made after this (fsspec's defaults).
fsspec.config.conf.setdefault("gcs", {})["use_listings_cache"] = False
# How long the check before any work waits for the storage to answer: an unreachable endpoint
# must cost seconds, not the client libraries' minutes of retries.
CHECK_SECONDS = float(os.environ.get("PRETRAX_STORAGE_CHECK_SECONDS", 20))


def is_remote(path) -> bool:
    return str(path).startswith(SCHEMES)


def as_path(path) -> epath.Path:
    """`path` (str, pathlib or epath) as an epath.Path; `~` expanded in local paths."""
    path = epath.Path(path)
    return path if is_remote(path) else path.expanduser()


def absolute(path) -> epath.Path:
    """The absolute form of a local path; a bucket URL as it is (epath would prefix the cwd)."""
    path = as_path(path)
    return path if is_remote(path) else path.absolute()


def write_whole(path, data: bytes) -> None:
    """Write `path` so that a reader sees the old file or the new one, never half: locally
    through a temporary file renamed into place; on a bucket by one upload (an object appears
    whole when it is closed, and a bucket has no rename: gcsfs would copy and delete)."""
    path = as_path(path)
    if is_remote(path):
        path.write_bytes(data)
        return
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def move(source, dest) -> None:
    """Move a file or folder; on a bucket, where folders exist only through their objects, the
    destination's parent need not exist first."""
    source, dest = as_path(source), as_path(dest)
    if not is_remote(source):
        source.rename(dest)
        return
    # Stream each object, then delete: gcsfs's mv stalls on a folder. An empty object is
    # written, not read: gcsfs's read-ahead waits forever for its first byte.
    fs, src = _fs(source)
    dst = _fs(dest)[1]
    for rel, size in _files(fs, src, hidden=True).items():
        if not size:
            fs.pipe_file(f"{dst}/{rel}", b"")
            continue
        with fs.open(f"{src}/{rel}", "rb") as r, fs.open(f"{dst}/{rel}", "wb") as w:
            shutil.copyfileobj(r, w, 16 << 20)
    fs.rm(src, recursive=True)


# ---------------------------------------------------------------------------------------------
# The check before any work
# ---------------------------------------------------------------------------------------------

def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def _within(seconds: float, work: Callable[[], None]) -> BaseException | None:
    """Run `work` on a daemon thread; its exception, TimeoutError when it takes too long."""
    outcome: list[BaseException | None] = []

    def run():
        try:
            work()
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001  handed to the caller
            outcome.append(e)

    thread = threading.Thread(target=run, daemon=True, name="storage-check")
    thread.start()
    thread.join(seconds)
    return outcome[0] if outcome else TimeoutError(f"no answer within {seconds:.0f} s")


def _bucket_problem(bucket: str) -> str | None:
    fs, _ = _fs(f"gs://{bucket}")
    try:
        if fs.exists(bucket):
            return None
    except Exception as e:  # noqa: BLE001  no access at all: say what the client said
        return f"bucket gs://{bucket} cannot be read ({_first_line(e)}); check the credentials"
    return (f"bucket gs://{bucket} does not exist (or these credentials cannot see it); create "
            f"it (gcloud storage buckets create gs://{bucket}) or fix the name")


def _problem(folder: epath.Path, what: str) -> str | None:
    if is_remote(folder):
        bucket = str(folder)[len("gs://"):].split("/", 1)[0]
        problem = _bucket_problem(bucket)
        if problem:
            return f"{what} {folder}: {problem}"
    probe = folder / f".pretrax-write-check-{uuid.uuid4().hex[:8]}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except Exception as e:  # noqa: BLE001  any refusal of the storage is the user's to fix
        return (f"{what} {folder} cannot be written ({_first_line(e)}); pass a folder or bucket "
                f"this run may write to")
    return None


def check_writable(folder, what: str) -> epath.Path:
    """Make `folder` and write and delete a small file in it, before any work; a bucket that does
    not exist, a folder or bucket that refuses writes, or storage that does not answer within
    CHECK_SECONDS is one UserError line. Every process checks (each writes checkpoints) and all
    raise together. Returns the folder as an epath.Path."""
    from infra import collectives  # here: this module stays importable without JAX

    folder = as_path(folder)
    outcome: list[str | None] = []
    error = _within(CHECK_SECONDS, lambda: outcome.append(_problem(folder, what)))
    if isinstance(error, TimeoutError):
        problem = (f"{what} {folder}: the storage did not answer within {CHECK_SECONDS:.0f} s; "
                   f"check the bucket name, the network and the credentials")
    elif error is not None:
        raise error
    else:
        problem = outcome[0]
    if collectives.any_process(problem is not None):
        raise UserError(problem or f"{what} {folder} cannot be written on another process (see "
                                   f"its error line)")
    return folder


# ---------------------------------------------------------------------------------------------
# Local mirrors of bucket folders (for readers of local files only)
# ---------------------------------------------------------------------------------------------

def _fs(path):
    return fsspec.core.url_to_fs(str(path))


def mirror_path(remote) -> epath.Path:
    """The local folder that mirrors a bucket folder: `$PRETRAX_MIRROR_DIR/<bucket>/<path>`
    (default ~/.cache/pretrax/gs)."""
    root = os.environ.get("PRETRAX_MIRROR_DIR", "~/.cache/pretrax/gs")
    return as_path(root) / str(remote)[len("gs://"):]


def local_data_dir(data_dir, names=()) -> epath.Path:
    """`data.data_dir` for readers of local files: a local one as it is; a bucket's local mirror,
    with the sub-folders `names` (TFDS datasets such as `glue/cola`) copied down first. What a
    reader caches there (fetched wheels) stays local."""
    if not is_remote(data_dir):
        return as_path(data_dir)
    remote = str(data_dir).rstrip("/")
    local = mirror_path(remote)
    for name in names:
        download(f"{remote}/{name}", local / name)
    return local


def tfds_names(sources) -> list[str]:
    """The TFDS datasets (`NAME` of `tfds:NAME[:SPLIT]`) among source names."""
    return [s.split(":")[1] for s in sources if s.startswith("tfds:")]


def _files(fs, root: str, hidden: bool = False) -> dict[str, int]:
    """Relative name -> size of every file under `root` (none when it does not exist); hidden
    names (unfinished work) are left out unless `hidden`."""
    found = fs.find(root, detail=True) if fs.exists(root) else {}
    files = {}
    for name, info in found.items():
        rel = os.path.relpath(name, root)
        if info.get("type") != "directory" and (hidden or not any(p.startswith(".") for p in rel.split("/"))):
            files[rel] = int(info["size"])
    return files


@contextlib.contextmanager
def local_file(path: epath.Path, mode: str):
    """A local path for a reader or writer of local files only (ArrayRecord): `path` itself when
    it is local; for a bucket object, a temporary local file, copied down first (mode "r") or
    uploaded whole afterwards (mode "w")."""
    if not is_remote(path):
        yield path
        return
    fs, remote = _fs(path)
    with tempfile.TemporaryDirectory(prefix="pretrax-") as tmp:
        local = epath.Path(tmp) / path.name
        if mode == "r":
            _get(fs, remote, local, fs.size(remote))
        yield local
        if mode == "w":
            fs.put_file(str(local), remote)


def _get(fs, remote: str, local: epath.Path, size: int) -> None:
    """One object into `local`, through a hidden temporary name of this call's own: the
    processes of a host share its mirror and may copy the same file at once."""
    tmp = local.with_name(f".{local.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial")
    if size:
        fs.get_file(remote, str(tmp))
    else:  # not read: see move()
        tmp.write_bytes(b"")
    tmp.replace(local)


def download(remote, local, every_file: bool = False) -> int:
    """Copy the files of bucket folder `remote` that `local` lacks (or holds at another size;
    `every_file`: all, for a folder whose files change in place) into `local`; returns how many
    were copied. Prepared data needs no more: its folder names are digests of what is in them."""
    fs, root = _fs(remote)
    local = as_path(local)
    have = {} if every_file else _files(_fs(local)[0], str(local))
    remote_files = _files(fs, root)
    wanted = [rel for rel, size in remote_files.items() if have.get(rel) != size]
    for rel in wanted:
        (local / rel).parent.mkdir(parents=True, exist_ok=True)
        _get(fs, f"{root}/{rel}", local / rel, remote_files[rel])
    return len(wanted)


def upload(local, remote, replace: bool = False) -> int:
    """Copy the files of local folder `local` that bucket folder `remote` lacks (or holds at
    another size) into it; with `replace`, every file, and the bucket's files that `local` lacks
    are deleted (the bucket folder becomes a copy). Returns how many were copied."""
    fs, root = _fs(remote)
    local = as_path(local)
    have = _files(fs, root)
    mine = _files(_fs(local)[0], str(local))
    wanted = [rel for rel, size in mine.items() if replace or have.get(rel) != size]
    for rel in wanted:
        fs.put_file(str(local / rel), f"{root}/{rel}")
    for rel in set(have) - set(mine) if replace else ():
        fs.rm_file(f"{root}/{rel}")
    return len(wanted)
