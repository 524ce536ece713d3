"""The whole-model benchmark (``attn-bench model``): a Transformers model with each attention
implementation, timed and checked per sequence length; its runner, presets and report."""
