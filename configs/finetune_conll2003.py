"""Fine-tune on CoNLL-2003 English named entities (PER, LOC, ORG, MISC; 14,041 / 3,250 / 3,453
sentences), the BERT paper's token-classification task.

CoNLL-2003 is read with `tfds.data_source` (no TensorFlow) from `data.data_dir`, prepared once
in array_record format: `tfds build conll2003 --data_dir DIR --file_format array_record`. The
same recipe reads your own files with --config.data.task=conll:DIR (DIR/train.conll, dev.conll,
test.conll: word first, tag last, a blank line between sentences). Run:
    python -m finetune --config configs/finetune_conll2003.py --init HF_OR_PRETRAIN_DIR \
        --workdir runs/ft_conll2003 --config.data.data_dir=DIR --sweep lr=2e-5,3e-5,5e-5 --seeds 3

Expected with BERT-base (Devlin et al. 2019, first sub-token, no document context): test entity
F1 ~0.92 (dev ~0.95); a BERT-tiny encoder from the default news pretraining should land far
lower (not measured here: the data needs a machine with network access to prepare).
"""

from configs import finetune_rt_polarity


def get_config():
    c = finetune_rt_polarity.get_config()
    c.data.task = "conll2003"
    c.data.max_seq_len = 128
    c.train.epochs = 3.0
    c.optim.lr = 5e-5
    return c
