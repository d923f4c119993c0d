"""The learning library: DKD model, losses, training, evaluation and data. Knows nothing of the daemon."""
