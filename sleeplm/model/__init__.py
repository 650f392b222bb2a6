"""The model: mixer kinds (`kinds.py` registers them), the MLP, norms, RoPE and the block stack (`hybrid.py`)."""
