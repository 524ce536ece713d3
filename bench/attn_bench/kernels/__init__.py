"""The static kernel report (``attn-bench kernels``): every Triton kernel compiled for a target GPU
on a machine without one, with registers, spills, shared memory and its main loop's SASS."""
