"""The context-parallel benchmark (``attn-bench cp``): sharded attention over ranks on
torch.distributed, checked against one device, with its traffic and report."""
