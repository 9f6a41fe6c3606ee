"""`python -m models.hf export|quantize`: a training run's checkpoint as a HuggingFace model
folder, in float or with int8 weights (models/quantize.py).

The command line apart from the conversion library (models/hf.py): only this module reads
checkpoints (training.checkpoint), so the library stays importable without the trainers' code.
"""

from __future__ import annotations

import argparse
import re
import sys

from infra import storage
from infra.errors import UserError
from models.quantize import HfQuantizer
from models.hf import (DEFAULT_MAX_SHARD_BYTES, DTYPES, ConversionError, check_out_dir, export_run,
                       records)
from training import run_record
from training.checkpoint_reader import load_checkpoint_params


def _parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 2GB, 500MB, 1000000)")
    unit = (m.group(2) or "").upper().rstrip("B")
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
             "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    return int(float(m.group(1)) * scale)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m models.hf", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="write a checkpoint as a HuggingFace model folder")
    quantize = commands.add_parser(
        "quantize", help="the same, with int8 weights: dequantised in model.safetensors (for "
                         "transformers), integers and scales in model.int8.safetensors")
    quantize.add_argument("--qtype", default="int8", help="the integer type (int8)")
    for command in (export, quantize):
        _common_arguments(command)
    args = parser.parse_args(argv)

    try:
        quantizer = HfQuantizer(args.qtype) if args.command == "quantize" else None
        storage.check_writable(storage.as_path(args.out).parent, "--out")  # before any work
        out = args.out
        if storage.is_remote(out):  # safetensors and the staged rename want a local folder
            check_out_dir(storage.as_path(out))
            out = storage.mirror_path(out)
        params, model_config, tokenizer_dir, kind = load_checkpoint_params(args.checkpoint)
        run_config = {**_run_config(args.checkpoint), "model": model_config}
        out, architecture = export_run(
            params, run_config, out, kind=kind, architecture=args.architecture,
            dtype=args.dtype, max_shard_bytes=args.max_shard_size,
            id2label=args.labels.split(",") if args.labels else None, tokenizer=tokenizer_dir,
            transform=quantizer and quantizer.transform, write_more=quantizer and quantizer.write_more)
        processor = (out / "preprocessor_config.json").is_file()
        if storage.is_remote(args.out):
            storage.upload(out, args.out, replace=True)
            out = args.out
    except (ConversionError, UserError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    what = f"{architecture} ({kind} checkpoint)" if kind else architecture
    note = (" with its image processor" if processor else
            "" if tokenizer_dir else " (no tokenizer found)")
    print(f"wrote {what} to {out}{note}")
    if quantizer:
        print(f"{args.qtype} weights: {quantizer.bytes:,} bytes, {quantizer.bytes / quantizer.float32_bytes:.1%} "
              f"of float32's {quantizer.float32_bytes:,} (model.int8.safetensors; quantization.json)")


def _common_arguments(export) -> None:
    export.add_argument("--checkpoint", required=True,
                        help="a pretraining/fine-tuning workdir or one checkpoints/<step> folder")
    export.add_argument("--out", required=True, help="the folder to write (new, or a previous export)")
    export.add_argument("--architecture",
                        choices=sorted(a for family in records().values() for a in family.architectures),
                        help="default: from the parameters (classifier / NSP head or MAE decoder / "
                             "encoder only)")
    export.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    export.add_argument("--max-shard-size", type=_parse_bytes, default=DEFAULT_MAX_SHARD_BYTES,
                        help="split model.safetensors past this size (e.g. 2GB)")
    export.add_argument("--labels", help="comma-separated class names, in class-id order")


def _run_config(checkpoint) -> dict:
    """The resolved config (training/run_record.py) of the run that wrote `checkpoint` (its workdir,
    its checkpoints folder or one checkpoints/<step> folder, as training.checkpoint resolves
    them), or {} where none is."""
    src = storage.as_path(checkpoint)
    if not src.is_dir():
        return {}
    workdir = (src if (src / "checkpoints").is_dir() else
               src.parent.parent if src.name.isdigit() else src.parent)
    return run_record.read(workdir)[0] if (workdir / "config.json").is_file() else {}


if __name__ == "__main__":
    main()
