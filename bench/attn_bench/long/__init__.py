"""``attn-bench long``: documents longer than the model (truncate, segment, window, Performer)."""
