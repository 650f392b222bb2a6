"""Inference on a trained model: streams that carry the sleep state, generation and constant-memory scoring. Nothing
here imports training."""
