"""Pretrained Hugging Face checkpoints in and out of sleeplm: `convert` (a transformers checkpoint directory to a
sleeplm workdir), `export` (a workdir's parameters back to a directory transformers loads). The tensor map is
defined once (`mapping.py`) and read both ways; the config translation per architecture is `families.py`."""
