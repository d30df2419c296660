"""Training: the trainer loop, checkpoints, optimizer/EMA, parallelism and validation."""
