"""The kernel sweep (``attn-bench`` / ``attn-bench sweep``, also the decode sweep): configs
measured in a worker, the Performer accuracy study, the analysis, plots and report, and the
performance targets (``attn-bench targets``)."""
