"""ModernBERT-large (28 layers, 1024 hidden, GeGLU 2624, 16 heads; 395M parameters), phase 1 of the
release's recipe on a pod slice.

Run on a TPU v5p-128 or 8 x 8 GPUs (see launch/README.md):
    python -m pretrain --config configs/modernbert_large.py --workdir gs://BUCKET/modernbert_large \
        --config.data.source=tfds:wikipedia/20230601.en --config.data.data_dir=gs://BUCKET/tfds

As configs/modernbert_base.py, with the large model's peak lr 5e-4 and the release's large batch:
4,928 rows, warmed up from 448 over the first 10B tokens, each of the ten smaller sizes (448, 896,
..., 4,480 rows, all dividing over the 64 chips) for 396 steps (3,960 steps, 9.99B tokens). The lr
warmup keeps base's 3B tokens (2,080 steps at these sizes) and the phase its 1.7T tokens (338,862
steps; tests/test_batch_warmup.py checks these sums). The release's large started from base's
weights tiled up; this config trains from random weights. Expected: not run here;
the paper's large reaches GLUE 90.4 after both phases.
"""

from configs import modernbert_base


def get_config():
    c = modernbert_base.get_config()
    c.model.size = "large"           # 28 layers = 1 + 9 groups of 3: scans
    c.optim.lr = 5e-4
    c.train.batch_size = 4928            # the release's large batch
    c.train.batch_warmup_start = 448     # 448 -> 4,928 rows over 10B tokens
    c.train.batch_warmup_steps = 3_960   # 10 sizes x 396 steps
    c.train.steps = 338_862          # 1.7T tokens
    c.optim.warmup_steps = 2_080     # 3B tokens
    c.optim.decay_steps = 34_000     # the last 10%
    c.mesh.fsdp = 8                  # 395M parameters and their Adam moments, sharded
    c.mesh.data = -1
    return c
