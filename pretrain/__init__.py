"""BERT pretraining with MLM and NSP: `python -m pretrain`."""
