"""The MAE family for pretraining: masked autoencoding of images (He et al. 2021).

`setup(config, workdir)` loads the images (the embedded MNIST set or a prepared TFDS dataset),
binds augmentation and the per-image mask noise into the grain pipeline (drawn from the stream
position, so resume and mesh changes replay exactly), and gives the shared loop the
reconstruction loss over masked patches, the FLOPs of visible-only encoding, and a picture
(original, masked input, reconstruction) for every evaluation.

With `--init SRC` (an MAE workdir or a HuggingFace ViTMAE folder: the same code as BERT's,
training/init_source.py) the model's shape is SRC's and a fresh start takes its weights (a
ViTMAEModel has no decoder: that starts random, said in one line).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from data.images import Augment, ImagePipeline, load_images
from data.pipeline import BatchWarmup
from data.wheels import DataError
from models.mae import MAEConfig, MAEForPreTraining, patchify, reconstruction_sums, unpatchify
from pretrain.setup import PretrainSetup
from training import run_record, storage
from training.errors import UserError
from training.init_source import pretrain_source, source_params
from training.loop import Throughput
from training.perf import peak_flops_per_device
from training.step import Objective


def objective(cfg: MAEConfig) -> Objective:
    """Per-patch MSE averaged over the masked patches (optionally on normalised pixels)."""

    def sums(model, batch, key):
        logits_BLP, mask_BL = model(batch["image"], batch["noise"], key=key)
        return reconstruction_sums(logits_BLP, batch["image"], mask_BL, patch_size=cfg.patch_size,
                                   norm_pix_loss=cfg.norm_pix_loss)

    def normalisers(batch):  # every image masks the same number of patches
        return {"masked": jnp.asarray(batch["image"].shape[0] * cfg.num_masked, jnp.float32)}

    def summarize(sums, prefix):
        return {f"{prefix}/loss": float(sums["mae_loss"]) / max(float(sums["mae_count"]), 1.0)}

    return Objective(sums, normalisers, lambda sums, norm: sums["mae_loss"] / norm["masked"], summarize)


def train_flops(cfg: MAEConfig, batch_size: int, encoded: int | None = None) -> float:
    """Matmul FLOPs of one step (forward + backward = 3x forward): the encoder sees the `encoded`
    patches (default: the visible ones) and the class token, the decoder every patch and the
    class token."""
    encoded = cfg.num_visible if encoded is None else encoded

    def blocks(layers, width, mlp, tokens):
        return layers * tokens * (2 * (4 * width * width + 2 * width * mlp) + 2 * 2 * tokens * width)

    S, T = encoded + 1, cfg.num_patches + 1
    D, E, P = cfg.hidden_size, cfg.decoder_hidden_size, cfg.patch_dim
    forward = (2 * encoded * P * D + blocks(cfg.num_layers, D, cfg.intermediate_size, S)
               + 2 * S * D * E + blocks(cfg.decoder_layers, E, cfg.decoder_intermediate_size, T)
               + 2 * cfg.num_patches * E * P)
    return 3.0 * batch_size * forward


def pictures(cfg: MAEConfig, mean, std, count: int = 8):
    """(model, batch) -> {"reconstruction": rows of original, masked input, reconstruction (the
    prediction where masked, the original where visible), in [0, 1], for `count` images}."""
    mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)

    def draw(model, batch):
        image_BHWC = batch["image"][:count].astype(jnp.float32)
        logits_BLP, mask_BL = model(image_BHWC, batch["noise"][:count])
        target_BLP = patchify(image_BHWC, cfg.patch_size)
        if cfg.norm_pix_loss:  # predictions are standardised patches: undo with the originals'
            mu_BL1 = jnp.mean(target_BLP, axis=-1, keepdims=True)
            sd_BL1 = jnp.sqrt(jnp.var(target_BLP, axis=-1, keepdims=True, ddof=1) + 1e-6)
            logits_BLP = logits_BLP * sd_BL1 + mu_BL1
        hidden_BL1 = mask_BL[..., None]
        masked_BLP = jnp.where(hidden_BL1 > 0, (0.5 - mean[0]) / std[0], target_BLP)  # grey
        filled_BLP = jnp.where(hidden_BL1 > 0, logits_BLP, target_BLP)
        rows = [image_BHWC] + [unpatchify(x, cfg.patch_size, cfg.num_channels) for x in (masked_BLP, filled_BLP)]
        rows = [jnp.clip(r * std + mean, 0.0, 1.0) for r in rows]
        grid_HWC = jnp.concatenate([jnp.concatenate(list(r), axis=1) for r in rows], axis=0)
        return {"reconstruction": jnp.broadcast_to(grid_HWC, grid_HWC.shape[:2] + (3,))
                if cfg.num_channels == 1 else grid_HWC}

    return draw


GEOMETRY = ("image_size", "patch_size", "num_channels")  # 0 in a config: the size's value


def model_fields(model_cfg) -> dict:
    """A config's model group as MAEConfig fields: geometry left at 0 takes the size's."""
    return {k: v for k, v in model_cfg.items() if not (k in GEOMETRY and v == 0)}


def setup(config, workdir, init: str | None = None, explicit=()) -> PretrainSetup:
    source, resolved = pretrain_source(config, workdir, init, set(explicit))  # before anything is written
    config = run_record.view(config, resolved)
    dc, tc = config.data, config.train
    try:
        cfg = MAEConfig.from_model_config(model_fields(config.model))
    except ValueError as e:
        raise UserError(f"config.model: {e}") from None
    try:
        data = load_images(dc.source, storage.local_data_dir(dc.data_dir, storage.tfds_names([dc.source])))
    except DataError as e:
        raise UserError(str(e)) from None
    if data.num_channels != cfg.num_channels:
        raise UserError(f"{data.name} has {data.num_channels}-channel images but model.num_channels="
                        f"{cfg.num_channels}; set --config.model.num_channels={data.num_channels}")
    resolved = run_record.merged(resolved, {  # run.json: the geometry used, the images' normalisation
        "model": {field: getattr(cfg, field) for field in GEOMETRY},
        "data": {"image_mean": list(data.mean), "image_std": list(data.std)}})
    pipeline = ImagePipeline(data, image_size=cfg.image_size, num_patches=cfg.num_patches,
                             augment=Augment(crop_scale=(dc.crop_scale_min, 1.0), flip=dc.flip))
    share = dict(seed=tc.seed, process_index=jax.process_index(), process_count=jax.process_count())
    train = pipeline.train_iterator(tc.batch_size, workers=dc.workers, prefetch=dc.prefetch,
                                    warmup=BatchWarmup.of(tc), **share)
    throughput = Throughput(tc.batch_size, "images", train_flops(cfg, tc.batch_size),
                            peak_flops_per_device(config.perf.peak_tflops) * jax.device_count())
    return PretrainSetup(lambda rngs: MAEForPreTraining(cfg, rngs), objective(cfg), train,
                 lambda: pipeline.eval_batches(tc.batch_size, config.eval.max_batches, **share),
                 throughput, pictures=pictures(cfg, data.mean, data.std),
                 initial_params=None if source is None else lambda fresh: source_params(source, fresh),
                 resolved=resolved, source=source)
