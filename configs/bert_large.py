"""BERT-large (24 layers, 1024 hidden): base's recipe with FSDP, rematerialisation and the
scanned layer stack (benchmarks/RESULTS.md: its compile time against the unrolled stack).

Run on a TPU v4-128 (see launch/README.md):
    python -m pretrain --config configs/bert_large.py --workdir gs://BUCKET/bert_large \
        --config.data.source=tfds:wikipedia/20230601.en --config.data.data_dir=gs://BUCKET/tfds
"""

from configs import bert_base


def get_config():
    c = bert_base.get_config()
    c.model.size = "large"
    c.model.remat = "full"
    c.model.scan_layers = True
    c.mesh.data = -1
    c.mesh.fsdp = 8
    c.train.batch_size = 1024
    c.optim.lr = 1e-4
    return c
