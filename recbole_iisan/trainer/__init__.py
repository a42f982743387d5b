"""Training: the trainer every model uses, its checkpoints, and the Ray Tune search."""
