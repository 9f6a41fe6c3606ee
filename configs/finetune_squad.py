"""Extractive question answering on SQuAD (v1.1 or v2.0) with the BERT paper's recipe: 384-token
windows 128 tokens apart, 64 question tokens, answers of at most 30 tokens from the 20 best starts
and ends of every window, batch 32, 2 epochs at 3e-5 (batch 32 and lr 5e-5 for BERT-base in the
paper; 3e-5 is the usual choice for smaller batches).

Run on SQuAD from TFDS, prepared once in array_record format (`tfds build squad --config v1.1
--data_dir DIR --file_format array_record`), or on your own SQuAD-format DIR/train.json and
DIR/dev.json:
    python -m finetune --config configs/finetune_squad.py --init HF_OR_PRETRAIN_DIR \
        --workdir runs/ft_squad --config.data.task=squad/v1.1 --config.data.data_dir=DIR
    python -m finetune --config configs/finetune_squad.py --init runs/bert_tiny \
        --workdir runs/ft_myqa --config.data.task=squad:DIR
`--config.family=modernbert` with a ModernBERT source runs ModernBertForQuestionAnswering.

Expected with BERT-base (Devlin et al. 2019, dev): SQuAD v1.1 EM ~80.8, F1 ~88.5; v2.0 F1
~76 with the no-answer threshold chosen on dev (reported as dev/threshold). results.json has
dev/exact_match and dev/f1 (percent, the official script's definitions); predictions_dev.json is
{question id: answer}, the file the official evaluate script reads. The best dev checkpoint
exports as BertForQuestionAnswering (`python -m models.hf export --checkpoint WORKDIR/best`).
"""

from configs import finetune_rt_polarity


def get_config():
    c = finetune_rt_polarity.get_config()
    c.data.task = "squad/v1.1"       # squad/v1.1 | squad/v2.0 (TFDS) | squad:DIR (train.json, dev.json)
    c.data.max_seq_len = 384
    c.data.doc_stride = 128
    c.data.max_query_len = 64
    c.data.max_answer_len = 30
    c.data.n_best = 20
    c.train.epochs = 2.0
    c.optim.lr = 3e-5
    return c
