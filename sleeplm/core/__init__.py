"""The method: the carried state, the whole-sequence forward and the streaming wake/sleep steps, built from one
window pass of the block stack."""
