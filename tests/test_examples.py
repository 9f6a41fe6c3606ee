"""BERT example creation: NSP pairs and masking, by hand-worked goldens and by statistics."""

import numpy as np
import pytest

from data.examples import (MASK_WORDS, _take_words, create_nsp_instances, mask_tokens,
                           number_documents)

CLS, SEP, MASK = 2, 3, 4
SPECIALS = frozenset({0, 1, 2, 3, 4})


class ScriptedRng:
    """Stands in for np.random.Generator and returns values written in the test, in call order.

    random(size) takes a scripted array of that shape, or else that many scripted scalars (as a
    Generator gives the same numbers for random(3) as for three random() calls). integers()
    checks that each scripted value lies in the bounds the code asked for.
    """

    def __init__(self, random=(), integers=()):
        self._random, self._integers = list(random), list(integers)

    def random(self, size=None):
        if size is None:
            return self._random.pop(0)
        shape = tuple(np.atleast_1d(size))
        if np.ndim(self._random[0]):
            value = np.asarray(self._random.pop(0), float)
            assert value.shape == shape, (value.shape, shape)
            return value
        return np.array([self._random.pop(0) for _ in range(int(np.prod(shape)))]).reshape(shape)

    def integers(self, low, high=None, size=None):
        value = self._integers.pop(0)
        assert (low <= np.asarray(value)).all() and (np.asarray(value) < high).all(), (low, high)
        return np.asarray(value) if size is not None else value

    def done(self):
        return not self._random and not self._integers


# ---------------------------------------------------------------------------------------------
# Next-sentence pairs
# ---------------------------------------------------------------------------------------------


def test_nsp_golden_by_hand():
    # max_seq_len 8: room for 5 tokens besides [CLS] A [SEP] B [SEP].
    docs = [
        [[10, 11], [12, 13], [14]],           # doc 0
        [],                                   # dropped: empty
        [[20], [], [21, 22, 23]],             # doc 1 (the empty sentence is dropped)
        [[30, 31, 32, 33], [34, 35, 36]],     # doc 2
    ]
    rng = ScriptedRng(
        random=[0.9,        # doc 0: not short (>= 0.1): target 5
                0.7,        # doc 0: B is the real next
                0.05,       # doc 1: short: target drawn below (3)
                0.2,        # doc 1, chunk 1: B is random
                0.5,        # doc 2: not short
                0.6,        # doc 2: B is the real next
                0.3, 0.8],  # doc 2 truncation: cut A's front, then B's back
        integers=[2,        # doc 0: a_end = 2 of 3 sentences -> A = [10..13], B = [14]
                  3,        # doc 1: target length 3
                  1,        # doc 1: a_end = 1 -> A = [20]
                  1, 0,     # random doc: 1 is this one, try again: doc 0
                  1,        # start at doc 0's sentence 1: B = [12, 13] (reaches 3 - 1 tokens)
                  # [21, 22, 23] was put back; it forms a chunk alone, so B is random (no draw)
                  0, 2,     # doc 0, its sentence 2: B = [14]
                  1])       # doc 2: a_end = 1 -> A = [30..33], B = [34..36], 7 > 5 tokens
    out = create_nsp_instances(docs, 8, 0.1, rng, CLS, SEP)
    assert rng.done()
    np.testing.assert_array_equal(out["input_ids"], [
        [2, 10, 11, 12, 13, 3, 14, 3],
        [2, 20, 3, 12, 13, 3, 0, 0],
        [2, 21, 22, 23, 3, 14, 3, 0],
        [2, 31, 32, 33, 3, 34, 35, 3],
    ])
    np.testing.assert_array_equal(out["token_type_ids"], [
        [0, 0, 0, 0, 0, 0, 1, 1],
        [0, 0, 0, 1, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 1, 1, 1],
    ])
    np.testing.assert_array_equal(out["attention_mask"].sum(1), [8, 6, 7, 8])
    np.testing.assert_array_equal(out["next_sentence_labels"], [0, 1, 1, 0])
    for key in ("input_ids", "token_type_ids", "attention_mask", "next_sentence_labels"):
        assert out[key].dtype == np.int32


def _reference_instances(all_documents, max_seq_length, short_seq_prob, rng):
    """google-research/bert create_instances_from_document, transcribed line by line (random.Random
    calls mapped to the Generator: random() -> random(), randint(a, b) -> integers(a, b + 1))."""
    all_documents = [[s for s in d if s] for d in all_documents]
    all_documents = [d for d in all_documents if d]
    instances = []
    for document_index in range(len(all_documents)):
        document = all_documents[document_index]
        max_num_tokens = max_seq_length - 3
        target_seq_length = max_num_tokens
        if rng.random() < short_seq_prob:
            target_seq_length = int(rng.integers(2, max_num_tokens + 1))
        current_chunk, current_length, i = [], 0, 0
        while i < len(document):
            segment = document[i]
            current_chunk.append(segment)
            current_length += len(segment)
            if i == len(document) - 1 or current_length >= target_seq_length:
                if current_chunk:
                    a_end = 1
                    if len(current_chunk) >= 2:
                        a_end = int(rng.integers(1, len(current_chunk) - 1 + 1))
                    tokens_a = []
                    for j in range(a_end):
                        tokens_a.extend(current_chunk[j])
                    tokens_b = []
                    if len(current_chunk) == 1 or rng.random() < 0.5:
                        is_random_next = True
                        target_b_length = target_seq_length - len(tokens_a)
                        for _ in range(10):
                            random_document_index = int(rng.integers(0, len(all_documents) - 1 + 1))
                            if random_document_index != document_index:
                                break
                        random_document = all_documents[random_document_index]
                        random_start = int(rng.integers(0, len(random_document) - 1 + 1))
                        for j in range(random_start, len(random_document)):
                            tokens_b.extend(random_document[j])
                            if len(tokens_b) >= target_b_length:
                                break
                        num_unused_segments = len(current_chunk) - a_end
                        i -= num_unused_segments
                    else:
                        is_random_next = False
                        for j in range(a_end, len(current_chunk)):
                            tokens_b.extend(current_chunk[j])
                    while True:  # truncate_seq_pair
                        total_length = len(tokens_a) + len(tokens_b)
                        if total_length <= max_num_tokens:
                            break
                        trunc_tokens = tokens_a if len(tokens_a) > len(tokens_b) else tokens_b
                        if rng.random() < 0.5:
                            del trunc_tokens[0]
                        else:
                            trunc_tokens.pop()
                    tokens = [CLS] + tokens_a + [SEP] + tokens_b + [SEP]
                    segment_ids = [0] * (len(tokens_a) + 2) + [1] * (len(tokens_b) + 1)
                    instances.append((tokens, segment_ids, int(is_random_next)))
                current_chunk, current_length = [], 0
            i += 1
    return instances


def _random_documents(rng, n_docs, max_sentences=12, max_len=30, min_sentences=1):
    """Documents whose token ids are unique (a running counter), so each id tells where it was."""
    docs, next_id = [], 10
    for _ in range(n_docs):
        doc = []
        for _ in range(rng.integers(min_sentences, max_sentences + 1)):
            n = int(rng.integers(1, max_len + 1))
            doc.append(list(range(next_id, next_id + n)))
            next_id += n
        docs.append(doc)
    return docs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nsp_matches_reference_transcription(seed):
    docs = _random_documents(np.random.default_rng(100 + seed), 20)
    ours = create_nsp_instances(docs, 32, 0.3, np.random.default_rng(seed), CLS, SEP)
    ref = _reference_instances(docs, 32, 0.3, np.random.default_rng(seed))
    assert len(ours["input_ids"]) == len(ref)
    for row, (tokens, segments, label) in enumerate(ref):
        n = len(tokens)
        assert ours["input_ids"][row, :n].tolist() == tokens
        assert ours["token_type_ids"][row, :n].tolist() == segments
        assert ours["attention_mask"][row].tolist() == [1] * n + [0] * (32 - n)
        assert not ours["input_ids"][row, n:].any() and not ours["token_type_ids"][row, n:].any()
        assert ours["next_sentence_labels"][row] == label


def test_nsp_labels_balanced():
    # A chunk of a single sentence always takes a random B (as in BERT), so real text gives more
    # than half random pairs (56% on the news corpus). With many tiny sentences and no short
    # targets nearly every chunk holds several sentences (the expected mean is about 0.51).
    docs = _random_documents(np.random.default_rng(0), 400, 300, max_len=2, min_sentences=200)
    out = create_nsp_instances(docs, 64, 0.0, np.random.default_rng(0), CLS, SEP)
    labels = out["next_sentence_labels"]
    assert len(labels) > 1500
    assert abs(labels.mean() - 0.5) < 0.04


def test_nsp_statistics():
    docs = _random_documents(np.random.default_rng(0), 1000, max_sentences=30, max_len=12)
    owner = {t: d for d, doc in enumerate(docs) for s in doc for t in s}
    out = create_nsp_instances(docs, 64, 0.1, np.random.default_rng(0), CLS, SEP)
    labels = out["next_sentence_labels"]
    assert len(labels) > 2000 and 0.5 <= labels.mean() < 0.65
    lengths = out["attention_mask"].sum(1)
    assert (lengths <= 64).all() and (out["input_ids"][:, 0] == CLS).all()
    for ids, types, n, label in zip(out["input_ids"], out["token_type_ids"], lengths, labels):
        seps = np.flatnonzero(ids[:n] == SEP)
        assert seps.tolist() == [seps[0], n - 1] and 1 < seps[0] < n - 2
        a, b = ids[1:seps[0]], ids[seps[0] + 1:n - 1]
        assert (types[:seps[0] + 1] == 0).all() and (types[seps[0] + 1:n] == 1).all()
        doc_a = {owner[t] for t in a}
        assert len(doc_a) == 1 and len({owner[t] for t in b}) == 1
        # Whole consecutive sentences, cut only at the ends: each side is a run of the text.
        assert (np.diff(a) == 1).all() and (np.diff(b) == 1).all()
        if label == 0:
            assert owner[b[0]] in doc_a and a[-1] < b[0]  # B follows A in the same document
        else:
            assert owner[b[0]] not in doc_a


# ---------------------------------------------------------------------------------------------
# Masking
# ---------------------------------------------------------------------------------------------


def corruption(coin: float, pick: int = 0, choices: int = 15) -> int:
    """The corruption word of one token: the coin (high 32 bits, against 0.8 and 0.9) and the
    index of its random replacement among `choices` non-special ids (low 32 bits)."""
    return (int(coin * 2**32) << 32) | int((pick + 0.5) * 2**32 / choices)


def random_bits(rng, n, t):
    return rng.integers(0, 2**64, (n, MASK_WORDS, t), dtype=np.uint64, endpoint=False)


def test_mask_golden_by_hand():
    ids = np.array([[2, 10, 11, 12, 3, 13, 3, 0]])
    attn = np.array([[1, 1, 1, 1, 1, 1, 1, 0]])
    # 7 real tokens * 0.3 = 2.1 -> 2 predictions among the candidates at positions 1, 2, 3, 5.
    bits = np.array([[
        # One key per word, in word order (words are positions 1, 2, 3, 5): the lowest keys win,
        # i.e. positions 2 and 5. Columns past the 4 words are unused.
        [50, 10, 90, 30, 0, 0, 0, 0],
        # One word per position: position 2 -> [MASK] (< 0.8), 5 -> random (0.8-0.9), index 7
        # of the non-special ids 5..19, i.e. token 12.
        [0, corruption(0.95), corruption(0.5), 0, 0, corruption(0.85, pick=7), 0, 0]]],
        np.uint64)
    out = mask_tokens(ids, attn, bits, vocab_size=20, mask_id=MASK, special_ids=SPECIALS,
                      mask_prob=0.3, max_predictions=3)
    np.testing.assert_array_equal(out["input_ids"], [[2, 10, 4, 12, 3, 12, 3, 0]])
    np.testing.assert_array_equal(out["masked_positions"], [[2, 5, 0]])
    np.testing.assert_array_equal(out["masked_ids"], [[11, 13, 0]])
    np.testing.assert_array_equal(out["masked_weights"], [[1, 1, 0]])
    assert out["masked_positions"].dtype == np.int32 and out["masked_weights"].dtype == np.float32
    with pytest.raises(ValueError, match="bits has shape"):
        mask_tokens(ids, attn, bits[:, :1], vocab_size=20, mask_id=MASK, special_ids=SPECIALS,
                    max_predictions=3)


def test_whole_word_mask_golden_by_hand():
    ids = np.array([[2, 10, 11, 12, 13, 14, 3, 0]])
    attn = np.array([[1, 1, 1, 1, 1, 1, 1, 0]])
    starts = np.array([[1, 1, 0, 1, 0, 0, 1, 1]], bool)  # words: positions 1-2 and 3-5
    bits = np.array([[
        # Word 1 (3 tokens) comes first but overshoots the 2 predictions: skipped; word 0 fits.
        [20, 10, 0, 0, 0, 0, 0, 0],
        [0, corruption(0.95), corruption(0.1), 0, 0, 0, 0, 0]]],  # 1 kept as is, 2 -> [MASK]
        np.uint64)
    out = mask_tokens(ids, attn, bits, vocab_size=20, mask_id=MASK, special_ids=SPECIALS,
                      mask_prob=0.3, max_predictions=4, word_starts=starts)
    np.testing.assert_array_equal(out["input_ids"], [[2, 10, 4, 12, 13, 14, 3, 0]])
    np.testing.assert_array_equal(out["masked_positions"], [[1, 2, 0, 0]])
    np.testing.assert_array_equal(out["masked_ids"], [[10, 11, 0, 0]])
    np.testing.assert_array_equal(out["masked_weights"], [[1, 1, 0, 0]])


def _greedy_by_loop(lens, target):
    """The whole-word fill written as the plain loop of the original: visit words in order, take
    each one that fits the row's count."""
    taken = np.zeros(lens.shape, bool)
    for r, (row, goal) in enumerate(zip(lens.tolist(), target.tolist())):
        count = 0
        for k, length in enumerate(row):
            if length and count + length <= goal:
                taken[r, k], count = True, count + length
    return taken


def test_vectorised_word_fill_equals_the_loop():
    rng = np.random.default_rng(5)
    for max_len in (1, 2, 4, 9):  # 1: no whole words
        lens = rng.integers(1, max_len + 1, (500, 40)) * (rng.random((500, 40)) < 0.8)
        lens = np.sort(lens, axis=1)[:, ::-1].copy() if max_len == 9 else lens  # long words first
        target = rng.integers(0, 25, 500)
        np.testing.assert_array_equal(_take_words(lens, target), _greedy_by_loop(lens, target))


def test_document_numbers_of_packed_rows():
    ids = np.array([[CLS, 10, 11, SEP, 12, SEP, 13, SEP, 0, 0],
                    [CLS, 10, 11, 12, 13, SEP, 0, 0, 0, 0]])
    attn = (ids != 0).astype(np.int32)
    # A [SEP] belongs to the document it ends; padding stays 0.
    np.testing.assert_array_equal(number_documents(ids, attn, SEP),
                                  [[1, 1, 1, 1, 2, 2, 3, 3, 0, 0],
                                   [1, 1, 1, 1, 1, 1, 0, 0, 0, 0]])


def _random_rows(rng, n, t, vocab):
    """Rows like real ones: [CLS] A [SEP] B [SEP] then padding, ids outside the specials."""
    lengths = rng.integers(8, t + 1, n)
    ids = rng.integers(5, vocab, (n, t))
    attn = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    ids = ids * attn
    rows = np.arange(n)
    ids[:, 0] = CLS
    ids[rows, lengths // 2] = SEP
    ids[rows, lengths - 1] = SEP
    word_starts = rng.random((n, t)) < 0.6
    return ids, attn, word_starts


@pytest.mark.parametrize("whole_word", [False, True])
def test_mask_statistics(whole_word):
    n, t, vocab, p = 10_000, 64, 1000, 12
    rng = np.random.default_rng(0)
    ids, attn, starts = _random_rows(rng, n, t, vocab)
    out = mask_tokens(ids, attn, random_bits(rng, n, t), vocab_size=vocab, mask_id=MASK,
                      special_ids=SPECIALS, max_predictions=p,
                      word_starts=starts if whole_word else None)
    pos, w = out["masked_positions"], out["masked_weights"].astype(bool)
    target = np.minimum(p, np.maximum(1, np.round(attn.sum(1) * 0.15)))
    counts = w.sum(1)
    if whole_word:
        assert (counts <= target).all() and counts.mean() > 0.9 * target.mean()
    else:
        np.testing.assert_array_equal(counts, target)
    assert abs(counts.sum() / attn.sum() - 0.15) < 0.01
    # Slots: real ones first, positions strictly ascending; unused ones all zero.
    assert (np.diff(w.astype(int), axis=1) <= 0).all()
    assert (np.where(w[:, 1:], np.diff(pos, axis=1), 1) > 0).all()
    assert not pos[~w].any() and not out["masked_ids"][~w].any()
    # Never specials or padding; masked_ids are the original ids.
    rows = np.broadcast_to(np.arange(n)[:, None], pos.shape)
    original = ids[rows[w], pos[w]]
    assert attn[rows[w], pos[w]].all() and not np.isin(original, list(SPECIALS)).any()
    np.testing.assert_array_equal(out["masked_ids"][w], original)
    # Only chosen positions change; 80% [MASK], 10% random (a non-special id), 10% unchanged.
    chosen = np.zeros_like(attn, bool)
    chosen[rows[w], pos[w]] = True
    assert (out["input_ids"][~chosen] == ids[~chosen]).all()
    new = out["input_ids"][rows[w], pos[w]]
    is_mask, same = new == MASK, new == original
    assert abs(is_mask.mean() - 0.8) < 0.01
    assert abs(same.mean() - 0.1) < 0.01
    assert abs((~is_mask & ~same).mean() - 0.1) < 0.01
    assert not np.isin(new[~is_mask], list(SPECIALS)).any()
    if whole_word:
        # A word (a start and the ## tokens after it, among non-special real tokens) is chosen
        # whole or not at all.
        candidate = attn.astype(bool) & ~np.isin(ids, list(SPECIALS))
        continues = candidate[:, 1:] & ~starts[:, 1:] & candidate[:, :-1]
        assert (chosen[:, 1:][continues] == chosen[:, :-1][continues]).all()
        assert continues.sum() > 0.3 * candidate.sum()  # the check had words to look at


def test_mask_never_touches_specials_in_tiny_rows():
    # [CLS] x [SEP] with padding: the one candidate is always chosen; a row of only specials
    # predicts nothing.
    ids = np.array([[2, 7, 3, 0, 0], [2, 3, 3, 0, 0]])
    attn = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 0, 0]])
    for seed in range(20):
        out = mask_tokens(ids, attn, random_bits(np.random.default_rng(seed), 2, 5),
                          vocab_size=10, mask_id=MASK, special_ids=SPECIALS, max_predictions=2)
        np.testing.assert_array_equal(out["masked_positions"], [[1, 0], [0, 0]])
        np.testing.assert_array_equal(out["masked_weights"], [[1, 0], [0, 0]])
        np.testing.assert_array_equal(out["input_ids"][:, [0, 2, 3, 4]], ids[:, [0, 2, 3, 4]])
        np.testing.assert_array_equal(out["input_ids"][1], ids[1])


def test_sop_pairs_keep_or_swap_the_order_of_one_document():
    from data.examples import iter_pair_instances

    # Ids rise through each document, so order is visible: A before B <=> max(A) < min(B).
    documents = [[[100 * d + 10 * s + t for t in range(1 + (s + d) % 3)] for s in range(6)]
                 for d in range(1, 60)]
    rng = np.random.default_rng(0)
    labels = []
    for a, b, label in iter_pair_instances(documents, 16, 0.1, rng, sop=True):
        assert a and b and len(a) + len(b) <= 13
        assert {t // 100 for t in a} == {t // 100 for t in b}  # never another document
        assert (max(a) < min(b)) == (label == 0) and (min(a) > max(b)) == (label == 1)
        labels.append(label)
    assert len(labels) > 40 and 0.3 < np.mean(labels) < 0.7


def test_packed_sequences_fill_rows_with_whole_sentences():
    from data.examples import iter_packed_sequences

    sep = 3
    documents = [[[10, 11, 12], [13, 14]], [[20, 21, 22, 23]], [[30] * 9, [31, 32]]]
    # max_seq_len 10: 8 tokens between [CLS] and the final [SEP]; a sentence never splits across
    # rows unless it alone is longer than a row (the 9 x 30).
    assert list(iter_packed_sequences(documents, 10, sep)) == [
        [10, 11, 12, 13, 14], [20, 21, 22, 23], [30] * 8, [30, 31, 32]]
    # Documents that fit together share a row, one [SEP] between them.
    assert list(iter_packed_sequences([[[5, 6]], [[7]], [[8, 9]]], 10, sep)) == [
        [5, 6, sep, 7, sep, 8, 9]]
