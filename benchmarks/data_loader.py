"""Does the data pipeline keep up with training? Tokens/s of the grain loader, per core, against
the train step and against the accelerator hosts of a real run.

    python benchmarks/data_loader.py [--source news] [--batch 32] [--seq 128] [--workers 0,2]
        [--threads 1] [--loader-batches 2000] [--repeats 3] [--train-steps 3]
        [--objective nsp] [--whole-word] [--data-dir ~/.cache/pretrax]

Prepares (or reuses) the source with BERT-base's vocabulary size (30522) and sequence length,
then times (1) `--loader-batches` batches of the train iterator, masks and prefetching included,
for each `--workers` count, `--repeats` times, and (2) a few jit-compiled BERT-base train steps
(model.size=base, float32: bf16 is slower on CPU; `--train-steps 0` skips them) on the same
machine. It prints the loader's tokens/s (batch x seq per batch), the CPU it used (this process
and its grain workers, from psutil) and so its tokens per CPU-second (per core), the train step's
rate and the loader's headroom over it, and how many such cores would feed the hosts of
`HOSTS` for bert_base and bert_large. For a one-core figure run it under `taskset -c 0` with
`--workers 0 --threads 1`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np
import psutil

from configs import bert_base
from data.pretraining import PretrainingData
from models.bert import BertConfig, BertForPreTraining
from data.preparation import prepare
from pretrain.bert import objective, train_flops
from training.step import make_train_step
from training import mesh as mesh_lib
from training.optim import make_optimizer
from training.state import abstract_state, create_train_state

# Tokens/s that one host consumes training bert_base at 50% MFU (issue #15's figures: 6 x 110M
# parameters FLOPs per token against the chips' bf16 peak).
HOSTS = {"TPU v4 host (4 chips)": 0.8e6, "8 x H100 host": 6.0e6}


def _cpu_seconds(proc: psutil.Process) -> float:
    """CPU time of this process and its live children (grain's worker processes)."""
    total = sum(proc.cpu_times()[:2])
    for child in proc.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return total


def loader_rate(data: PretrainingData, batch: int, max_predictions: int, whole_word: bool,
                workers: int, threads: int, n: int) -> tuple[float, float]:
    """-> (batches/s, CPU seconds per second of wall time) over n batches after a warm-up."""
    it = data.train_iterator(batch, seed=0, max_predictions=max_predictions, workers=workers,
                             whole_word=whole_word, threads=threads, prefetch=8)
    for _ in range(20):  # start-up: threads, worker processes, file handles
        next(it)
    proc = psutil.Process()
    cpu, start = _cpu_seconds(proc), time.perf_counter()
    for _ in range(n):
        b = next(it)
    wall = time.perf_counter() - start
    busy = (_cpu_seconds(proc) - cpu) / wall
    it.close()
    assert b["input_ids"].shape == (batch, data.max_seq_len)
    return n / wall, busy


def train_rate(config, vocab_size: int, batch_np: dict, steps: int) -> float:
    with config.unlocked():
        config.model.vocab_size = -(-vocab_size // 128) * 128
        config.model.dtype = "float32"
        config.mesh.data = 1
    mesh = mesh_lib.make_mesh(config.mesh)
    model_cfg = BertConfig.from_model_config(config.model)
    model_fn = lambda rngs: BertForPreTraining(model_cfg, rngs)
    tx = make_optimizer(config.optim, config.train.steps)
    _, shardings, graphdef = abstract_state(model_fn, tx, mesh)
    state, _, _ = create_train_state(model_fn, tx, mesh, 0)
    step_fn = jax.jit(make_train_step(graphdef, tx, objective(), seed=0, grad_accum=1),
                      in_shardings=(shardings, mesh_lib.batch_sharding(mesh)),
                      out_shardings=(shardings, None), donate_argnums=0)
    with jax.set_mesh(mesh):
        batch = mesh_lib.global_batch(batch_np, mesh)
        state, sums = step_fn(state, batch)  # compile
        jax.block_until_ready(sums)
        start = time.perf_counter()
        for _ in range(steps):
            state, sums = step_fn(state, batch)
        jax.block_until_ready(sums)
    return steps / (time.perf_counter() - start)


def large_over_base(vocab_size: int, seq: int, max_predictions: int) -> float:
    """bert_large's training FLOPs per token over bert_base's (pretrain/bert.py train_flops)."""
    flops = {size: train_flops(BertConfig.of_size(size, vocab_size), 1, seq, max_predictions)
             for size in ("base", "large")}
    return flops["large"] / flops["base"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default="news")
    p.add_argument("--data-dir", default="~/.cache/pretrax")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--workers", default="0,2", help="comma-separated worker-process counts")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--loader-batches", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--train-steps", type=int, default=3)
    p.add_argument("--objective", default="nsp", help="nsp | sop | mlm_packed")
    p.add_argument("--whole-word", action="store_true", help="whole-word masking")
    args = p.parse_args()

    config = bert_base.get_config()
    dc = config.data
    dc.source, dc.data_dir, dc.max_seq_len = args.source, args.data_dir, args.seq
    dc.objective = args.objective
    start = time.perf_counter()
    data = PretrainingData(prepare(dc))
    print(f"prepare (or cache): {time.perf_counter() - start:.1f} s")

    tokens = args.batch * args.seq
    per_core, loader = {}, {}
    for workers in [int(w) for w in args.workers.split(",")]:
        runs = [loader_rate(data, args.batch, dc.max_predictions, args.whole_word, workers,
                            args.threads, args.loader_batches) for _ in range(args.repeats)]
        rates = [r for r, _ in runs]
        per_core[workers] = statistics.median(r * tokens / busy for r, busy in runs)
        loader[workers] = statistics.median(rates)
        print(f"loader {args.objective}{' whole-word' if args.whole_word else ''} "
              f"workers={workers} threads={args.threads}: "
              f"{statistics.median(rates) * tokens:>11,.0f} tokens/s median "
              f"[{min(rates) * tokens:,.0f}, {max(rates) * tokens:,.0f}] of {args.repeats} x "
              f"{args.loader_batches} batches of {args.batch} x {args.seq}; "
              f"{statistics.median(b for _, b in runs):.2f} cores busy; "
              f"{per_core[workers]:,.0f} tokens per CPU-second")

    if args.train_steps:
        batch = data.batch(0, args.batch, seed=0, max_predictions=dc.max_predictions)
        train = train_rate(config, data.tokenizer.vocab_size, batch, args.train_steps)
        best = max(loader.values())
        print(f"train step: {train:8.4f} steps/s    (bert_base float32, {args.train_steps} steps "
              f"after compiling, {jax.device_count()} {jax.devices()[0].platform} device(s))")
        print(f"headroom:   {best / train:8.1f}x  (loader batches/s / train steps/s)")

    ratio = large_over_base(dc.vocab_size, args.seq, dc.max_predictions)
    rate = per_core[min(per_core)]
    print(f"cores to feed a host at {rate:,.0f} tokens per core-second (workers={min(per_core)}); "
          f"bert_large consumes bert_base's tokens/s / {ratio:.3f} (training FLOPs per token):")
    for host, base_rate in HOSTS.items():
        for model, consumed in (("bert_base", base_rate), ("bert_large", base_rate / ratio)):
            print(f"  {host:22s} {model:10s} {consumed:>11,.0f} tokens/s -> "
                  f"{consumed / rate:5.2f} cores")


if __name__ == "__main__":
    main()
