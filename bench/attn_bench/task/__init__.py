"""The task benchmark (``attn-bench task``): small models trained with each variant on synthetic
tasks; the tasks, the model and training loop, the runner and the report. The long-input and
attention-swap studies (``long/``, ``swap/``) run through the same runner."""
