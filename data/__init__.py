"""Data sources, tokenisation and input pipelines for Pretrax."""
