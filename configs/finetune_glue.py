"""Fine-tune on one GLUE task with the BERT paper's recipe (batch 32, 3 epochs, 128 tokens).

GLUE is read with `tfds.data_source` (no TensorFlow) from `data.data_dir`, prepared once in
array_record format, e.g. `tfds build glue --config mrpc --data_dir DIR --file_format array_record`.
Run (task: glue/cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte or wnli):
    python -m finetune --config configs/finetune_glue.py --init HF_OR_PRETRAIN_DIR \
        --workdir runs/ft_glue_mrpc --config.data.task=glue/mrpc --config.data.data_dir=DIR \
        --sweep lr=2e-5,3e-5,5e-5 --seeds 5

Expected with BERT-base (Devlin et al. 2019, dev): MRPC F1 ~0.88, SST-2 ~0.93, MNLI-m ~0.84,
CoLA MCC ~0.52-0.58, STS-B Pearson ~0.88; small sets (RTE, MRPC, CoLA) vary a lot across seeds,
hence the median over seeds. Test labels are hidden: predictions_test.tsv is for submission.
"""

from configs import finetune_rt_polarity


def get_config():
    c = finetune_rt_polarity.get_config()
    c.data.task = "glue/mrpc"
    c.data.max_seq_len = 128
    c.train.epochs = 3.0
    c.optim.lr = 2e-5
    return c
