"""Training application pieces: setup, step, loop, checkpoints, logging."""
