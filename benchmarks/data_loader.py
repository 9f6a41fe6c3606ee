"""Does the data pipeline keep up with training? Batches/s of the grain loader vs the train step.

    python benchmarks/data_loader.py [--source news] [--batch 32] [--seq 128] [--workers 0]
        [--loader-batches 200] [--train-steps 3] [--data-dir ~/.cache/pretrax]

Prepares (or reuses) the source with BERT-base's vocabulary size (30522) and sequence length,
then times (1) `--loader-batches` batches of the train iterator, masks and prefetching included,
and (2) a few jit-compiled BERT-base train steps (model.size=base, float32: bf16 is slower on CPU)
on the same machine, and prints both rates and their ratio (the loader's headroom).
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from configs import bert_base
from data.pretraining import PretrainingData
from models.bert import BertConfig, BertForPreTraining
from pretrain.prepare import prepare
from pretrain.bert import objective
from training.step import make_train_step
from training import mesh as mesh_lib
from training.optim import make_optimizer
from training.state import abstract_state, create_train_state


def loader_rate(data: PretrainingData, batch: int, max_predictions: int, workers: int,
                n: int) -> float:
    it = data.train_iterator(batch, seed=0, max_predictions=max_predictions, workers=workers,
                             prefetch=8)
    for _ in range(5):  # start-up: threads, worker processes, file handles
        next(it)
    start = time.perf_counter()
    for _ in range(n):
        b = next(it)
    rate = n / (time.perf_counter() - start)
    it.close()
    assert b["input_ids"].shape == (batch, data.max_seq_len)
    return rate


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default="news")
    p.add_argument("--data-dir", default="~/.cache/pretrax")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--loader-batches", type=int, default=200)
    p.add_argument("--train-steps", type=int, default=3)
    args = p.parse_args()

    config = bert_base.get_config()
    dc = config.data
    dc.source, dc.data_dir, dc.max_seq_len = args.source, args.data_dir, args.seq
    start = time.perf_counter()
    data = PretrainingData(prepare(dc))
    print(f"prepare (or cache): {time.perf_counter() - start:.1f} s")

    loader = loader_rate(data, args.batch, dc.max_predictions, args.workers, args.loader_batches)
    print(f"loader:     {loader:8.2f} batches/s  ({args.batch} x {args.seq}, workers={args.workers}, "
          f"{args.loader_batches} batches)")
    batch = data.batch(0, args.batch, seed=0, max_predictions=dc.max_predictions)
    train = train_rate(config, data.tokenizer.vocab_size, batch, args.train_steps)
    print(f"train step: {train:8.4f} steps/s    (bert_base float32, {args.train_steps} steps after "
          f"compiling, {jax.device_count()} {jax.devices()[0].platform} device(s))")
    print(f"headroom:   {loader / train:8.1f}x  (loader batches/s / train steps/s)")


if __name__ == "__main__":
    main()
