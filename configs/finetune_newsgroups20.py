"""Fine-tune on 20 Newsgroups (20 classes, 11,293 train / 7,528 test posts).

Run:
    python -m finetune --config configs/finetune_newsgroups20.py --init runs/bert_tiny \
        --workdir runs/ft_newsgroups20

Expected: well above the 0.05 of chance (published models reach ~0.85 on 20 Newsgroups; this
version, from Orange, is lower-cased without punctuation). Posts average ~270 words: 256 tokens.
"""

from configs import finetune_rt_polarity


def get_config():
    c = finetune_rt_polarity.get_config()
    c.data.task = "newsgroups20"
    c.data.max_seq_len = 256
    c.train.epochs = 5.0
    return c
