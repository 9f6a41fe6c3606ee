"""`python -m pretrain`: ModernBERT (the default), BERT and MAE pretraining on one loop."""
