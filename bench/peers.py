"""Other libraries' implementations of the variants, registered as baselines (none yet)."""
