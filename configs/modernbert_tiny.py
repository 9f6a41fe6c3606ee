"""ModernBERT-tiny (4 layers, 128 hidden) with ModernBERT's recipe on the embedded English news
corpus: the default, what `python -m pretrain` runs with no flags (configs.PRETRAIN_DEFAULT).

Run (the same as `python -m pretrain`):
    python -m pretrain --config configs/modernbert_tiny.py --workdir runs/modernbert_tiny

The recipe of Warner et al. (2024) at this machine's scale: MLM alone on packed rows (attention
within each document, rotary positions restarting there), 30% of tokens masked in training and
15% in evaluation (comparable with BERT's eval/mlm_accuracy), a byte-level BPE vocabulary trained
on the corpus, AdamW with betas (0.9, 0.98), eps 1e-6 and decoupled weight decay 1e-5 (none on
norms), StableAdamW-style per-tensor update clipping instead of a global gradient clip, and a
warmup-stable-decay schedule with a 1-sqrt tail. Global layers (every third, from the first) and
local ones (a 128-token window, so 128-token rows make it matter) both use rotary base 10,000, as
the release's first phase did; its context extension raises the global base to 160,000
(configs/modernbert_base_long.py).

Expected on 2 idle CPU cores: about 18 minutes, install included, ending at eval/mlm_accuracy
0.318; bert_tiny in the same wall clock reaches 0.257-0.267 (on its own WordPiece tokens), and
reuters_r8 fine-tuned from each gets 0.951 against 0.914 (benchmarks/RESULTS.md, must-show 4).
train.steps buys bert_tiny's wall clock: 4,000 x 2,048 = 8.2M tokens, 0.57 of bert_tiny's, as its
FLOPs per token are ~1.7x. Raise train.steps (and optim.decay_steps with it) if your budget is
larger: the accuracy is still rising at the end.
"""

from configs import bert_tiny


def get_config():
    c = bert_tiny.get_config()
    c.family = "modernbert"          # pretrain/modernbert.py
    c.model.size = "tiny"            # models/modernbert.py SIZES
    c.model.local_window = 128       # tokens a local layer sees in all (64 each side)
    c.model.global_rope_base = 10_000.0   # phase 1; 160,000 in the context extension
    c.model.local_rope_base = 10_000.0

    c.data.objective = "mlm_packed"  # the only one: no sentence task
    c.data.tokenizer_kind = "bpe"    # byte-level BPE trained on the corpus, as ModernBERT's
    c.data.max_seq_len = 128
    c.data.mask_prob = 0.3           # training
    c.data.eval_mask_prob = 0.15     # evaluation, as BERT's
    c.data.max_predictions = 40      # 30% of 128, rounded up

    c.train.batch_size = 16          # 2,048 tokens a step, as bert_tiny's 32 x 64
    c.train.steps = 4000             # bert_tiny's wall clock (half its tokens: ~1.7x its FLOPs a token)
    c.optim.decay_steps = 800        # the 1-sqrt tail over the last fifth

    c.optim.b2 = 0.98
    c.optim.eps = 1e-6
    c.optim.weight_decay = 1e-5
    c.optim.decoupled_decay = True
    c.optim.clip_norm = 0.0          # the per-tensor update clip instead
    c.optim.update_clip = 1.0
    c.optim.decay = "1-sqrt"
    return c
