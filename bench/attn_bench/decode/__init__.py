"""The decoding benchmark (``attn-bench sweep --decode``): per-token cost and memory of a
variant's incremental state, checked against the causal forward."""
