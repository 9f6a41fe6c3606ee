"""ModernBERT-tiny's context extension: phase 2 of the recipe, from a modernbert_tiny run.

Run (after configs/modernbert_tiny.py):
    python -m pretrain --config configs/modernbert_tiny_long.py --init runs/modernbert_tiny \
        --workdir runs/modernbert_tiny_long

As the release's phase 2 (Warner et al. 2024, section 2.2): the global layers' rotary base
raised from 10,000 to 160,000 and rows four times longer (512 tokens, the same 2,048 tokens a
step), a lower peak lr and the 1-sqrt decay over the whole phase. Weights and tokenizer come from
--init (a fresh optimizer and step). Expected: not measured yet.
"""

from configs import modernbert_tiny


def get_config():
    c = modernbert_tiny.get_config()
    c.model.global_rope_base = 160_000.0
    c.data.max_seq_len = 512
    c.data.max_predictions = 154     # 30% of 512, rounded up
    c.train.batch_size = 4
    c.train.steps = 1000
    c.optim.lr = 3e-4
    c.optim.warmup_steps = 50
    c.optim.decay_steps = 0          # 1-sqrt over the whole phase after warmup
    return c
