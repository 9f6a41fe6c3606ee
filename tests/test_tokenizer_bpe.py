"""ModernBERT's byte-level BPE option: trained on the corpus, loaded back and by transformers."""

import subprocess
import sys
from pathlib import Path

import pytest

from data.corpora import pydocs_documents
from models.tokenizer import SPECIAL_TOKENS, Tokenizer

TEXTS = [
    "Héllo, Wörld! Café naïve RÉSUMÉ façade",
    "東京 is in 日本。 한국어 and Ελληνικά 😀",
    "  two  spaces\tand a tab\nand lines [MASK] <b>",
    "Return the Value of x; see os.path.join()",
]


@pytest.fixture(scope="module")
def bpe():
    return Tokenizer.train(pydocs_documents()[:400], vocab_size=1000, kind="bpe")


def test_bpe_specials_cased_bytes_and_no_unknowns(bpe):
    assert bpe.kind == "bpe" and bpe.vocab_size == 1000
    assert [bpe.id_to_token(i) for i in range(5)] == list(SPECIAL_TOKENS)
    for text in TEXTS:
        ids = bpe.encode(text)
        assert bpe.unk_id not in ids           # every byte is in the alphabet
        assert bpe.decode(ids, skip_special_tokens=False) == text  # byte-level: lossless, case and spaces kept
    assert bpe.encode("Value") != bpe.encode("value")
    ids, types = bpe.encode_pair("a b", None, 16)
    assert ids[0] == bpe.cls_id and ids[-1] == bpe.sep_id and set(types) == {0}
    # word starts: the token after a space starts a word, the rest of a long word does not
    word = bpe.encode(" unbelievablyxyzzy")
    assert list(bpe.word_starts(word)) == [True] + [False] * (len(word) - 1)


def test_bpe_saved_folder_loads_here_and_in_auto_tokenizer(bpe, tmp_path):
    from transformers import AutoTokenizer

    bpe.save(tmp_path)
    assert not (tmp_path / "vocab.txt").exists()
    loaded = Tokenizer.load(tmp_path)
    assert loaded.kind == "bpe" and loaded.encode_batch(TEXTS) == bpe.encode_batch(TEXTS)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert (hf.cls_token_id, hf.sep_token_id, hf.pad_token_id, hf.mask_token_id, hf.unk_token_id) == \
        (bpe.cls_id, bpe.sep_id, bpe.pad_id, bpe.mask_id, bpe.unk_id)
    for text in TEXTS:
        assert hf(text)["input_ids"] == bpe.encode_pair(text, None, 512)[0], text
    # [MASK] in a text is the mask token, not five bytes (as in transformers' ModernBERT)
    assert hf("a [MASK] b", add_special_tokens=False)["input_ids"].count(bpe.mask_id) == 1
    assert bpe.encode("a [MASK] b").count(bpe.mask_id) == 1


def test_the_export_masks_a_whole_word_as_training_did(bpe, tmp_path):
    """fill-mask on an export: "on [MASK] that" must be the ids training makes when it masks the
    word after "on" (a "Ġword" token), with no lone "Ġ" before the mask."""
    from transformers import AutoTokenizer

    from models.hf import export_tokenizer
    bpe.save(tmp_path / "run")
    export_tokenizer(tmp_path / "run", tmp_path / "hf")
    want = bpe.encode("said on") + [bpe.mask_id] + bpe.encode(" that")
    exported = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert exported("said on [MASK] that", add_special_tokens=False)["input_ids"] == want
    for text in TEXTS:  # and everything without a mask exactly as training tokenized it
        if "[MASK]" not in text:
            assert exported(text)["input_ids"] == bpe.encode_pair(text, None, 512)[0], text
    # negative control: the run's own folder keeps the space as a token of its own
    spaced = AutoTokenizer.from_pretrained(tmp_path / "run")("said on [MASK] that", add_special_tokens=False)
    assert spaced["input_ids"] != want and bpe.encode(" ")[0] in spaced["input_ids"]


def test_bpe_ids_are_the_same_in_every_process():
    code = ("from models.tokenizer import Tokenizer; "
            "t = Tokenizer.train(['qwe rty uio pas dfg hjk lzx cvb nm ' * 3] * 20, 300, kind='bpe'); "
            "print([t.id_to_token(i) for i in range(t.vocab_size)])")
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           cwd=Path(__file__).resolve().parents[1]).stdout for _ in range(4)}
    assert len(runs) == 1


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="choose one of wordpiece, bpe"):
        Tokenizer.train(["a b"], 100, kind="unigram")
