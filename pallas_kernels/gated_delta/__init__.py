"""Pallas kernels for the chunked gated delta rule (`sleeplm.ops` selects them as `implementation="pallas"`)."""

from pallas_kernels.gated_delta.ops import gated_delta_rule_pallas, lowering_sizes

__all__ = ["gated_delta_rule_pallas", "lowering_sizes"]
