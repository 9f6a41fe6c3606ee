"""The memory plan for pods we cannot run here: bert_large's train step compiled ahead of time.

    python benchmarks/memory_plan.py [--devices 8,16,32,64] [--hbm 16,32,80] [--meshes fsdp_tensor]
        [--config configs/bert_large.py]

For each mesh (FSDP x tensor over N fake CPU devices) the real train step (training/step.py,
configs/bert_large.py's model, optimizer, sequence length and remat) is lowered and compiled on
abstract inputs (`jax.jit(...).lower(ShapeDtypeStructs).compile()`: nothing is allocated) and
the compiled program's `memory_analysis()` is read. Per device it prints:

  params, opt     the parameter and AdamW-moment bytes, from their shardings (shard shapes)
  act/example     temporaries that grow with the batch: the slope of temp bytes between two
                  compiled batch sizes (activations kept for the backward pass)
  fixed temp      the batch-independent temporaries (gradients, gathered weights, buffers)
  max batch       the largest per-device batch whose arguments + temporaries fit each HBM size:
                  a linear fit of the compiled totals, refitted through the batch it predicts
                  for the largest HBM, then checked by compiling the refitted batch for the
                  largest HBM (`checked`: that batch and its compiled total)

CPU XLA is not TPU or GPU XLA (other fusion, no HBM-specific rematerialisation), so the numbers
are a plan to check on the hardware, not a promise. Results: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

DEFAULT_DEVICES = (8, 16, 32, 64)
# fsdp x tensor for each device count: fsdp alone, and fsdp with tensor parallelism.
MESHES = {8: [(1, 8, 1), (1, 4, 2)], 16: [(1, 16, 1), (1, 8, 2)], 32: [(1, 32, 1), (1, 16, 2)],
          64: [(1, 64, 1), (1, 16, 4)]}
GiB = 2**30


def _fake_devices(n: int) -> None:
    """N fake CPU devices; must run before JAX touches its backend."""
    import jax
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", n)


def bert_batch(batch: int, seq: int, preds: int, sharding):
    """The pretraining batch's shapes and dtypes (data/pretraining.py), sharded over data x fsdp."""
    import jax
    import jax.numpy as jnp
    shapes = {"input_ids": (batch, seq), "token_type_ids": (batch, seq),
              "attention_mask": (batch, seq), "masked_positions": (batch, preds),
              "masked_ids": (batch, preds), "masked_weights": (batch, preds),
              "next_sentence_labels": (batch,)}
    return {k: jax.ShapeDtypeStruct(s, jnp.float32 if k == "masked_weights" else jnp.int32,
                                    sharding=sharding) for k, s in shapes.items()}


def compile_train_step(config, mesh_shape, batch: int, **model_overrides):
    """(compiled step, abstract state, lower seconds, compile seconds) of `config`'s BERT train
    step at global batch `batch` on a (data, fsdp, tensor) mesh of the first devices."""
    import jax
    import ml_collections
    from models.bert import BertConfig, BertForPreTraining
    from pretrain.bert import objective
    from training import mesh as mesh_lib
    from training.optim import make_optimizer
    from training.state import abstract_state
    from training.step import make_train_step

    data, fsdp, tensor = mesh_shape
    mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor)),
                              jax.devices()[: data * fsdp * tensor])
    vocab = -(-config.data.vocab_size // 128) * 128  # as pretrain/bert.py rounds it
    cfg = BertConfig.from_model_config({**config.model.to_dict(), "vocab_size": vocab,
                                        **model_overrides})
    model_fn = lambda rngs: BertForPreTraining(cfg, rngs)
    tx = make_optimizer(config.optim, config.train.steps)
    target, shardings, graphdef = abstract_state(model_fn, tx, mesh)
    step = jax.jit(make_train_step(graphdef, tx, objective(), seed=0),
                   in_shardings=(shardings, mesh_lib.batch_sharding(mesh)),
                   out_shardings=(shardings, None), donate_argnums=0)
    inputs = bert_batch(batch, config.data.max_seq_len, config.data.max_predictions,
                        mesh_lib.batch_sharding(mesh))
    with jax.set_mesh(mesh), mesh_lib.logical_rules():
        t0 = time.perf_counter()
        lowered = step.lower(target, inputs)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
    return compiled, target, t1 - t0, t2 - t1


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the first device's shards)."""
    import jax
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
               for x in jax.tree.leaves(tree))


def peak_bytes(compiled) -> tuple[int, int, int]:
    """(arguments, temporaries, total) per device; outputs alias the donated state."""
    m = compiled.memory_analysis()
    total = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    return m.argument_size_in_bytes, m.temp_size_in_bytes, total


def plan(config, mesh_shape, hbm_gib, probe=(8, 16)):
    """One row of the plan: bytes per device and the largest per-device batch for each HBM.

    Totals are fitted linearly between two small compiled batches, then refitted through the
    batch that first fit predicts for the largest HBM (compiled: XLA's temporaries do not grow
    quite linearly), and the refitted batch for the largest HBM is compiled to check it."""
    dp = mesh_shape[0] * mesh_shape[1]
    total = lambda per_device: peak_bytes(compile_train_step(config, mesh_shape, per_device * dp)[0])
    compiled, target, _, compile_s = compile_train_step(config, mesh_shape, probe[0] * dp)
    (b0, b1), (_, t0, tot0) = probe, peak_bytes(compiled)
    _, t1, tot1 = total(b1)
    slope = (tot1 - tot0) / (b1 - b0)
    far = max(b1 + 1, int((max(hbm_gib) * GiB - tot0) // slope) + b0)
    tot_far = total(far)[2]
    slope = (tot_far - tot0) / (far - b0)  # the secant through the far point
    fits = {h: max(0, int((h * GiB - tot0) // slope) + b0) for h in hbm_gib}
    best = fits[max(hbm_gib)]
    checked = total(best)[2] if best else None
    return dict(mesh=mesh_shape, params=per_device_bytes(target["params"]),
                opt=per_device_bytes(target["opt_state"]), act_per_example=(t1 - t0) / (b1 - b0),
                fixed_temp=t0 - (t1 - t0) / (b1 - b0) * b0, fits=fits, checked=(best, checked),
                compile_s=compile_s)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", default=",".join(map(str, DEFAULT_DEVICES)))
    parser.add_argument("--hbm", default="16,32,80", help="HBM sizes in GiB")
    parser.add_argument("--config", default="configs/bert_large.py")
    parser.add_argument("--meshes", default="fsdp_tensor", choices=["fsdp_tensor", "fsdp", "both"],
                        help="per device count: FSDP x tensor parallelism, FSDP alone, or both")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.devices.split(",")]
    hbm = [float(h) for h in args.hbm.split(",")]
    _fake_devices(max(counts))

    from training.config import load_config
    config = load_config(args.config)
    mib = lambda b: f"{b / 2**20:9.1f}"
    print(f"{args.config}: model.size={config.model.size} remat={config.model.remat} "
          f"scan_layers={config.model.scan_layers} dtype={config.model.dtype} "
          f"seq={config.data.max_seq_len}, per device in MiB")
    print(f"{'devices':>7} {'(data,fsdp,tensor)':>18} {'params':>9} {'opt':>9} {'act/ex':>9} "
          f"{'fixed tmp':>9} " + " ".join(f"{'max@' + format(h, 'g') + 'G':>8}" for h in hbm)
          + f" {'checked (batch: MiB)':>22} {'compile s':>9}")
    for n in counts:
        pick = {"fsdp": [0], "fsdp_tensor": [1], "both": [0, 1]}[args.meshes]
        for shape in [MESHES[n][i] for i in pick]:
            row = plan(config, shape, hbm)
            batch, total = row["checked"]
            checked = f"{batch}: {total / 2**20:.0f}" if total else "-"
            print(f"{n:>7} {str(shape):>18} {mib(row['params'])} {mib(row['opt'])} "
                  f"{mib(row['act_per_example'])} {mib(row['fixed_temp'])} "
                  + " ".join(f"{row['fits'][h]:>8}" for h in hbm)
                  + f" {checked:>22} {row['compile_s']:>9.1f}", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
