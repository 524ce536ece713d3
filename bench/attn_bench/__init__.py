"""The benchmark harness behind ``attn-bench``: sweeps, baselines, numerics gate, plots and reports."""
