"""Pallas kernels for sleeplm's hot ops (`gated_delta`: the chunked gated delta rule, forward and backward)."""
