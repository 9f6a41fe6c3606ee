"""ModernBERT-large (28 layers, 1024 hidden, GeGLU 2624, 16 heads; 395M parameters), phase 1 of the
release's recipe on a pod slice.

Run on a TPU v5p-128 or 8 x 8 GPUs (see launch/README.md):
    python -m pretrain --config configs/modernbert_large.py --workdir gs://BUCKET/modernbert_large \
        --config.data.source=tfds:wikipedia/20230601.en --config.data.data_dir=gs://BUCKET/tfds

As configs/modernbert_base.py, with the large model's peak lr 5e-4 (the release: large started
from base's weights tiled up; this config trains from random weights). Expected: not run here;
the paper's large reaches GLUE 90.4 after both phases.
"""

from configs import modernbert_base


def get_config():
    c = modernbert_base.get_config()
    c.model.size = "large"           # 28 layers = 1 + 9 groups of 3: scans
    c.optim.lr = 5e-4
    c.mesh.fsdp = 8                  # 395M parameters and their Adam moments, sharded
    c.mesh.data = -1
    return c
