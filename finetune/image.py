"""The MAE family for fine-tuning: the ViT encoder on image classification.

`--init` names an MAE pretraining workdir or step folder, a HuggingFace `ViTMAE` folder, or
"none" (a random encoder of `model.size`). Methods: full fine-tuning, partial freezing and
layer-wise decay (finetune/methods.py), the MAE fine-tuning regularisers (mixup, cutmix, label
smoothing, drop path), and the MAE linear-probe protocol: a frozen encoder whose class-token
feature is standardised, as BatchNorm without affine parameters does, before the linear head
(`model.probe_norm`; the statistics are the train split's, taken once with the frozen encoder,
which is what BatchNorm's running averages converge to when the features cannot change).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data.images import Augment, ImageExample, load_images
from data.wheels import DataError
from finetune import tasks
from finetune.setup import FinetuneSetup
from models.layers import normal, zeros
from models.mae import MAEConfig, MAEEncoder
from training import storage
from training.errors import UserError
from training.init_source import finetune_source, load_encoder, take_params

POOLINGS = ("cls", "mean")
_TRAIN_TAG = 0x46544947  # "FTIG": fine-tuning augmentation
PROBE_EXAMPLES = 10_000  # train images the probe's feature statistics are taken on, at most


class ImageClassifier(nnx.Module):
    """`encoder` (MAEEncoder over all patches) and `classifier` (D -> C) on the class token after
    the final LayerNorm (`pooling="cls"`, HuggingFace's ViTForImageClassification) or the mean
    of the patch tokens (`"mean"`, MAE's fine-tuning default); with `probe_norm`, the feature is
    standardised by the fixed `probe_mean` / `probe_var` first."""

    def __init__(self, cfg: MAEConfig, num_classes: int, rngs: nnx.Rngs, *, pooling: str = "cls",
                 probe_norm: bool = False):
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        D = cfg.hidden_size
        self.encoder = MAEEncoder(cfg, rngs)
        if probe_norm:
            self.probe_mean = nnx.Param(zeros("embed")(rngs.params(), (D,)))
            self.probe_var = nnx.Param(jnp.ones((D,)))
        self.classifier = nnx.Linear(D, num_classes, kernel_init=normal(0.01, "embed", None),
                                     bias_init=zeros(None), rngs=rngs)
        self.pooling, self.probe_norm = pooling, probe_norm

    def features(self, image_BHWC, *, key=None):
        _, cls_BD, mean_BD = self.encoder.features(image_BHWC, key=key)
        return (cls_BD if self.pooling == "cls" else mean_BD).astype(jnp.float32)

    def __call__(self, image_BHWC, *, key=None):
        x_BD = self.features(image_BHWC, key=key)
        if self.probe_norm:
            x_BD = (x_BD - self.probe_mean[...]) / jnp.sqrt(self.probe_var[...] + 1e-6)
        return self.classifier(x_BD).astype(jnp.float32)


def predict(model: ImageClassifier, batch: dict, key=None) -> jax.Array:
    return model(batch["image"], key=key)


def encoder_depth(num_layers: int):
    """Patch embedding and class token 0, block i at i + 1, the final norm above the blocks."""
    def depth(keys: tuple) -> int:
        if keys[0] in ("patch_embed", "cls_token"):
            return 0
        if keys[0] == "layers":
            return int(keys[1]) + 1
        return num_layers + 1
    return depth


def mixer(mixup_alpha: float, cutmix_alpha: float):
    """mix(batch, key) -> (mixed batch, partner labels, lam): one lambda a batch, partners the
    batch reversed (timm's default); cutmix or mixup with even odds when both are on."""
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return None

    def mix(batch, key):
        image_BHWC = batch["image"]
        B, H, W, _ = image_BHWC.shape
        choice_key, mixup_key, cutmix_key, box_key = jax.random.split(key, 4)
        partner_BHWC, partner_labels = image_BHWC[::-1], batch["labels"][::-1]
        use_cutmix = (cutmix_alpha > 0) & ((mixup_alpha <= 0) | jax.random.bernoulli(choice_key))
        lam_mixup = jax.random.beta(mixup_key, max(mixup_alpha, 1e-3), max(mixup_alpha, 1e-3))
        lam_cut = jax.random.beta(cutmix_key, max(cutmix_alpha, 1e-3), max(cutmix_alpha, 1e-3))
        # Cutmix: a box of area (1 - lam) at a uniform centre, clipped; lam becomes its complement.
        cy, cx = jax.random.uniform(box_key, (2,)) * jnp.array([H, W])
        half_h, half_w = H * jnp.sqrt(1 - lam_cut) / 2, W * jnp.sqrt(1 - lam_cut) / 2
        rows, cols = jnp.arange(H)[:, None] + 0.5, jnp.arange(W)[None, :] + 0.5
        box_HW = (jnp.abs(rows - cy) < half_h) & (jnp.abs(cols - cx) < half_w)
        cut_BHWC = jnp.where(box_HW[None, :, :, None], partner_BHWC, image_BHWC)
        lam_box = 1.0 - jnp.mean(box_HW.astype(jnp.float32))
        mixed_BHWC = lam_mixup * image_BHWC + (1 - lam_mixup) * partner_BHWC
        image_BHWC = jnp.where(use_cutmix, cut_BHWC, mixed_BHWC)
        lam = jnp.where(use_cutmix, lam_box, lam_mixup)
        return {**batch, "image": image_BHWC}, partner_labels, lam

    return mix


# ---------------------------------------------------------------------------------------------
# The setup
# ---------------------------------------------------------------------------------------------

class _Split:
    """An image split as the trainer reads it: its length, labels and example ids."""

    def __init__(self, source):
        self.source, self.labelled = source, True
        labels = getattr(source, "labels", None)  # in-memory sets have them; TFDS reads each record
        if labels is None:
            labels = [source[i]["label"] for i in range(len(source))]
        self.labels = np.asarray(labels, np.int64)
        self.index = np.arange(len(source))

    def __len__(self) -> int:
        return len(self.source)


def setup(config, workdir, init: str, explicit: set) -> FinetuneSetup:
    dc, mc, method = config.data, config.model, config.method
    task = tasks.get_task(dc.task)
    if mc.pooling not in POOLINGS:
        raise UserError(f"model.pooling={mc.pooling!r}; choose one of: {', '.join(POOLINGS)}")
    try:
        data = load_images(task.name, storage.local_data_dir(dc.data_dir, storage.tfds_names([task.name])))
    except DataError as e:
        raise UserError(str(e)) from None
    model_fields = {k: mc[k] for k in ("size", "dtype", "remat", "drop_path") if k in mc}  # the rest: the source's
    source, _ = finetune_source(workdir, init, config.family)
    if source.kind == "none":
        cfg = MAEConfig.from_model_config(model_fields)
    else:
        cfg = dataclasses.replace(source.model_config(),
                                  **{k: v for k, v in model_fields.items() if k != "size"})
    if data.num_channels != cfg.num_channels:
        raise UserError(f"{data.name} has {data.num_channels}-channel images but the encoder takes "
                        f"{cfg.num_channels}; use an encoder pretrained on such images")
    splits = {"train": _Split(data.splits["train"]), "dev": _Split(data.splits["eval"]),
              "test": _Split(data.splits["test"])}
    splits = {name: _subsample(s, dc.max_train_examples if name == "train" else dc.max_eval_examples)
              for name, s in splits.items()}
    augment = Augment(crop_scale=(dc.crop_scale_min, 1.0), flip=dc.flip)
    global_batch = config.train.batch_size

    def example(augmented: bool):
        return ImageExample(image_size=cfg.image_size, num_patches=cfg.num_patches,
                            global_batch=global_batch, seed=config.train.seed, tag=_TRAIN_TAG,
                            augment=augment if augmented else None, mean=data.mean, std=data.std)

    augmented, centred = example(True), example(False)

    def encode(split: str, rows: np.ndarray, positions: np.ndarray, *, augment: bool = True) -> dict:
        make = augmented if split == "train" and augment else centred
        made = [make(p, splits[split].source[int(r)]) for r, p in zip(rows, positions)]
        return {"image": np.stack([m["image"] for m in made]),
                "labels": np.asarray([m["label"] for m in made], np.int32)}

    def probe_images():
        rows = np.arange(min(len(splits["train"]), PROBE_EXAMPLES))
        for chunk in np.array_split(rows, max(1, len(rows) // 256)):
            yield encode("train", chunk, chunk, augment=False)["image"]

    probe = bool(mc.probe_norm)
    model_fn = lambda rngs: ImageClassifier(cfg, data.num_classes, rngs, pooling=mc.pooling,
                                            probe_norm=probe)

    def initial_params(fresh: dict) -> dict:
        params = dict(fresh)
        if source.kind != "none":
            params["encoder"] = take_params(load_encoder(source), fresh["encoder"], init)[0]
        if probe:
            params["probe_mean"], params["probe_var"] = _feature_stats(model_fn, params, probe_images())
        return params

    print(f"{task.name}: " + ", ".join(f"{len(s)} {n}" for n, s in splits.items()) +
          f"; MAE encoder from {source.kind}" + (f" {source.path}" if source.path else ""))
    source.encoder = dataclasses.asdict(cfg)
    provenance = {k: getattr(source, k) for k in ("init", "kind", "path", "step")}
    return FinetuneSetup(task=task, splits=splits, label_names=[str(c) for c in range(data.num_classes)],
                 encode=encode, model_fn=model_fn, predict=predict,
                 depth=encoder_depth(cfg.num_layers), num_layers=cfg.num_layers,
                 initial_params=initial_params, save_assets=lambda folder: None,
                 source=dataclasses.asdict(source),
                 results={"source": provenance, "encoder": dataclasses.asdict(cfg)},
                 fixed=lambda keys: keys[0] in ("probe_mean", "probe_var"),
                 # run.json: the encoder used, field by field, and the images' normalisation
                 resolved={"model": dataclasses.asdict(cfg),
                           "data": {"image_mean": list(data.mean), "image_std": list(data.std)}},
                 mix=mixer(method.mixup_alpha, method.cutmix_alpha))


def _subsample(split: _Split, n: int) -> _Split:
    """A fixed subset of n examples of each split (all when n <= 0), the same for every seed."""
    if n <= 0 or n >= len(split):
        return split
    rows = np.sort(np.random.default_rng([0x5355, n]).permutation(len(split))[:n])
    out = _Split.__new__(_Split)
    out.source = _Rows(split.source, rows)
    out.labelled, out.labels, out.index = True, split.labels[rows], split.index[rows]
    return out


class _Rows:
    def __init__(self, source, rows):
        self.source, self.rows = source, rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.source[int(self.rows[i])]


def _feature_stats(model_fn, params, images) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of the encoder's feature over the given (centre-cropped) train images:
    the fixed statistics of the linear probe's BatchNorm."""
    from training.state import abstract_model
    model = nnx.merge(nnx.graphdef(abstract_model(model_fn)), params)
    features = jax.jit(lambda m, x: m.features(x))
    feats = np.concatenate([np.asarray(features(model, chunk)) for chunk in images], axis=0)
    return feats.mean(axis=0).astype(np.float32), feats.var(axis=0).astype(np.float32)
