"""Sharding across devices: logical axes and their rules (`axes.py`), meshes and the shardings of parameters,
batches and the sleep state (`mesh.py`)."""
