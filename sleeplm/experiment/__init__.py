"""What training and inference share: the experiment record (`schema.py`), its command-line overrides
(`overrides.py`) and the run directory (`workdir.py`)."""
