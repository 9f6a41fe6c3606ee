"""Fine-tuning BERT encoders on labelled tasks: `python -m finetune` (see finetune/train.py)."""
