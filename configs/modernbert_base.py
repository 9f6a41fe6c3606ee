"""ModernBERT-base (22 layers, 768 hidden, GeGLU 1152, 12 heads; 149M parameters with a 50,368-token
vocabulary), phase 1 of the release's recipe on a pod slice: 1024-token packed rows, 30% masking.

Run on a TPU v5p-64 or 4 x 8 GPUs (see launch/README.md):
    python -m pretrain --config configs/modernbert_base.py --workdir gs://BUCKET/modernbert_base \
        --config.data.source=tfds:wikipedia/20230601.en --config.data.data_dir=gs://BUCKET/tfds

What the release did (Warner et al. 2024, section 2.2): batch 4,608 x 1,024 tokens, peak lr 8e-4
after a 3B-token warmup, held (warmup-stable-decay), 1.7T tokens at 1,024 with both rotary bases
at 10,000, then the context extension (configs/modernbert_base_long.py) with the 1-sqrt decay.
The release also warmed the batch size up from 768 to 4,608 rows over the first 50B tokens, each
size for as many steps (train.batch_warmup_*, data/pipeline.py BatchWarmup): here 768, 1,536, ...,
3,840 rows for 4,239 steps each (21,195 steps, 50.0B tokens; both sizes divide over the 32 chips),
then 4,608. Counted in steps at those sizes: the lr warmup's 3B tokens are 3,815 steps of 768 rows,
and the phase's 1.7T tokens 370,875 steps (tests/test_batch_warmup.py checks these sums); its
decay tail over the last 10% lets it stand alone. Expected: not run here (no pod); the paper's base reaches GLUE 88.4 after its
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
    c.train.batch_warmup_start = 768     # the release's batch-size warmup: 768 -> 4,608 rows
    c.train.batch_warmup_steps = 21_195  # over 50B tokens (5 sizes x 4,239 steps)
    c.train.steps = 370_875          # 1.7T tokens, the warmup's smaller batches included
    c.train.log_every = 100
    c.optim.lr = 8e-4
    c.optim.warmup_steps = 3_815     # 3B tokens, at the warmup's 768 rows a step
    c.optim.decay_steps = 37_000     # the 1-sqrt tail: the last 10%
    c.checkpoint.every_steps = 5_000
    c.checkpoint.keep = 3
    c.eval.every_steps = 10_000
    c.perf.peak_tflops = 0.0
    return c
