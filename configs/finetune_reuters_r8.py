"""Fine-tune on Reuters R8 topic classification (8 classes, 5,485 train / 2,189 test articles).

Run:
    python -m finetune --config configs/finetune_reuters_r8.py --init runs/bert_tiny \
        --workdir runs/ft_reuters_r8

Expected: well above the 0.49 of always answering the majority class (earn); published
bag-of-words and graph baselines reach 0.95-0.97. Articles average ~100 words, so 128 tokens
keep most of each. Measured from the default pretraining (7,000 BERT-tiny steps on news) with
--config.data.max_seq_len=64 --config.train.epochs=3, lr 5e-4, median of 3 seeds: test 0.912
vs 0.854 from a random init; frozen, a mean-pooled probe gets 0.800 vs 0.757 on random features
(benchmarks/transfer.py --config.data.task=reuters_r8).
"""

from configs import finetune_rt_polarity


def get_config():
    c = finetune_rt_polarity.get_config()
    c.data.task = "reuters_r8"
    c.data.max_seq_len = 128
    c.train.epochs = 5.0
    return c
