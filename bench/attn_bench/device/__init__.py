"""GPU jobs: ``attn-bench device-check`` (one budgeted pass over a GPU that writes everything
a card can tell us) and ``attn-bench tune`` (the kernels' config tables)."""
