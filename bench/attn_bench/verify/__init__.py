"""``attn-bench verify``: every variant x backend checked on fresh random inputs."""
