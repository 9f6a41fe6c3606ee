"""MAE ViT-L/16 on ImageNet-1k: the paper's recipe at the size of its main results.

    python -m pretrain --config configs/mae_large.py --workdir gs://BUCKET/mae_large \\
        --config.data.data_dir=gs://BUCKET/tfds

As configs/mae_base.py with the large encoder (24 x 1024) and rematerialised blocks. Expected:
85.9% top-1 after fine-tuning (paper, 1,600 epochs), 75.8% linear probe.
"""

from configs import mae_base


def get_config():
    c = mae_base.get_config()
    c.model.size = "large"
    c.model.remat = "full"
    return c
