"""Training: the optimizer and step, sharded steps, evaluation, checkpoints, the run loop, presets, fine-tuning and
retrofits, and the model FLOP count."""
