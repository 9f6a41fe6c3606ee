"""BERT WordPiece or ModernBERT byte-level BPE: a thin wrapper around a HuggingFace `tokenizers.Tokenizer`.

WordPiece (`kind="wordpiece"`) is BERT's own setup (BertNormalizer, BertPreTokenizer, WordPiece with
`##` continuations, [CLS] A [SEP] B [SEP] post-processing), so the saved `vocab.txt` gives the same
ids in `transformers.BertTokenizer` and the saved `tokenizer.json` loads in `AutoTokenizer`.

BPE (`kind="bpe"`) is ModernBERT's (OLMo's GPT-NeoX-style) setup: NFC, byte-level pre-tokenizer
and decoder, cased, the same five bracketed special tokens and [CLS] A [SEP] template; its saved
folder (tokenizer.json and tokenizer_config.json) loads in `AutoTokenizer`.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Iterable, Sequence

import numpy as np
from etils import epath
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from infra import storage

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
# At the front of the vocabulary, so [PAD] is id 0 like in BERT's vocab.txt.
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)
KINDS = ("wordpiece", "bpe")  # data.tokenizer_kind
BYTE_SPACE = "\u0120"  # "Ġ": how byte-level BPE writes the space that starts a word


def _bert_pipeline(model: models.WordPiece, lowercase: bool) -> _HFTokenizer:
    tok = _HFTokenizer(model)
    # strip_accents=None follows `lowercase`, as in BERT (uncased strips accents, cased keeps them).
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def _add_post_processor(tok: _HFTokenizer) -> None:
    cls_id, sep_id = tok.token_to_id(CLS), tok.token_to_id(SEP)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{CLS} $A {SEP}", pair=f"{CLS} $A {SEP} $B:1 {SEP}:1",
        special_tokens=[(CLS, cls_id), (SEP, sep_id)])


def _bpe_pipeline() -> _HFTokenizer:
    tok = _HFTokenizer(models.BPE(unk_token=UNK))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


ALPHABET_LIMIT = 1000  # as in HuggingFace's BERT recipe: rarer characters become [UNK]


def _word_counts(texts: Iterable[str], lowercase: bool) -> Counter:
    """The words BERT's pipeline cuts `texts` into, counted: what the WordPiece trainer counts.
    Rust normalises; Python splits at the spaces (all whitespace is one after clean_text) and
    pre-tokenizes each distinct piece once."""
    normalizer = _bert_pipeline(models.WordPiece(unk_token=UNK), lowercase).normalizer
    pieces = Counter()
    for text in texts:
        pieces.update(normalizer.normalize_str(text).split())
    words, cut = Counter(), pre_tokenizers.BertPreTokenizer()
    for piece, count in pieces.items():
        for word, _ in cut.pre_tokenize_str(piece):
            words[word] += count
    return words


def _train_wordpiece(words: Counter, vocab_size: int, order=sorted) -> set[str]:
    """The vocabulary tokenizers' WordPiece trainer learns from these word counts.

    The trainer numbers the `##` pieces of single characters in the order of a hash map seeded
    anew at each call, and breaks ties between equally frequent pairs by those numbers: left to
    itself, it learned another vocabulary on each run. Here the alphabet (the ALPHABET_LIMIT
    most frequent characters, ties to the lower code point) and those pieces (numbered in
    `order`, right after the special tokens) are given to it up front, so nothing it does
    depends on a hash; it is fed the counted words, already normalised."""
    chars, inner = Counter(), set()
    for word, count in words.items():
        for c in word:
            chars[c] += count
        inner.update(word[1:])
    alphabet = sorted(sorted(chars, key=lambda c: (-chars[c], c))[:ALPHABET_LIMIT])
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, continuing_subword_prefix="##", show_progress=False,
        special_tokens=[*SPECIAL_TOKENS, *order(f"##{c}" for c in alphabet if c in inner)],
        initial_alphabet=alphabet, limit_alphabet=len(alphabet))
    tok = _HFTokenizer(models.WordPiece(unk_token=UNK, continuing_subword_prefix="##"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # each word as many times as it was counted, a few thousand to a text
    tok.train_from_iterator((" ".join([word] * min(4096, count - done))
                             for word, count in sorted(words.items()) for done in range(0, count, 4096)),
                            trainer=trainer)
    return set(tok.get_vocab())


def read_vocab(path) -> list[str]:
    """The tokens of a vocab.txt in id order, one a line. Split on line breaks only, like BERT's
    load_vocab (not on str.splitlines' other separators, which can be parts of tokens)."""
    lines = epath.Path(path).read_text(encoding="utf-8").removesuffix("\n")
    return [token.rstrip("\r") for token in lines.split("\n")]


class Tokenizer:
    """WordPiece or byte-level BPE tokenizer with BERT's special tokens."""

    def __init__(self, tokenizer: _HFTokenizer):
        self._tok = tokenizer
        ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"tokenizer vocabulary lacks the special tokens {missing}")
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (
            ids[t] for t in SPECIAL_TOKENS)
        self.special_ids = frozenset(ids.values())
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        self._tokens = [""] * (max(vocab.values()) + 1)
        for token, i in vocab.items():
            self._tokens[i] = token
        self.kind = "bpe" if isinstance(tokenizer.model, models.BPE) else "wordpiece"
        # Lookup table for word_starts: one bool per id. Byte-level BPE marks the start of a word
        # with a leading space instead (a word after punctuation without a space counts as one).
        if self.kind == "bpe":
            continuation = [not t.startswith(BYTE_SPACE) and t not in SPECIAL_TOKENS for t in self._tokens]
        else:
            continuation = [t.startswith("##") for t in self._tokens]
        self._is_continuation = np.array(continuation, dtype=bool)

    # --- construction -----------------------------------------------------------------------

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, lowercase: bool = True,
              kind: str = "wordpiece") -> "Tokenizer":
        """Learns a vocabulary of `vocab_size` tokens (special tokens included): WordPiece, or
        with kind="bpe" a cased byte-level BPE (`lowercase` is then not used). The same texts
        give the same vocabulary, file for file, in any process."""
        if kind == "bpe":
            return cls._train_bpe(texts, vocab_size)
        if kind != "wordpiece":
            raise ValueError(f"unknown tokenizer kind {kind!r}; choose one of {', '.join(KINDS)}")
        # The trainer numbers tokens as it meets them: number them the same way everywhere.
        learned = _train_wordpiece(_word_counts(texts, lowercase), vocab_size) - set(SPECIAL_TOKENS)
        return cls.from_vocab(list(SPECIAL_TOKENS) + sorted(learned), lowercase)

    @classmethod
    def _train_bpe(cls, texts: Iterable[str], vocab_size: int) -> "Tokenizer":
        tok = _bpe_pipeline()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # every byte: no [UNK] ever
        tok.train_from_iterator(texts, trainer=trainer)
        tok.add_special_tokens(list(SPECIAL_TOKENS))
        _add_post_processor(tok)
        return cls(tok)

    @classmethod
    def load(cls, directory) -> "Tokenizer":
        """Loads `tokenizer.json`, or a HuggingFace BERT folder with only `vocab.txt` (a local
        folder or a gs:// one)."""
        directory = epath.Path(directory)
        if (directory / "tokenizer.json").exists():
            return cls(_HFTokenizer.from_str((directory / "tokenizer.json").read_text(encoding="utf-8")))
        if not (directory / "vocab.txt").exists():
            raise FileNotFoundError(f"{directory} has neither tokenizer.json nor vocab.txt")
        lowercase = True  # BERT's default; tokenizer_config.json says otherwise for cased models.
        config = directory / "tokenizer_config.json"
        if config.exists():
            lowercase = bool(json.loads(config.read_text()).get("do_lower_case", True))
        return cls.from_vocab(read_vocab(directory / "vocab.txt"), lowercase)

    @classmethod
    def from_vocab(cls, tokens: Sequence[str], lowercase: bool) -> "Tokenizer":
        """BERT's pipeline over a WordPiece vocabulary given in id order (also what `models.hf`
        writes as the tokenizer.json of an export, so both agree token for token)."""
        vocab = {token: i for i, token in enumerate(tokens)}
        tok = _bert_pipeline(
            models.WordPiece(vocab, unk_token=UNK, continuing_subword_prefix="##"), lowercase)
        # Special tokens are never split (as in transformers' BertTokenizer).
        tok.add_special_tokens(list(SPECIAL_TOKENS))
        _add_post_processor(tok)
        return cls(tok)

    def save(self, directory) -> None:
        """Writes `tokenizer.json` and, for WordPiece, `vocab.txt` (one token per line, in id
        order); for BPE `tokenizer_config.json`, which AutoTokenizer needs to name its tokens."""
        directory = epath.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        # Whole files: several processes may save the same tokenizer to a shared folder.
        storage.write_whole(directory / "tokenizer.json", self._tok.to_str(pretty=True).encode())
        if self.kind == "wordpiece":
            storage.write_whole(directory / "vocab.txt", "".join(t + "\n" for t in self._tokens).encode())
            return
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                  "pad_token": PAD, "unk_token": UNK, "cls_token": CLS, "sep_token": SEP,
                  "mask_token": MASK, "model_input_names": ["input_ids", "attention_mask"]}
        storage.write_whole(directory / "tokenizer_config.json", json.dumps(config, indent=2).encode())

    # --- encoding ---------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without special tokens."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of many texts at once (Rust, multi-threaded), without special tokens."""
        return [e.ids for e in self._tok.encode_batch_fast(list(texts), add_special_tokens=False)]

    def encode_with_offsets(self, texts: Sequence[str]) -> list[tuple[list[int], np.ndarray]]:
        """Token ids of each text and each token's [start, end) characters in it (T, 2), without
        special tokens: where an extractive answer's tokens lie in the text."""
        return [(e.ids, np.asarray(e.offsets, np.int64).reshape(-1, 2))
                for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def encode_pair(self, a: str, b: str | None, max_len: int) -> tuple[list[int], list[int]]:
        """`[CLS] a [SEP] b [SEP]` ids and token types; the longer side is cut to fit max_len."""
        ids_a, ids_b = self.encode(a), (self.encode(b) if b is not None else [])
        budget = max_len - (3 if b is not None else 2)
        if budget < 0:
            raise ValueError(f"max_len={max_len} leaves no room for the special tokens")
        while len(ids_a) + len(ids_b) > budget:  # BERT's truncate_seq_pair: cut the longer one
            (ids_a if len(ids_a) > len(ids_b) else ids_b).pop()
        ids = [self.cls_id, *ids_a, self.sep_id]
        types = [0] * len(ids)
        if b is not None:
            ids += [*ids_b, self.sep_id]
            types += [1] * (len(ids_b) + 1)
        return ids, types

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str:
        return self._tokens[i]

    def word_starts(self, ids: np.ndarray) -> np.ndarray:
        """True where a token starts a word (does not begin with ##); same shape as `ids`."""
        return ~self._is_continuation[np.asarray(ids)]
