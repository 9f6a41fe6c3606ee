"""ModernBERT-base's context extension to 8,192 tokens: phase 2 of the release's recipe.

Run (after configs/modernbert_base.py):
    python -m pretrain --config configs/modernbert_base_long.py --init gs://BUCKET/modernbert_base \
        --workdir gs://BUCKET/modernbert_base_long \
        --config.data.source=tfds:wikipedia/20230601.en --config.data.data_dir=gs://BUCKET/tfds

The release (Warner et al. 2024, section 2.2): global rotary base 160,000, 8,192-token rows,
lr 3e-4, 250B tokens held then 50B decayed (1-sqrt). Here: 300B tokens at about 4.7M tokens a
step (576 x 8,192), the last sixth decaying. Expected: not run here (no pod).
"""

from configs import modernbert_base


def get_config():
    c = modernbert_base.get_config()
    c.model.global_rope_base = 160_000.0
    c.data.max_seq_len = 8192
    c.data.max_predictions = 2458    # 30% of 8,192, rounded up
    c.train.batch_size = 576
    c.train.batch_warmup_steps = 0   # phase 1 warmed the batch size up; this phase starts full
    c.train.steps = 63_600           # 300B tokens
    c.optim.lr = 3e-4
    c.optim.warmup_steps = 0
    c.optim.decay_steps = 10_600     # the last 50B tokens
    return c
