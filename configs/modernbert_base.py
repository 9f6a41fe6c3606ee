"""ModernBERT-base (22 layers, 768 hidden, GeGLU 1152, 12 heads; 149M parameters with a 50,368-token
vocabulary), phase 1 of the release's recipe on a pod slice: 1024-token packed rows, 30% masking.

Run on a TPU v5p-64 or 4 x 8 GPUs (see launch/README.md):
    python -m pretrain --config configs/modernbert_base.py --workdir gs://BUCKET/modernbert_base \
        --config.data.source=tfds:wikipedia/20230601.en --config.data.data_dir=gs://BUCKET/tfds

What the release did (Warner et al. 2024, section 2.2): batch 4,608 x 1,024 tokens, peak lr 8e-4
after a 3B-token warmup, held (warmup-stable-decay), 1.7T tokens at 1,024 with both rotary bases
at 10,000, then the context extension (configs/modernbert_base_long.py) with the 1-sqrt decay.
This config's steps are that phase's 1.7T tokens (360k steps); its decay tail over the last 10%
lets it stand alone. Expected: not run here (no pod); the paper's base reaches GLUE 88.4 after its
2T tokens and both phases.
"""

from configs import modernbert_tiny


def get_config():
    c = modernbert_tiny.get_config()
    c.model.size = "base"
    c.model.dtype = "bfloat16"
    c.model.max_position = 8192      # the longest row the model is meant for (rotary: no table)
    c.model.scan_layers = True       # 1 + 7 groups of 3 layers: compiles in seconds
    c.model.remat = "dots"
    c.data.vocab_size = 50_368       # the release's, a multiple of 64
    c.data.max_seq_len = 1024
    c.data.max_predictions = 308     # 30% of 1024, rounded up
    c.train.batch_size = 4608
    c.train.steps = 360_000          # 1.7T tokens
    c.train.log_every = 100
    c.optim.lr = 8e-4
    c.optim.warmup_steps = 650       # 3B tokens
    c.optim.decay_steps = 36_000     # the 1-sqrt tail: the last 10%
    c.checkpoint.every_steps = 5_000
    c.checkpoint.keep = 3
    c.eval.every_steps = 10_000
    c.perf.peak_tflops = 0.0
    return c
