"""MAE-tiny on the embedded MNIST digits (5,000 images from a pinned wheel): the image default.

Run:
    python -m pretrain --config configs/mae_tiny.py --workdir runs/mae_tiny

A ViT with 4 blocks of width 128 encodes the 12 visible 4x4 patches of 49 (75% masked); a
2-block decoder of width 64 predicts the pixels of the masked ones (normalised per patch).
Look at runs/mae_tiny/reconstruction.png (original, masked input, reconstruction) and
curves.png.

Measured (2026-12-01): on 2 idle CPU cores 4.4-4.9 steps/s (MFU 0.29-0.32), so the 3,000 steps
take about 11 minutes plus evaluations; eval reconstruction loss 1.82 at step 0 -> 0.328 (500)
-> 0.229 (2,000) -> 0.221 (3,000) (that run shared the cores with four other jobs: 42 minutes). From it, on MNIST (benchmarks/RESULTS.md): a linear
probe reaches 0.800 test accuracy against 0.478 from a random encoder, and fine-tuning on 500
labels 0.922 against 0.604 from scratch (medians of 3 seeds).
"""

import ml_collections

from configs import bert_tiny


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.family = "mae"

    c.model = ml_collections.ConfigDict()
    c.model.size = "small"           # models/mae.py SIZES: 28x28x1 images, 4x4 patches
    c.model.image_size = 0           # 0: the size's (28); the side of the square crops
    c.model.patch_size = 0           # 0: the size's (4)
    c.model.num_channels = 0         # 0: the size's (1)
    c.model.mask_ratio = 0.75
    c.model.norm_pix_loss = True     # targets: each patch standardised (better features)
    c.model.dtype = "float32"
    c.model.remat = "none"

    c.data = ml_collections.ConfigDict()
    c.data.source = "mnist"          # mnist | tfds:NAME (prepared in data_dir, array_record)
    c.data.data_dir = "~/.cache/pretrax"
    c.data.crop_scale_min = 0.2      # random resized crop, scale (crop_scale_min, 1)
    c.data.flip = False              # horizontal flips: off for digits
    c.data.workers = 0
    c.data.prefetch = 4

    base = bert_tiny.get_config()    # the shared groups, then MAE's recipe where it differs
    for group in ("train", "optim", "mesh", "checkpoint", "distributed", "eval", "perf", "wandb",
                  "search"):
        c[group] = base[group]
    c.profile = base.profile         # profile.steps: a trace of a few steps (training/profiling.py)
    c.train.steps = 3000
    c.train.batch_size = 128         # global, over all processes
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 200
    c.optim.decay = "cosine"
    c.optim.decay_steps = 0
    c.optim.weight_decay = 0.05
    c.optim.b2 = 0.95
    c.optim.eps = 1e-8
    c.optim.clip_norm = 0.0
    c.checkpoint.every_steps = 500
    c.eval.every_steps = 500
    c.eval.max_batches = 4           # the 500 eval digits
    return c
