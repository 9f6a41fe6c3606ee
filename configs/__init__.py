"""Experiment configs: one file per experiment, `get_config()` returns an ml_collections.ConfigDict."""

from pathlib import Path

# What `python -m pretrain` and `python -m pretrain.prepare` run without --config (and so the
# default workdir, runs/modernbert_tiny): it beat bert_tiny on eval MLM accuracy and reuters_r8.
PRETRAIN_DEFAULT = str(Path(__file__).with_name("modernbert_tiny.py"))
