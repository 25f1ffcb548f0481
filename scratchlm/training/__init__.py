"""Training: our own backward pass (backward.py); data, optimizer, trainer and checkpoints build on it."""
