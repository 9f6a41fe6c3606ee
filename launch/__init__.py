"""Launchers: local multi-process (`launch.local`), TPU VM slices (`launch.tpu`), SLURM (`launch.slurm`)."""
