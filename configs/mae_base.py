"""MAE ViT-B/16 on ImageNet-1k: the paper's pretraining recipe (He et al. 2021, Table 8).

Run on a TPU v4-64 or 4 x 8 GPUs (see launch/README.md), ImageNet prepared with
`tfds build imagenet2012 --file_format=array_record --data_dir=DIR` (manual download):
    python -m pretrain --config configs/mae_base.py --workdir gs://BUCKET/mae_base \\
        --config.data.data_dir=gs://BUCKET/tfds

AdamW (0.9, 0.95), weight decay 0.05, lr 1.5e-4 x batch / 256 with 40 warmup epochs and cosine
decay, batch 4096, 800 epochs (1,600 in the paper's best), 75% masking, normalised-pixel targets,
random resized crops (0.2-1) and flips. Expected: 83.6% top-1 after fine-tuning (paper, 1,600
epochs), 68% linear probe.
"""

from configs import mae_tiny

IMAGENET_TRAIN = 1_281_167


def get_config():
    c = mae_tiny.get_config()
    c.model.size = "base"            # 224x224x3, 16x16 patches; decoder 8 x 512
    c.model.dtype = "bfloat16"
    c.data.source = "tfds:imagenet2012"
    c.data.flip = True
    c.data.workers = 8
    c.train.batch_size = 4096
    steps_per_epoch = IMAGENET_TRAIN // c.train.batch_size
    c.train.steps = 800 * steps_per_epoch
    c.optim.lr = 1.5e-4 * c.train.batch_size / 256
    c.optim.warmup_steps = 40 * steps_per_epoch
    c.checkpoint.every_steps = 5 * steps_per_epoch
    c.checkpoint.every_seconds = 1800.0
    c.eval.every_steps = 10 * steps_per_epoch
    c.eval.max_batches = 4
    c.perf.peak_tflops = 0.0         # look the chip up
    c.mesh.data, c.mesh.fsdp = 1, -1
    return c
