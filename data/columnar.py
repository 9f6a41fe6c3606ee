"""Text corpora stored as Arrow columns: Parquet shards and Hugging Face `datasets` folders.

  parquet:GLOB[:COLUMN]        Parquet files matching GLOB (a local path or gs://...; `**` recurses),
                               in sorted order; the document is COLUMN (default `text`).
  hf:PATH[:SPLIT][:COLUMN]     a dataset saved with `datasets`' save_to_disk (a Dataset folder, or
                               a DatasetDict folder and its SPLIT, default `train`), or a hub
                               dataset already in the local `datasets` cache (PATH = `owner/name`).
                               Read with pyarrow alone: `datasets` is not needed at run time, and
                               nothing goes to the network.

Both are read a record batch at a time (never a whole file in memory): the row count of every
piece (a Parquet row group, an Arrow file) is known up front, so any range of documents reads
only the pieces it overlaps, and the processes of a run each read only their shards' rows.
Broken rows are documents like the other sources' bad lines: a null or empty text is an empty
document (preparation drops and counts it), non-UTF-8 bytes are replaced by U+FFFD (counted).
Every problem the user can fix (no files, not Parquet, no such column or split) is a DataError
line raised when the source is opened, before anything is written.
"""

from __future__ import annotations

import bisect
import json
import os
from collections.abc import Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from data.wheels import DataError

DEFAULT_COLUMN = "text"
BATCH_ROWS = 1024  # rows per record batch read from a Parquet row group


def split_spec(spec: str) -> tuple[str, list[str]]:
    """(the path, the `:`-separated fields after it); a `gs://` path keeps its own colon."""
    scheme = "gs://" if spec.startswith("gs://") else ""
    path, *fields = spec[len(scheme):].split(":")
    return scheme + path if scheme else os.path.expanduser(path), fields


class _Columnar:
    """Documents of one text column over pieces whose row counts are known; `_batches(piece)`
    yields the piece's column as pyarrow arrays, in order."""

    def __init__(self, pieces: list, rows: list[int], fingerprint: list[str]):
        self._pieces = pieces
        self._starts = [0]
        for n in rows:
            self._starts.append(self._starts[-1] + n)
        self.fingerprint = "\n".join(fingerprint)  # stands for the contents in cache keys
        self._cursor = None  # (piece, row offset, batch, the batches after it) of the last read

    def __len__(self) -> int:
        return self._starts[-1]

    def read(self, start: int, stop: int) -> list[str]:
        stop = min(stop, len(self))
        docs: list[str] = []
        i = bisect.bisect_right(self._starts, start) - 1
        while i < len(self._pieces) and self._starts[i] < stop:
            offset, column, batches = self._resume(i, start)
            while column is not None or (column := next(batches, None)) is not None:
                lo, hi = max(start - offset, 0), min(stop - offset, len(column))
                if lo < hi:
                    docs.extend(_texts(column.slice(lo, hi - lo)))
                if offset + len(column) > stop:  # the rest is the next range's: keep the place
                    self._cursor = (i, offset, column, batches)
                    return docs
                offset, column = offset + len(column), None
            i += 1
        return docs

    def _resume(self, i: int, start: int):
        """(row offset, current batch or None, the batches after it) of piece i: where the last
        read stopped when `start` is at or after it (ranges read in order decode each batch
        once), else the piece's beginning."""
        if self._cursor is not None and self._cursor[0] == i and self._cursor[1] <= start:
            return self._cursor[1:]
        return self._starts[i], None, iter(self._batches(self._pieces[i]))

    def _batches(self, piece) -> Iterator[pa.Array]:
        raise NotImplementedError


def _texts(column: pa.Array) -> list[str]:
    """A string or binary column as documents: null is empty; bad UTF-8 becomes U+FFFD."""
    binary = pa.large_binary() if pa.types.is_large_string(column.type) else pa.binary()
    values = column.cast(binary) if pa.types.is_string(column.type) or \
        pa.types.is_large_string(column.type) else column
    return ["" if v is None else v.decode("utf-8", errors="replace")
            for v in values.to_pylist()]


def _check_text_column(where: str, schema: pa.Schema, column: str) -> None:
    if column not in schema.names:
        raise DataError(f"{where} has no column {column!r}; its columns are "
                        f"{', '.join(schema.names)}: name the text one after the last ':' of "
                        f"data.source")
    kind = schema.field(column).type
    if not any(check(kind) for check in (pa.types.is_string, pa.types.is_large_string,
                                         pa.types.is_binary, pa.types.is_large_binary)):
        raise DataError(f"{where}: column {column!r} holds {kind}, not text; name a string column "
                        f"(columns: {', '.join(schema.names)})")


# ---------------------------------------------------------------------------------------------
# Parquet
# ---------------------------------------------------------------------------------------------

class ParquetDocuments(_Columnar):
    """`parquet:GLOB[:COLUMN]`: each row group a piece, read in record batches of one column."""

    def __init__(self, spec: str):
        pattern, fields = split_spec(spec)
        self._column = fields[0] if fields and fields[0] else DEFAULT_COLUMN
        self._fs, root = fsspec.core.url_to_fs(pattern)
        paths = sorted(self._fs.glob(root, detail=True).items())
        files = [(p, info) for p, info in paths if info.get("type") != "directory"]
        if not files:
            raise DataError(f"data.source=parquet:{spec}: no files match {pattern!r}; give "
                            f"parquet:/path/*.parquet or parquet:gs://BUCKET/path/*.parquet")
        self._scheme = "gs://" if pattern.startswith("gs://") else ""
        self._open_file = (None, None)
        pieces, rows, fingerprint = [], [], [spec]
        for path, info in files:
            meta = self._file(path).metadata
            _check_text_column(f"parquet file {self._scheme}{path}", meta.schema.to_arrow_schema(),
                               self._column)
            for group in range(meta.num_row_groups):
                pieces.append((path, group))
                rows.append(meta.row_group(group).num_rows)
            fingerprint.append(f"{path}:{info.get('size')}:"
                               f"{info.get('mtime', info.get('updated', ''))}")
        super().__init__(pieces, rows, fingerprint)

    def _file(self, path: str) -> pq.ParquetFile:
        """The file's reader (the last one opened is kept: shards read row groups in order)."""
        if self._open_file[0] != path:
            try:
                reader = pq.ParquetFile(self._fs.open(path, "rb"))
            except (pa.ArrowInvalid, OSError) as e:
                raise DataError(f"{self._scheme}{path} is not a Parquet file ({str(e)[:120]}); "
                                f"make data.source=parquet:GLOB match only .parquet files") from None
            self._open_file = (path, reader)
        return self._open_file[1]

    def _batches(self, piece) -> Iterator[pa.Array]:
        path, group = piece
        for batch in self._file(path).iter_batches(BATCH_ROWS, row_groups=[group],
                                                   columns=[self._column]):
            yield batch.column(0)


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets: save_to_disk folders and the local cache, read as Arrow streams
# ---------------------------------------------------------------------------------------------

def hf_cache_dir() -> str:
    """Where `datasets` caches hub datasets (its own environment variables, same defaults)."""
    if os.environ.get("HF_DATASETS_CACHE"):
        return os.environ["HF_DATASETS_CACHE"]
    home = os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface"))
    return os.path.join(home, "datasets")


class HfDocuments(_Columnar):
    """`hf:PATH[:SPLIT][:COLUMN]`: each Arrow file of the split a piece, its record batches read
    from a memory map."""

    def __init__(self, spec: str):
        path, fields = split_spec(spec)
        split = fields[0] if fields and fields[0] else ""
        column = fields[1] if len(fields) > 1 and fields[1] else DEFAULT_COLUMN
        self._column = column
        files = _saved_split(path, split, spec) if os.path.isdir(path) else \
            _cached_split(path, split or "train", spec)
        pieces, rows, fingerprint = [], [], [spec]
        for file in files:
            with pa.memory_map(file) as source:
                try:
                    reader = pa.ipc.open_stream(source)
                except pa.ArrowInvalid:
                    raise DataError(f"hf:{spec}: {file} is not an Arrow file that datasets "
                                    f"wrote; save the dataset again with save_to_disk") from None
                _check_text_column(f"hf:{spec}", reader.schema, column)
                rows.append(sum(batch.num_rows for batch in reader))
            pieces.append(file)
            st = os.stat(file)
            fingerprint.append(f"{file}:{st.st_size}:{st.st_mtime_ns}")
        super().__init__(pieces, rows, fingerprint)

    def _batches(self, piece) -> Iterator[pa.Array]:
        with pa.memory_map(piece) as source:
            for batch in pa.ipc.open_stream(source):
                yield batch.column(self._column)


def _how_to_get(spec: str) -> str:
    return ("save it once where there is network: python -c \"import datasets; "
            "datasets.load_dataset('OWNER/NAME').save_to_disk('/path/NAME')\", then give "
            "data.source=hf:/path/NAME[:SPLIT][:COLUMN]")


def _saved_split(folder: str, split: str, spec: str) -> list[str]:
    """The Arrow files of a save_to_disk folder: a Dataset (state.json) or a DatasetDict's split."""
    if os.path.exists(os.path.join(folder, "dataset_dict.json")):
        with open(os.path.join(folder, "dataset_dict.json")) as f:
            splits = json.load(f).get("splits", [])
        split = split or "train"
        if split not in splits:
            raise DataError(f"hf:{spec}: the dataset has no split {split!r}; its splits are "
                            f"{', '.join(splits)}")
        folder = os.path.join(folder, split)
    state_file = os.path.join(folder, "state.json")
    if not os.path.exists(state_file):
        raise DataError(f"hf:{spec}: {folder} is not a dataset saved with save_to_disk (no "
                        f"state.json or dataset_dict.json); {_how_to_get(spec)}")
    with open(state_file) as f:
        state = json.load(f)
    if state.get("_indices_data_files"):  # a select/shuffle view: its rows are elsewhere
        raise DataError(f"hf:{spec}: the saved dataset is an index view; save it with "
                        f"dataset.flatten_indices().save_to_disk(...)")
    return [os.path.join(folder, f["filename"]) for f in state["_data_files"]]


def _cached_split(name: str, split: str, spec: str) -> list[str]:
    """The Arrow files of `split` of hub dataset `name` (`owner/name`) in the datasets cache: its
    newest prepared version."""
    cache = hf_cache_dir()
    root = os.path.join(cache, name.replace("/", "___"))
    versions = []
    for dirpath, _, filenames in os.walk(root):
        if "dataset_info.json" in filenames:
            arrows = sorted(os.path.join(dirpath, f) for f in filenames
                            if f.endswith(".arrow") and (f"-{split}." in f or f"-{split}-" in f))
            if arrows:
                versions.append((os.path.getmtime(os.path.join(dirpath, "dataset_info.json")),
                                 arrows))
    if not versions:
        raise DataError(f"hf:{spec}: {name} is neither a folder saved with save_to_disk nor a "
                        f"dataset with a {split!r} split in the datasets cache ({cache}); "
                        f"{_how_to_get(spec)}")
    return max(versions)[1]
