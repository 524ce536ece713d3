"""``attn-bench swap``: replace softmax attention in a trained byte-level LM by a sliding window or
FAVOR+, keeping the weights; measure the loss right after the swap and the fine-tuning steps that
win it back, against the same variant trained from scratch (the Performer paper's transfer
experiment), for the suite's own model and for a Hugging Face Llama through ``attn_implementation``.
"""
