"""ArrayRecord shards of token ids in a tiny fixed binary layout (no pickle anywhere).

Every record is the raw little-endian bytes of one 1-D numpy integer array:

  document  uint32 [S, len_1 .. len_S, ids ...]     S sentences, their lengths, then all ids
  example   DTYPE  [label, type_start, ids ...]    ids of `[CLS] A [SEP] B [SEP]` (unpadded);
                                                    token type 1 from type_start on (= len(ids)
                                                    when there is one segment); label 0/1.
            DTYPE is uint16 when the vocabulary fits, else uint32 (named in the folder's meta.json).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import numpy as np
from etils import epath
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from infra import storage

# group_size:1 lets every record be read on its own (random access for a global shuffle).
WRITER_OPTIONS = "group_size:1"


def ids_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


# --- documents --------------------------------------------------------------------------------

def encode_document(sentences: Sequence[Sequence[int]]) -> bytes:
    lengths = [len(s) for s in sentences]
    flat = np.fromiter((t for s in sentences for t in s), np.uint32, sum(lengths))
    return np.concatenate([np.asarray([len(sentences), *lengths], "<u4"), flat.astype("<u4")]).tobytes()


def decode_document(record: bytes) -> list[list[int]]:
    a = np.frombuffer(record, "<u4")
    n = int(a[0])
    lengths, ids = a[1:1 + n], a[1 + n:]
    bounds = [0, *np.cumsum(lengths).tolist()]
    flat = ids.tolist()
    return [flat[bounds[i]:bounds[i + 1]] for i in range(n)]


# --- examples ---------------------------------------------------------------------------------

def encode_example(ids: Sequence[int], type_start: int, label: int, dtype: np.dtype) -> bytes:
    return np.asarray([label, type_start, *ids], dtype).tobytes()


def decode_example(record: bytes, dtype: np.dtype) -> tuple[np.ndarray, int, int]:
    """-> (ids, type_start, label)."""
    a = np.frombuffer(record, dtype)
    return a[2:], int(a[1]), int(a[0])


def pad_examples(records: Sequence[bytes], dtype: np.dtype,
                 max_seq_len: int) -> dict[str, np.ndarray]:
    """Example records -> padded int32 input_ids, token_type_ids, attention_mask [N, T] and
    next_sentence_labels [N]."""
    arrays = [np.frombuffer(r, dtype) for r in records]
    heads = np.array([a[:2] for a in arrays], np.int64).reshape(len(arrays), 2)
    lengths = np.fromiter(map(len, arrays), np.int64, len(arrays)) - 2
    positions = np.arange(max_seq_len)
    real = positions < lengths[:, None]
    input_ids = np.zeros((len(arrays), max_seq_len), np.int32)
    input_ids[real] = np.concatenate([a[2:] for a in arrays]) if arrays else []
    return {"input_ids": input_ids,
            "token_type_ids": (real & (positions >= heads[:, 1:])).astype(np.int32),
            "attention_mask": real.astype(np.int32),
            "next_sentence_labels": heads[:, 0].astype(np.int32)}


# --- files ------------------------------------------------------------------------------------

def write_records(path: str | os.PathLike, records: Iterable[bytes]) -> int:
    """Writes records to one ArrayRecord file, local or on a bucket; returns how many. A reader
    never sees half a file and two writers of the same file do not mix: the file is written
    under a temporary name of this process's and renamed, or, for a bucket (ArrayRecord writes
    local files only), written locally and uploaded as one object."""
    path = storage.as_path(path)
    with storage.local_file(path, "w") as local:
        tmp = local.with_name(f"{local.name}.{os.getpid()}.partial")
        writer = ArrayRecordWriter(str(tmp), WRITER_OPTIONS)
        n = 0
        for record in records:
            writer.write(record)
            n += 1
        writer.close()
        tmp.replace(local)
    return n


def read_records(path: str | os.PathLike) -> list[bytes]:
    """Every record of one ArrayRecord file, local or on a bucket (copied down first)."""
    with storage.local_file(storage.as_path(path), "r") as local:
        reader = ArrayRecordReader(str(local))
        try:
            return reader.read_all() if reader.num_records() else []
        finally:
            reader.close()
