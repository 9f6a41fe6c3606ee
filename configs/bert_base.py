"""BERT-base (12 layers, 768 hidden), MLM + NSP, the original recipe's shape on a pod slice.

Run on a TPU v4-32 (16 chips) or 2 x 8 GPUs (see launch/README.md):
    python -m pretrain --config configs/bert_base.py --workdir gs://BUCKET/bert_base \
        --config.data.source=tfds:wikipedia/20230601.en --config.data.data_dir=gs://BUCKET/tfds

Domain-adaptive pretraining of a published checkpoint (a HuggingFace BertForPreTraining folder,
e.g. bert-base-uncased saved with save_pretrained): its weights, tokenizer and shape, a fresh
optimizer and step, on the new corpus (optim.lr and train.steps as for a second phase):
    python -m pretrain --config configs/bert_base.py --init /models/bert-base-uncased \
        --workdir gs://BUCKET/dapt --config.data.source=files:/data/domain/*.jsonl \
        --config.train.steps=12500 --config.optim.warmup_steps=1000

Expected: BERT's 1M steps at batch 256 x 512 give MLM accuracy ~0.70 and GLUE ~80; this config
runs the first phase at sequence length 128 (90% of the original steps).
"""

from configs import bert_tiny


def get_config():
    c = bert_tiny.get_config()
    c.model.size = "base"
    c.model.dtype = "bfloat16"
    c.model.dropout = 0.1
    c.model.attention_dropout = 0.1
    c.data.vocab_size = 30522
    c.data.max_seq_len = 128
    c.data.max_predictions = 20
    c.train.steps = 900_000
    c.train.batch_size = 256
    c.train.log_every = 100
    c.optim.lr = 1e-4
    c.optim.warmup_steps = 10_000
    c.optim.decay_steps = 0          # BERT: linear decay over all steps after warmup
    c.checkpoint.every_steps = 5_000
    c.checkpoint.keep = 3
    c.eval.every_steps = 10_000
    c.perf.peak_tflops = 0.0
    return c
