"""Long-context evaluation: a RULER-style synthetic suite (passkey, needles in a haystack, variable tracking)
generated locally and read window by window in constant device memory."""
