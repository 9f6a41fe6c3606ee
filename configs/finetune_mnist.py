"""Fine-tune an MAE encoder on the embedded MNIST digits (4,000 train, 500 dev, 500 test).

Run (SRC: an MAE pretraining workdir such as runs/mae_tiny, one of its checkpoints/<step>
folders, a HuggingFace ViTMAE folder, or `none` for a random encoder of `model.size`):
    python -m finetune --config configs/finetune_mnist.py --init runs/mae_tiny --workdir runs/ft_mnist
    # the MAE linear probe: a frozen encoder, BatchNorm (no affine) and a linear head
    python -m finetune --config configs/finetune_mnist.py --init runs/mae_tiny --workdir runs/probe_mnist \\
        --config.method.freeze_encoder=true --config.model.probe_norm=true --config.optim.lr=1e-2
    # 500 labels
    ... --config.data.max_train_examples=500 --config.train.epochs=30

Measured from configs/mae_tiny.py's run, medians of 3 seeds (benchmarks/RESULTS.md): linear probe
0.800 test accuracy (random encoder 0.478); full fine-tuning on 500 labels for 40 epochs 0.922
(scratch 0.604).
"""

import ml_collections

from configs import finetune_rt_polarity


def get_config() -> ml_collections.ConfigDict:
    c = finetune_rt_polarity.get_config()  # the shared groups: train, optim, method, mesh, ...
    c.family = "mae"

    c.model = ml_collections.ConfigDict()  # the encoder's shape comes from --init
    c.model.size = "small"           # --init none: models/mae.py SIZES
    c.model.dtype = "float32"
    c.model.remat = "none"
    c.model.drop_path = 0.1          # stochastic depth (MAE fine-tuning: 0.1 for ViT-B)
    c.model.pooling = "cls"          # cls: exports as ViTForImageClassification | mean (MAE's)
    c.model.probe_norm = False       # the linear-probe protocol's BatchNorm without affine

    c.data = ml_collections.ConfigDict()
    c.data.task = "mnist"            # mnist | tfds:NAME (a prepared TFDS image dataset)
    c.data.data_dir = "~/.cache/pretrax"
    c.data.crop_scale_min = 0.35     # random resized crops of the train images
    c.data.flip = False
    c.data.max_train_examples = 0    # >0: a fixed subset of the train split (same for all seeds)
    c.data.max_eval_examples = 0

    c.train.epochs = 10.0
    c.train.batch_size = 64
    c.optim.lr = 1e-3
    c.optim.decay = "cosine"
    c.optim.weight_decay = 0.05
    c.method.layer_decay = 0.75      # MAE's layer-wise learning-rate decay
    c.method.mixup_alpha = 0.0       # > 0: mixup (MAE fine-tuning on ImageNet: 0.8)
    c.method.cutmix_alpha = 0.0      # > 0: cutmix (MAE: 1.0); with both, one or the other a batch
    return c
