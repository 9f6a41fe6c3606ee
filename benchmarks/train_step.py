"""BERT pretraining train-step throughput: Pretrax (JAX) against transformers' PyTorch model.

    python benchmarks/train_step.py                   # the must-show rows: base 8x128, mini 32x128
    python benchmarks/train_step.py --sweep           # tiny, mini, base at several batches, 128 and 512
    python benchmarks/train_step.py --sweep --large   # and bert_large
    python benchmarks/train_step.py --rows base:8:128,mini:32:512 --rounds 5 --steps 3
    python benchmarks/train_step.py --attention-paths  # one layer's attention, each path, fwd+bwd

One process. For each row (size, batch, sequence length) both sides build the same model config
(BERT's shapes, vocabulary 30522, exact GELU, LayerNorm eps 1e-12, `--dropout` on both), the
same batch (token ids, segment ids, the same masked positions replaced by [MASK], NSP labels) and
the same optimizer (AdamW, b1 0.9, b2 0.999, eps 1e-6, weight decay 0.01 on matrices only, global
norm clip 1.0, constant lr). The two train steps are then timed in alternating rounds, so a busy
machine slows both alike, and the table reports the median round.

  pretrax       models/bert.py BertForPreTraining under training/step.py's train step, jit
                with donated state; vocabulary logits only at the masked positions (as BERT did)
  transformers  BertForPreTraining (its default attention, SDPA) in float32 eager PyTorch,
                torch.set_num_threads(--torch-threads), fused AdamW, labels -100 off the masked
                positions (transformers computes logits at every position, then drops them)

FLOPs (pretrain/bert.py `train_flops`, the one formula, also behind perf/mfu in training runs):
matmul FLOPs only, 2 per multiply-add, backward = 2x forward, so a step is 3x the forward's
    B*T * L * (2*(4*D^2 + 2*D*F) + 4*T*D)    projections, feed-forward, attention scores + mix
  + B*P * 2*(D^2 + D*V)                        MLM transform and tied vocabulary projection
where P is the number of positions that get vocabulary logits: the masked slots for pretrax, all
T for transformers. MFU is each side's own FLOPs over the step time, against the float32 (or
`--dtype`) matmul peak measured in this run: one 2048^2 matmul timed as a third side in the same
alternating rounds, so it sees the same load as the two steps (the header's figure is
training/perf.py `matmul_peak` before the rows); "x tf" is pretrax's throughput over
transformers' in the same row.

Peak memory: XLA's buffer plan for the compiled step (arguments + outputs + temporaries -
donated aliases) on CPU, the device's peak bytes in use on accelerators; for PyTorch the CUDA
allocator's peak on GPU, "-" on CPU (no per-step figure there). Compile: XLA's lower + compile;
for PyTorch the first (warm-up) step.
Later model families (MAE: benchmarks/mae_throughput.py) are to join this script as rows.
"""

from __future__ import annotations

import argparse
import math
import time

import jax
import ml_collections
import numpy as np

from models.bert import BertConfig, BertForPreTraining, segment_mask
from models.layers import dot_product_attention
from pretrain.bert import objective, train_flops
from training import mesh as mesh_lib
from training.optim import make_optimizer
from training.perf import matmul_peak
from training.state import create_train_state
from training.step import make_train_step

VOCAB = 30522
MASK_ID = 103
DEFAULT_ROWS = "base:8:128,mini:32:128"
SWEEP_ROWS = ("tiny:32:128,tiny:128:128,mini:32:128,mini:128:128,base:8:128,base:32:128,"
              "tiny:8:512,mini:8:512,base:4:512")
LARGE_ROWS = "large:4:128,large:2:512"
OPTIM = dict(lr=1e-4, warmup_steps=0, decay="constant", end_lr_ratio=0.0, weight_decay=0.01,
             b1=0.9, b2=0.999, eps=1e-6, clip_norm=1.0)


def predictions(seq_len: int) -> int:
    return math.ceil(0.15 * seq_len)  # BERT's 15%: 20 of 128, 77 of 512


def make_batch(batch: int, seq_len: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random token ids with 15% of the positions (never [CLS]) masked; two segments; no padding."""
    rng = np.random.default_rng(seed)
    P = predictions(seq_len)
    ids = rng.integers(1000, VOCAB, (batch, seq_len)).astype(np.int32)
    ids[:, 0] = 101
    positions = np.sort(np.stack([rng.choice(np.arange(1, seq_len), P, replace=False)
                                  for _ in range(batch)]), axis=1).astype(np.int32)
    masked_ids = np.take_along_axis(ids, positions, axis=1)
    np.put_along_axis(ids, positions, MASK_ID, axis=1)
    types = np.zeros((batch, seq_len), np.int32)
    types[:, seq_len // 2:] = 1
    return {"input_ids": ids, "token_type_ids": types,
            "attention_mask": np.ones((batch, seq_len), np.int32),
            "masked_positions": positions, "masked_ids": masked_ids.astype(np.int32),
            "masked_weights": np.ones((batch, P), np.float32),
            "next_sentence_labels": rng.integers(0, 2, batch).astype(np.int32)}


# ---------------------------------------------------------------------------------------------
# The two sides: each returns (step(), compile seconds, peak bytes or None)
# ---------------------------------------------------------------------------------------------

def pretrax_side(cfg: BertConfig, batch: dict, mesh):
    tx = make_optimizer(ml_collections.ConfigDict(OPTIM), 1000)
    model_fn = lambda rngs: BertForPreTraining(cfg, rngs)
    state, shardings, graphdef = create_train_state(model_fn, tx, mesh, seed=0)
    step = jax.jit(make_train_step(graphdef, tx, objective(), seed=0),
                   in_shardings=(shardings, mesh_lib.batch_sharding(mesh)),
                   out_shardings=(shardings, None), donate_argnums=0)
    data = mesh_lib.global_batch(batch, mesh)
    start = time.perf_counter()
    compiled = step.lower(state, data).compile()
    compile_s = time.perf_counter() - start
    peak = _xla_peak_bytes(compiled)
    box = [state]

    def run(n):
        s = box[0]
        for _ in range(n):
            s, out = compiled(s, data)
        jax.block_until_ready(out)
        box[0] = s
        return float(out["sums"]["mlm_loss"]) / float(out["sums"]["mlm_count"])

    run(1)
    return run, compile_s, peak


def _xla_peak_bytes(compiled) -> int | None:
    stats = jax.devices()[0].memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"]
    m = compiled.memory_analysis()
    if m is None:
        return None
    return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
            - m.alias_size_in_bytes)


def transformers_side(cfg: BertConfig, batch: dict, dtype: str):
    import torch
    import transformers

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf_cfg = transformers.BertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
        hidden_act="gelu", max_position_embeddings=cfg.max_position, layer_norm_eps=cfg.layer_norm_eps,
        hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.attention_dropout)
    model = transformers.BertForPreTraining(hf_cfg).to(device).train()
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": OPTIM["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=OPTIM["lr"], betas=(OPTIM["b1"], OPTIM["b2"]), eps=OPTIM["eps"],
                            fused=True)
    labels = np.full(batch["input_ids"].shape, -100, np.int64)
    np.put_along_axis(labels, batch["masked_positions"], batch["masked_ids"], axis=1)
    t = lambda x: torch.as_tensor(np.asarray(x, np.int64), device=device)
    inputs = dict(input_ids=t(batch["input_ids"]), token_type_ids=t(batch["token_type_ids"]),
                  attention_mask=t(batch["attention_mask"]), labels=t(labels),
                  next_sentence_label=t(batch["next_sentence_labels"]))
    autocast = torch.autocast(device, dtype=getattr(torch, dtype), enabled=dtype != "float32")

    def run(n):
        for _ in range(n):
            with autocast:
                out = model(**inputs)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM["clip_norm"])
            opt.step()
            opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return out.loss.item()

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    run(1)
    compile_s = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return run, compile_s, peak


# ---------------------------------------------------------------------------------------------
# Timing and the table
# ---------------------------------------------------------------------------------------------

def matmul_side(dtype: str, n: int = 2048):
    import jax.numpy as jnp

    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    return lambda reps: jax.block_until_ready([f(a) for _ in range(reps)]), 2 * n ** 3


def time_row(sides: dict, rounds: int, steps: int) -> dict[str, float]:
    """Median seconds per step of each side, timed in alternating rounds."""
    times = {name: [] for name in sides}
    for _ in range(rounds):
        for name, run in sides.items():
            start = time.perf_counter()
            run(steps)
            times[name].append((time.perf_counter() - start) / steps)
    return {name: float(np.median(t)) for name, t in times.items()}


def attention_paths(rows: str, rounds: int, steps: int, dtype: str) -> None:
    """Forward + backward of one layer's attention (packed rows: two documents each), per path."""
    import jax.numpy as jnp

    paths = ("reference", "xla") + (("cudnn",) if jax.default_backend() == "gpu" and dtype != "float32" else ())
    print(f"{'size':<6} {'batch':>5} {'seq':>4} " + " ".join(f"{p + ' ms':>12}" for p in paths))
    for row in rows.split(","):
        size, B, T = row.split(":")
        B, T = int(B), int(T)
        cfg = BertConfig.of_size(size, VOCAB)
        rng = np.random.default_rng(0)
        q, k, v = (jnp.asarray(rng.normal(size=(B, T, cfg.num_heads, cfg.head_size)), dtype) for _ in range(3))
        mask = segment_mask(jnp.asarray(np.where(np.arange(T) < T // 3, 1, 2)[None].repeat(B, 0)))
        loss = lambda p: lambda *qkv: jnp.sum(dot_product_attention(
            *qkv, dtype=dtype, mask_BTS=mask, implementation=p).astype(jnp.float32) ** 2)
        runs = {}
        for p in paths:
            f = jax.jit(jax.grad(loss(p), (0, 1, 2)))
            jax.block_until_ready(f(q, k, v))
            runs[p] = lambda n, f=f: jax.block_until_ready([f(q, k, v) for _ in range(n)])
        step_s = time_row(runs, rounds, steps)
        print(f"{size:<6} {B:>5} {T:>4} " + " ".join(f"{step_s[p] * 1e3:>12.1f}" for p in paths), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default=None, help=f"size:batch:seq,... (default {DEFAULT_ROWS})")
    p.add_argument("--sweep", action="store_true", help="tiny, mini, base at several batches, 128 and 512")
    p.add_argument("--large", action="store_true", help="add bert_large rows")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=2, help="timed steps per round")
    p.add_argument("--dtype", default="float32", help="compute dtype of both sides")
    p.add_argument("--dropout", type=float, default=0.0, help="hidden and attention dropout, both sides")
    p.add_argument("--attention", default="auto", help="pretrax's model.attention")
    p.add_argument("--torch-threads", type=int, default=2)
    p.add_argument("--attention-paths", action="store_true",
                   help="time only one layer's attention through each path on the rows")
    args = p.parse_args()
    rows = args.rows or (SWEEP_ROWS if args.sweep else DEFAULT_ROWS)
    if args.large:
        rows += "," + LARGE_ROWS
    if args.attention_paths:
        return attention_paths(rows, args.rounds, max(args.steps, 5), args.dtype)

    import torch
    torch.set_num_threads(args.torch_threads)
    mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1)), jax.devices()[:1])
    peak = matmul_peak(dtype=args.dtype)
    print(f"device: {jax.devices()[0].device_kind}; {jax.device_count()} device(s); torch "
          f"{torch.__version__} with {torch.get_num_threads()} threads; measured {args.dtype} "
          f"matmul peak {peak / 1e9:.0f} GFLOP/s; dropout {args.dropout}")
    head = (f"{'size':<6} {'batch':>5} {'seq':>4} {'side':<12} {'tokens/s':>9} {'seqs/s':>7} "
            f"{'step ms':>8} {'compile s':>9} {'peak MB':>8} {'MFU':>6} {'x tf':>5}")
    print(head)
    for row in rows.split(","):
        size, batch_size, seq_len = row.split(":")
        batch_size, seq_len = int(batch_size), int(seq_len)
        cfg = BertConfig.of_size(size, VOCAB, dtype=args.dtype, dropout=args.dropout,
                                 attention_dropout=args.dropout, attention=args.attention)
        batch = make_batch(batch_size, seq_len)
        P = predictions(seq_len)
        matmul = matmul_side(args.dtype)
        with jax.set_mesh(mesh), mesh_lib.logical_rules():
            ours = pretrax_side(cfg, batch, mesh)
            theirs = transformers_side(cfg, batch, args.dtype)
            step_s = time_row({"pretrax": ours[0], "transformers": theirs[0], "matmul": matmul[0]},
                              args.rounds, args.steps)
        peak = matmul[1] / step_s["matmul"]
        flops = {"pretrax": train_flops(cfg, batch_size, seq_len, P),
                 "transformers": train_flops(cfg, batch_size, seq_len, seq_len)}
        for name, (_, compile_s, peak_bytes) in (("pretrax", ours), ("transformers", theirs)):
            s = step_s[name]
            ratio = f"{step_s['transformers'] / s:>5.2f}" if name == "pretrax" else f"{'':>5}"
            mem = f"{peak_bytes / 2**20:>8.0f}" if peak_bytes else f"{'-':>8}"
            print(f"{size:<6} {batch_size:>5} {seq_len:>4} {name:<12} {batch_size * seq_len / s:>9.0f} "
                  f"{batch_size / s:>7.1f} {s * 1e3:>8.1f} {compile_s:>9.1f} {mem} "
                  f"{flops[name] / s / peak:>6.1%} {ratio}", flush=True)
        print(f"{'':<6} {'':>5} {'':>4} matmul peak in these rounds: {peak / 1e9:.0f} GFLOP/s", flush=True)


if __name__ == "__main__":
    main()
