"""The files of a HuggingFace model folder, written and read without torch.

`models/hf.py` decides which tensors an export holds and what they are called; this module only
puts bytes on disk and takes them back: a streaming safetensors writer (one tensor in host
memory at a time), the shard plan, a folder that appears whole or not at all, the reading of
safetensors files (never a pickle: those can run code when loaded), and the BERT tokenizer files
that `transformers.AutoTokenizer` loads.

Facts checked on transformers 5.23: `BertTokenizer` rebuilds its normalizer from
`tokenizer_config.json` (do_lower_case, strip_accents, tokenize_chinese_chars) and takes only the
vocabulary and post-processor from `tokenizer.json`, so the two files must agree; the writer
checks that they do.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
import shutil
import sys
import tempfile
from pathlib import Path

import ml_dtypes
import numpy as np
from etils import epath

from models.hf_table import ConversionError
from models.tokenizer import Tokenizer, read_vocab


# dtype name -> (numpy dtype, safetensors dtype code)
DTYPES = {"float32": (np.dtype("<f4"), "F32"), "float16": (np.dtype("<f2"), "F16"),
          "bfloat16": (np.dtype(ml_dtypes.bfloat16), "BF16")}
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # HuggingFace's long-standing "5GB"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# Everything an export (with its tokenizer or image processor) writes; a folder holding only these is replaceable.
EXPORT_FILES = re.compile(r"^(config\.json|model\.safetensors|model-\d{5}-of-\d{5}\.safetensors|"
                          r"model\.safetensors\.index\.json|vocab\.txt|tokenizer\.json|"
                          r"tokenizer_config\.json|special_tokens_map\.json|preprocessor_config\.json|"
                          r"model\.int8\.safetensors|quantization\.json)$")  # + `quantize`'s


# =============================================================================================
# safetensors
# =============================================================================================


def shard_names(count: int) -> list[str]:
    return (["model.safetensors"] if count == 1 else
            [f"model-{k + 1:05d}-of-{count:05d}.safetensors" for k in range(count)])


def plan_shards(sizes: list[int], max_bytes: int) -> list[list[int]]:
    """Greedy, in table order; a tensor larger than `max_bytes` gets a shard of its own."""
    shards, current, used = [], [], 0
    for i, size in enumerate(sizes):
        if current and used + size > max_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(i)
        used += size
    shards.append(current)
    return shards


def write_safetensors(path: Path, specs, arrays, st_dtype: str, np_dtype) -> None:
    """A safetensors file written tensor by tensor: the header comes from the (name, shape)
    `specs`, then each of `arrays` is pulled, written and dropped."""
    header, offset = {}, 0
    for name, shape in specs:
        nbytes = math.prod(shape) * np_dtype.itemsize
        header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as the reference writer does
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for (name, shape), array in zip(specs, arrays):
            if array.shape != tuple(shape) or array.dtype != np_dtype:
                raise ConversionError(f"{name}: produced {array.shape} {array.dtype}, planned {shape}")
            # Contiguous, always: the bytes of a view (a transposed kernel) are not in its order.
            array = np.ascontiguousarray(array)
            if sys.byteorder != "little":
                array = array.byteswap()
            f.write(array.reshape(-1).view(np.uint8).data)  # bytes, no copy (bf16 has no buffer)
        if f.tell() != 8 + len(blob) + offset:
            raise ConversionError(f"{path.name}: wrote {f.tell()} bytes, planned {8 + len(blob) + offset}")


def safetensors_files(hf_dir: Path) -> list[Path]:
    """The weight files of a folder, single or sharded; a folder of pickles only is refused."""
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        files = [hf_dir / f for f in dict.fromkeys(weight_map.values())]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise ConversionError(f"{index} names {absent[0]}, which is not in {hf_dir}")
        return files
    if (hf_dir / "model.safetensors").is_file():
        return [hf_dir / "model.safetensors"]
    pickles = sorted(p.name for p in hf_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ConversionError(f"{hf_dir} holds only pickle weights ({pickles[0]}), which can run code "
                              f"when loaded and are never read here; convert them to safetensors first")
    raise ConversionError(f"{hf_dir} has no model.safetensors or model.safetensors.index.json")


# =============================================================================================
# The folder
# =============================================================================================


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def check_out_dir(out_dir: Path) -> None:
    """Refuse to replace a folder that holds anything but a previous export."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ConversionError(f"{out_dir} exists and is not a folder")
    strangers = [p.name for p in out_dir.iterdir() if not (p.is_file() and EXPORT_FILES.match(p.name))]
    if strangers:
        raise ConversionError(f"{out_dir} is not empty and not a previous export (it holds "
                              f"{sorted(strangers)[0]!r}); choose a new --out folder")


@contextlib.contextmanager
def staged(out_dir):
    """Yield a temp folder beside `out_dir`; on success it replaces `out_dir`, on failure it goes."""
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(out_dir, "tmp")
    tmp.mkdir()  # not mkdtemp: the folder keeps the umask's permissions, not 0700
    try:
        yield tmp
        if out_dir.exists():
            check_out_dir(out_dir)  # again: something may have appeared while we wrote
            old = _sibling(out_dir, "old")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _sibling(path: Path, what: str) -> Path:
    return path.with_name(f".{path.name}.{what}-{os.getpid()}-{secrets.token_hex(4)}")


# =============================================================================================
# Tokenizer
# =============================================================================================

SPECIAL_TOKENS = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
                  "cls_token": "[CLS]", "mask_token": "[MASK]"}


def export_tokenizer(tokenizer_dir_or_vocab, out_dir, do_lower_case: bool | None = None,
                     model_max_length: int = 512) -> Path:
    """Write vocab.txt, tokenizer.json, tokenizer_config.json and special_tokens_map.json so that
    `transformers.AutoTokenizer.from_pretrained(out_dir)` gives a BertTokenizer with our ids.

    The source is a folder with vocab.txt and/or tokenizer.json (as `models.tokenizer.Tokenizer.save`
    writes) or a vocab.txt. `do_lower_case=None` takes the casing from tokenizer.json (or the
    folder's tokenizer_config.json), else True. `out_dir` may be an export: only the tokenizer
    files in it are replaced.
    """
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.tok-", dir=out_dir.parent) as tmp:
        write_tokenizer(tokenizer_dir_or_vocab, Path(tmp), do_lower_case, model_max_length)
        for name in TOKENIZER_FILES:
            if (Path(tmp) / name).exists():
                os.replace(Path(tmp) / name, out_dir / name)
    return out_dir


def write_tokenizer(src, dest: Path, do_lower_case: bool | None = None, model_max_length: int = 512,
                    model_vocab_size: int | None = None) -> None:
    """The tokenizer files in `dest`, after checking that transformers will give our ids.

    vocab.txt and tokenizer.json come from `models.tokenizer.Tokenizer` (loaded from the
    source's tokenizer.json, or built over its vocab.txt), so an export tokenizes as training did.
    """
    src = epath.Path(src)  # a local folder or a gs:// one
    folder = src if src.is_dir() else src.parent
    vocab_file = src if src.is_file() else folder / "vocab.txt"
    json_file = folder / "tokenizer.json"
    tok_json = json.loads(json_file.read_text(encoding="utf-8")) if json_file.is_file() else None
    if not vocab_file.is_file() and tok_json is None:
        raise ConversionError(f"{src} has neither vocab.txt nor tokenizer.json")
    if tok_json is not None and (tok_json.get("model") or {}).get("type") == "BPE":
        _write_bpe_tokenizer(folder, dest, model_max_length, model_vocab_size)
        return

    normalizer = {}
    if tok_json is not None:
        normalizer = _check_bert_tokenizer_json(tok_json, json_file)
    if do_lower_case is None:
        old_config = folder / "tokenizer_config.json"
        if "lowercase" in normalizer:
            do_lower_case = bool(normalizer["lowercase"])
        elif old_config.is_file():
            do_lower_case = bool(json.loads(old_config.read_text()).get("do_lower_case", True))
        else:
            do_lower_case = True
    if "lowercase" in normalizer and bool(normalizer["lowercase"]) != do_lower_case:
        raise ConversionError(f"{json_file} lowercases={normalizer['lowercase']} but "
                              f"do_lower_case={do_lower_case} was asked for")

    if vocab_file.is_file():
        tokens = read_vocab(vocab_file)
    else:
        vocab = tok_json["model"]["vocab"]
        tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
        if [vocab[t] for t in tokens] != list(range(len(tokens))):
            raise ConversionError(f"{json_file} vocabulary ids are not 0..{len(tokens) - 1}")
    if len(set(tokens)) != len(tokens):
        seen = set()
        repeated = next(t for t in tokens if t in seen or seen.add(t))
        raise ConversionError(f"{vocab_file} lists the token {repeated!r} twice")
    if tok_json is not None and tok_json["model"]["vocab"] != {t: i for i, t in enumerate(tokens)}:
        raise ConversionError(f"{vocab_file} and {json_file} hold different vocabularies")
    missing = [t for t in SPECIAL_TOKENS.values() if t not in tokens]
    if missing:
        raise ConversionError(f"the vocabulary lacks the special token {missing[0]}")
    if model_vocab_size is not None and len(tokens) > model_vocab_size:
        raise ConversionError(f"the tokenizer has {len(tokens)} tokens but the model only "
                              f"{model_vocab_size} embeddings")

    tok = Tokenizer.load(folder) if tok_json is not None else Tokenizer.from_vocab(tokens, do_lower_case)
    if tok.vocab_size != len(tokens):
        raise ConversionError(f"{json_file} adds tokens beyond its {len(tokens)}-token vocabulary")
    tok.save(dest)
    config = {"tokenizer_class": "BertTokenizer", "do_lower_case": do_lower_case,
              "strip_accents": normalizer.get("strip_accents"),
              "tokenize_chinese_chars": normalizer.get("handle_chinese_chars", True),
              "model_max_length": model_max_length, "clean_up_tokenization_spaces": True,
              **SPECIAL_TOKENS}
    write_json(dest / "tokenizer_config.json", config)
    write_json(dest / "special_tokens_map.json", SPECIAL_TOKENS)


def _write_bpe_tokenizer(folder, dest: Path, model_max_length: int, model_vocab_size: int | None) -> None:
    """A byte-level BPE (models/tokenizer.py's ModernBERT option): its tokenizer.json, which
    transformers' PreTrainedTokenizerFast runs unchanged, and the special tokens named.

    One change: [MASK] takes the space before it (lstrip, as in ModernBERT's released tokenizer).
    Training masks whole tokens such as "ĠMonday"; without it "on [MASK] that" would give the
    model a lone "Ġ" before the mask, which it never saw, and fill-mask would guess word pieces.
    """
    tok = Tokenizer.load(folder)
    if model_vocab_size is not None and tok.vocab_size > model_vocab_size:
        raise ConversionError(f"the tokenizer has {tok.vocab_size} tokens but the model only "
                              f"{model_vocab_size} embeddings")
    tok.save(dest)  # tokenizer.json and a tokenizer_config.json for PreTrainedTokenizerFast
    spec = json.loads((dest / "tokenizer.json").read_text(encoding="utf-8"))
    for added in spec["added_tokens"]:
        added["lstrip"] = added["lstrip"] or added["content"] == SPECIAL_TOKENS["mask_token"]
    write_json(dest / "tokenizer.json", spec)
    config = json.loads((dest / "tokenizer_config.json").read_text())
    write_json(dest / "tokenizer_config.json", {**config, "model_max_length": model_max_length})
    write_json(dest / "special_tokens_map.json", SPECIAL_TOKENS)


def _check_bert_tokenizer_json(tok: dict, where: Path) -> dict:
    """BertTokenizer keeps only the vocabulary of tokenizer.json and rebuilds the rest as BERT's:
    refuse a tokenizer.json that would then tokenize differently. Returns its BertNormalizer."""
    model, norm, pre = tok.get("model") or {}, tok.get("normalizer") or {}, tok.get("pre_tokenizer") or {}
    problems = []
    if model.get("type") != "WordPiece":
        problems.append(f"model {model.get('type')}")
    elif model.get("continuing_subword_prefix", "##") != "##" or model.get("unk_token") != "[UNK]":
        problems.append("a WordPiece without '##' continuations and [UNK]")
    elif model.get("max_input_chars_per_word", 100) != 100:
        problems.append(f"max_input_chars_per_word {model.get('max_input_chars_per_word')}")
    if norm.get("type") != "BertNormalizer" or not norm.get("clean_text", True):
        problems.append(f"normalizer {norm.get('type')}")
    if pre.get("type") != "BertPreTokenizer":
        problems.append(f"pre-tokenizer {pre.get('type')}")
    if problems:
        raise ConversionError(f"{where} is not a BERT WordPiece tokenizer ({problems[0]}); "
                              f"transformers' BertTokenizer would tokenize differently")
    return norm
