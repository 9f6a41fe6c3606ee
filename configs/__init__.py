"""Experiment configs: one file per experiment, `get_config()` returns an ml_collections.ConfigDict."""
