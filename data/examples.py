"""BERT pretraining examples: next-sentence pairs and masked tokens.

Same semantics as google-research/bert `create_pretraining_data.py` (written anew here):
`create_nsp_instances` is its `create_instances_from_document` over every document, and
`mask_tokens` its `create_masked_lm_predictions`, vectorised over a batch so that masks can be
drawn afresh for every batch (dynamic masking) instead of once when the data is written.
"""

from __future__ import annotations

import functools
from collections.abc import Collection

import numpy as np

# ---------------------------------------------------------------------------------------------
# Next-sentence pairs
# ---------------------------------------------------------------------------------------------


def _truncate_seq_pair(tokens_a: list[int], tokens_b: list[int], max_num_tokens: int,
                       rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """Cuts one token at a time from the longer side (B on ties), from its front or back at random.

    Cutting both ends, not only the back, avoids a bias towards sentence starts. The coins are
    drawn at once (the same numbers as one draw per cut) and the cuts are counted, then sliced.
    """
    excess = len(tokens_a) + len(tokens_b) - max_num_tokens
    if excess <= 0:
        return tokens_a, tokens_b
    a0, a1, b0, b1 = 0, len(tokens_a), 0, len(tokens_b)  # the kept ranges
    for front in rng.random(excess) < 0.5:
        if a1 - a0 > b1 - b0:
            a0, a1 = (a0 + 1, a1) if front else (a0, a1 - 1)
        else:
            b0, b1 = (b0 + 1, b1) if front else (b0, b1 - 1)
    return tokens_a[a0:a1], tokens_b[b0:b1]


def _instances_from_document(documents: list[list[list[int]]], doc_index: int, max_num_tokens: int,
                             short_seq_prob: float, rng: np.random.Generator, sop: bool = False):
    """Yields (tokens_a, tokens_b, label) for one document.

    NSP: label 1 = B is a random span of another document. SOP (sentence order, ALBERT): B always
    follows A in the same document and label 1 = the two were swapped; a chunk of one sentence is
    cut in two at a random token (one-token chunks give no pair).
    """
    document = documents[doc_index]
    # Mostly fill the whole sequence, but sometimes (short_seq_prob) aim shorter so the model also
    # sees short inputs like those of fine-tuning tasks.
    target_len = max_num_tokens
    if rng.random() < short_seq_prob:
        target_len = int(rng.integers(2, max_num_tokens + 1))

    chunk: list[list[int]] = []
    chunk_len = 0
    i = 0
    while i < len(document):
        chunk.append(document[i])
        chunk_len += len(document[i])
        if i == len(document) - 1 or chunk_len >= target_len:
            # Segment A is the first a_end sentences of the chunk.
            a_end = int(rng.integers(1, len(chunk))) if len(chunk) >= 2 else 1
            tokens_a = [t for sentence in chunk[:a_end] for t in sentence]
            if sop:
                tokens_b = [t for sentence in chunk[a_end:] for t in sentence]
                if not tokens_b:
                    if len(tokens_a) >= 2:
                        cut = int(rng.integers(1, len(tokens_a)))
                        tokens_a, tokens_b = tokens_a[:cut], tokens_a[cut:]
                    else:
                        chunk, chunk_len = [], 0
                        i += 1
                        continue
                swapped = rng.random() < 0.5
                if swapped:
                    tokens_a, tokens_b = tokens_b, tokens_a
                tokens_a, tokens_b = _truncate_seq_pair(tokens_a, tokens_b, max_num_tokens, rng)
                yield tokens_a, tokens_b, int(swapped)
                chunk, chunk_len = [], 0
                i += 1
                continue
            if len(chunk) == 1 or rng.random() < 0.5:
                # Random next: B comes from another document (up to 10 tries to avoid this one).
                is_random_next = True
                target_b_len = target_len - len(tokens_a)
                for _ in range(10):
                    other = int(rng.integers(0, len(documents)))
                    if other != doc_index:
                        break
                other_doc = documents[other]
                tokens_b = []
                for sentence in other_doc[int(rng.integers(0, len(other_doc))):]:
                    tokens_b.extend(sentence)
                    if len(tokens_b) >= target_b_len:
                        break
                # The chunk's sentences after A were not used: put them back for the next chunk.
                i -= len(chunk) - a_end
            else:
                is_random_next = False
                tokens_b = [t for sentence in chunk[a_end:] for t in sentence]
            tokens_a, tokens_b = _truncate_seq_pair(tokens_a, tokens_b, max_num_tokens, rng)
            yield tokens_a, tokens_b, is_random_next
            chunk, chunk_len = [], 0
        i += 1


def iter_pair_instances(documents: list[list[list[int]]], max_seq_len: int, short_seq_prob: float,
                        rng: np.random.Generator, sop: bool = False):
    """Yields (tokens_a, tokens_b, label) over every document, in order: NSP or SOP pairs."""
    max_num_tokens = max_seq_len - 3  # room for [CLS], [SEP], [SEP]
    if max_num_tokens < 2:
        raise ValueError(f"max_seq_len={max_seq_len} is too short for a sentence pair")
    documents = [d for d in ([s for s in doc if len(s)] for doc in documents) if d]
    for doc_index in range(len(documents)):
        for tokens_a, tokens_b, label in _instances_from_document(
                documents, doc_index, max_num_tokens, short_seq_prob, rng, sop):
            yield tokens_a, tokens_b, int(label)


def iter_packed_sequences(documents: list[list[list[int]]], max_seq_len: int, sep_id: int):
    """Full sentences packed into `[CLS] ... [SEP]` sequences across documents (RoBERTa's
    FULL-SENTENCES): a sequence takes whole sentences while they fit and may cross a document
    boundary, marked by one [SEP]. Yields the content between [CLS] and the final [SEP].

    A sentence longer than max_seq_len - 2 tokens is cut into pieces that fit (the caller
    usually has done so already).
    """
    budget = max_seq_len - 2
    if budget < 1:
        raise ValueError(f"max_seq_len={max_seq_len} is too short")
    current: list[int] = []
    boundary = False  # a document ended since the last sentence in `current`
    for doc in documents:
        for sentence in doc:
            for start in range(0, len(sentence), budget):
                piece = list(sentence[start:start + budget])
                sep = [sep_id] if boundary and current else []
                if current and len(current) + len(sep) + len(piece) > budget:
                    yield current
                    current, sep = [], []
                current += sep + piece
                boundary = False
        boundary = True
    if current:
        yield current


def create_nsp_instances(documents: list[list[list[int]]], max_seq_len: int, short_seq_prob: float,
                         rng: np.random.Generator, cls_id: int, sep_id: int,
                         pad_id: int = 0) -> dict[str, np.ndarray]:
    """One pass of `[CLS] A [SEP] B [SEP]` pairs over every document, in document order.

    documents: lists of sentences, each a list of token ids (without special tokens). Empty
    sentences and documents are dropped first. Half the time (and always when a chunk holds a
    single sentence) B is a random span of another document.

    Returns padded arrays: input_ids, token_type_ids, attention_mask (1 on real tokens) int32 [N, T]
    and next_sentence_labels int32 [N] (0 = B follows A, 1 = B is random, as in HuggingFace).
    Call it with several generators (BERT's dupe_factor) to get differently cut pairs.
    """
    rows, labels = [], []
    for tokens_a, tokens_b, label in iter_pair_instances(documents, max_seq_len, short_seq_prob, rng):
        rows.append((tokens_a, tokens_b))
        labels.append(label)

    n = len(rows)
    input_ids = np.full((n, max_seq_len), pad_id, np.int32)
    token_type_ids = np.zeros((n, max_seq_len), np.int32)
    attention_mask = np.zeros((n, max_seq_len), np.int32)
    for r, (a, b) in enumerate(rows):
        ids = [cls_id, *a, sep_id, *b, sep_id]
        input_ids[r, :len(ids)] = ids
        token_type_ids[r, len(a) + 2:len(ids)] = 1
        attention_mask[r, :len(ids)] = 1
    return {"input_ids": input_ids, "token_type_ids": token_type_ids,
            "attention_mask": attention_mask,
            "next_sentence_labels": np.asarray(labels, np.int32).reshape(n)}


# ---------------------------------------------------------------------------------------------
# Masked tokens
# ---------------------------------------------------------------------------------------------


MASK_WORDS = 2  # random 64-bit words mask_tokens takes per token: [N, MASK_WORDS, T]
_CHANCE = 1 << 32  # the corruption word's high 32 bits are the 80/10/10 coin


@functools.lru_cache(maxsize=8)
def _specials(vocab_size: int, special_ids: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(is_special bool [vocab], the non-special ids a masked token may become), cached: looking
    ids up in a table is many times faster than np.isin on every batch."""
    is_special = np.zeros(vocab_size, bool)
    is_special[list(special_ids)] = True
    non_special = np.flatnonzero(~is_special)
    is_special.flags.writeable = non_special.flags.writeable = False
    return is_special, non_special


def number_documents(input_ids: np.ndarray, attention_mask: np.ndarray, sep_id: int) -> np.ndarray:
    """The attention_mask of packed rows [N, T]: 0 on padding, and 1, 2, 3, ... numbering the
    documents of a row (`[CLS] doc 1 [SEP] doc 2 [SEP]`, see iter_packed_sequences): a [SEP]
    belongs to the document it ends, so a token's number is 1 + the [SEP]s before it."""
    real = np.asarray(attention_mask) != 0
    sep = (np.asarray(input_ids) == sep_id) & real
    return np.where(real, 1 + np.cumsum(sep, axis=1) - sep, 0).astype(np.int32)


def _take_words(lens: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Greedy fill, per row: visit the words in order (lens [N, W], 0 = no word) and take each
    word whose length still fits the row's target count; -> taken bool [N, W].

    The same as looping over the W ranks, in a few vectorised passes: every word before the
    first overshoot of the running total fits; after it, each pass takes the next word that fits
    the rest, and a taken word shrinks the rest by at least 1, so there are at most
    max(rest) passes (none without whole words, where every length is 1).
    """
    n, w = lens.shape
    total = np.cumsum(lens, axis=1)
    taken = (total <= target[:, None]) & (lens > 0)
    over = total > target[:, None]
    rows = np.flatnonzero(over.any(axis=1))
    if not len(rows):
        return taken
    last = over[rows].argmax(axis=1)  # the first word that overshoots: skipped
    lens, taken_rows = lens[rows], taken[rows]
    rest = target[rows] - np.where(last > 0, total[rows, last - 1], 0)
    columns = np.arange(w)
    while True:
        fits = (columns > last[:, None]) & (lens > 0) & (lens <= rest[:, None])
        active = np.flatnonzero(fits.any(axis=1))
        if not len(active):
            break
        j = fits[active].argmax(axis=1)
        taken_rows[active, j] = True
        rest[active] -= lens[active, j]
        last[active] = j
    taken[rows] = taken_rows
    return taken


def mask_tokens(input_ids: np.ndarray, attention_mask: np.ndarray, bits: np.ndarray, *,
                vocab_size: int, mask_id: int, special_ids: Collection[int],
                mask_prob: float = 0.15, max_predictions: int,
                word_starts: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Chooses tokens to predict and corrupts them, BERT style, for a batch [N, T] of ids below
    vocab_size.

    Each row predicts round(real_len * mask_prob) tokens (real_len counts [CLS]/[SEP]), at least 1
    and at most max_predictions, chosen at random among real non-special tokens. A chosen token
    becomes [MASK] 80% of the time, a random non-special token 10%, and stays as it is 10%.

    With word_starts (bool [N, T], True where a token does not begin with ##) whole words are
    chosen: words are taken in random order and a word that would overshoot the row's count is
    skipped, so a word is never split (rows may then predict a little fewer tokens).

    bits: uint64 [N, MASK_WORDS, T], the randomness (data.pipeline.batch_bits): bits[:, 0, k]
    orders word k of a row (the lowest first), bits[:, 1, k] corrupts token k (its high 32 bits
    against 0.8 and 0.9 of 2**32, its low 32 bits pick the random replacement).

    Returns input_ids (corrupted copy), and for P = max_predictions slots, sorted by position:
    masked_positions int32 [N, P], masked_ids int32 [N, P] (original ids), masked_weights float32
    [N, P] (1 on real predictions, 0 on unused slots, whose position and id are 0).
    """
    input_ids = np.asarray(input_ids)
    n, t = input_ids.shape
    bits = np.asarray(bits, np.uint64)
    if bits.shape != (n, MASK_WORDS, t):
        raise ValueError(f"bits has shape {bits.shape}, not {(n, MASK_WORDS, t)}")
    is_special, non_special = _specials(vocab_size, tuple(sorted(special_ids)))
    real = np.asarray(attention_mask) != 0
    candidate = real & ~is_special[input_ids]
    # np.round rounds half to even, like Python's round in the original.
    target = np.round(real.sum(1) * mask_prob).astype(np.int64)
    target = np.minimum(max_predictions, np.maximum(1, target))

    # Words: a candidate starts a new word unless it is a ## continuation of the candidate just
    # before it. Without word_starts every candidate token is its own word.
    starts = candidate.copy()
    if word_starts is not None:
        starts[:, 1:] &= np.asarray(word_starts, bool)[:, 1:] | ~candidate[:, :-1]
    word_id = np.where(candidate, np.cumsum(starts, axis=1) - 1, t)  # t = "no word" bucket
    flat_word = (np.arange(n)[:, None] * (t + 1) + word_id).ravel()
    word_len = np.bincount(flat_word, minlength=n * (t + 1)).reshape(n, t + 1)[:, :t]

    # Visit the words of each row in a random order; take a word while it fits in the row's count.
    keys = np.where(word_len > 0, bits[:, 0] >> np.uint64(1), np.uint64(1 << 63))
    order = np.argsort(keys, axis=1)
    taken = _take_words(np.take_along_axis(word_len, order, axis=1), target)
    word_taken = np.zeros((n, t + 1), bool)
    np.put_along_axis(word_taken, order, taken, axis=1)
    rows, cols = np.nonzero(np.take_along_axis(word_taken, word_id, axis=1))  # row-major

    # Corrupt the chosen tokens: 80% [MASK], 10% random token, 10% unchanged (decided per token).
    word = bits[rows, 1, cols]
    coin = word >> np.uint64(32)
    pick = ((word & np.uint64(_CHANCE - 1)) * np.uint64(len(non_special))) >> np.uint64(32)
    original = input_ids[rows, cols]
    new = np.where(coin < np.uint64(0.8 * _CHANCE), mask_id,
                   np.where(coin < np.uint64(0.9 * _CHANCE), non_special[pick], original))
    masked = input_ids.copy()
    masked[rows, cols] = new

    # Chosen positions in ascending order: slot = how many chosen tokens came before in the row.
    p = max_predictions
    first = np.searchsorted(rows, np.arange(n))
    slots = np.arange(len(rows)) - first[rows]
    positions = np.zeros((n, p), np.int32)
    ids = np.zeros((n, p), np.int32)
    weights = np.zeros((n, p), np.float32)
    positions[rows, slots], ids[rows, slots], weights[rows, slots] = cols, original, 1.0
    return {"input_ids": masked, "masked_positions": positions, "masked_ids": ids,
            "masked_weights": weights}
