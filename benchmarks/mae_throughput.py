"""What does encoding only the visible patches buy? MAE train-step throughput, visible-only vs all.

    python benchmarks/mae_throughput.py [--sizes small,base] [--batch 64,8] [--rounds 3] [--steps 3]

For each size, two jit-compiled train steps on the same batch, optimizer and loss:
  visible  MAE as trained: the encoder sees the 25% visible patches (and the class token), the
           decoder fills in mask tokens (models/mae.py)
  all      the same ViT encoding every patch (the paper's "encoder with mask tokens" baseline,
           Table 1c / Sec. 4.1), the decoder then receiving every token
timed in alternating rounds (so a busy machine slows both alike), with images/s, step time and
MFU against the float32 matmul peak measured in the same run. MFU counts the FLOPs each variant
really does (pretrain/mae.py `train_flops`, 3x the forward matmuls). He et al. report a 2.8-4.1x
wall-clock gain for ViT-L/H on TPU; results are in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from models.mae import MAEConfig, MAEForPreTraining, random_masking, reconstruction_sums
from pretrain.mae import objective, train_flops
from training import mesh as mesh_lib
from training.optim import make_optimizer
from training.perf import matmul_peak
from training.state import create_train_state
from training.step import Objective, make_train_step


def all_patches_objective(cfg: MAEConfig) -> Objective:
    """The same loss, but the encoder runs over every patch (ids_restore: the identity)."""
    visible = objective(cfg)

    def sums(model, batch, key):
        latent_BSD = model.encoder(batch["image"], None, key=key)
        L = cfg.num_patches
        identity_BL = jnp.broadcast_to(jnp.arange(L), (batch["image"].shape[0], L))
        logits_BLP = model.decoder(latent_BSD, identity_BL, key=key)
        _, mask_BL, _ = random_masking(batch["noise"], cfg.num_visible)  # the same patches scored
        return reconstruction_sums(logits_BLP, batch["image"], mask_BL, patch_size=cfg.patch_size,
                                   norm_pix_loss=cfg.norm_pix_loss)

    return Objective(sums, visible.normalisers, visible.loss, visible.summarize)


def make_step(cfg: MAEConfig, obj: Objective, mesh):
    optim = ml_collections.ConfigDict(dict(lr=1e-4, warmup_steps=0, decay="constant", end_lr_ratio=0.0,
                                           weight_decay=0.05, b1=0.9, b2=0.95, eps=1e-8, clip_norm=0.0))
    tx = make_optimizer(optim, 100)
    model_fn = lambda rngs: MAEForPreTraining(cfg, rngs)
    state, shardings, graphdef = create_train_state(model_fn, tx, mesh, seed=0)
    step = jax.jit(make_train_step(graphdef, tx, obj, seed=0),
                   in_shardings=(shardings, mesh_lib.batch_sharding(mesh)),
                   out_shardings=(shardings, None), donate_argnums=0)
    return state, step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="small,base")
    p.add_argument("--batch", default="64,8", help="one batch size per size")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="timed steps per round")
    args = p.parse_args()
    mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1)), jax.devices()[:1])
    peak = matmul_peak()
    print(f"device: {jax.devices()[0].device_kind}; measured float32 matmul peak {peak / 1e9:.0f} GFLOP/s")
    print(f"{'size':<6} {'batch':>5} {'variant':<8} {'enc tokens':>10} {'images/s':>9} {'step s':>7} "
          f"{'compile s':>9} {'MFU':>6}")
    for size, batch in zip(args.sizes.split(","), map(int, args.batch.split(","))):
        cfg = MAEConfig.of_size(size, norm_pix_loss=True)
        rng = np.random.default_rng(0)
        data = {"image": rng.normal(size=(batch, cfg.image_size, cfg.image_size, cfg.num_channels)).astype(np.float32),
                "noise": rng.random((batch, cfg.num_patches), dtype=np.float32)}
        variants = {"visible": (objective(cfg), train_flops(cfg, batch), cfg.num_visible + 1),
                    "all": (all_patches_objective(cfg), train_flops(cfg, batch, cfg.num_patches),
                            cfg.num_patches + 1)}
        runs, times = {}, {name: [] for name in variants}
        with jax.set_mesh(mesh), mesh_lib.logical_rules():
            global_batch = mesh_lib.global_batch(data, mesh)
            for name, (obj, _, _) in variants.items():
                state, step = make_step(cfg, obj, mesh)
                start = time.perf_counter()
                state, out = step(state, global_batch)
                jax.block_until_ready(out)
                runs[name] = [state, step, time.perf_counter() - start]
            for _ in range(args.rounds):  # alternate: a busy machine slows both alike
                for name in variants:
                    state, step, _ = runs[name]
                    start = time.perf_counter()
                    for _ in range(args.steps):
                        state, out = step(state, global_batch)
                    jax.block_until_ready(out)
                    times[name].append((time.perf_counter() - start) / args.steps)
                    runs[name][0] = state
        rates = {}
        for name, (_, flops, tokens) in variants.items():
            step_s = float(np.median(times[name]))
            rates[name] = batch / step_s
            print(f"{size:<6} {batch:>5} {name:<8} {tokens:>10} {rates[name]:>9.1f} {step_s:>7.3f} "
                  f"{runs[name][2]:>9.1f} {flops / step_s / peak:>6.1%}")
        print(f"{size}: visible-only is {rates['visible'] / rates['all']:.2f}x the all-patches throughput")


if __name__ == "__main__":
    main()
