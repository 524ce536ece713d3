"""Callables for every backend a sweep can name: the project's registry backends and the baselines.

- ``reference`` / ``torch`` / ``triton`` / ``auto`` (and a plug-in's own backends): the variant
  itself, through the registry.
- Baselines compute the *exact* computation a variant stands for (``variant.exact()``: itself,
  or for the Performer the full softmax attention it approximates), with the variant's mask
  predicate (``variant.mask_mod``):
  - ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` on the dense problem, with the
    dense mask (``is_causal`` when the mask is plain causal);
  - ``flex``: ``torch.compile``-d FlexAttention with the block mask of the same predicate.
    Compiled kernels and block masks are cached per shape in the process.
- Peers (other libraries, :mod:`attn_bench.baselines.peers`) register here too, with their own checks.

A baseline is registered with :func:`register_baseline`: a ``check`` (None when it can run a
variant here, else why not) and a ``make`` that builds ``fn(q, k, v) -> out``.
"""

# Importing the package registers the built-in baselines first, then the peers (the order of
# baseline_names()).
from attn_bench.baselines import torch_builtin, peers  # noqa: I001, F401
from attn_bench.baselines.registry import (
    Baseline,
    baseline_names,
    dense_bytes,
    exact_baselines,
    get_baseline,
    make_target,
    register_baseline,
    unsupported_reason,
)
from attn_bench.baselines.target import Fn, Target, Unsupported
from attn_bench.baselines.torch_builtin import flex_block_mask, flex_fn, sdpa_fn

__all__ = [
    "Baseline",
    "Fn",
    "Target",
    "Unsupported",
    "baseline_names",
    "dense_bytes",
    "exact_baselines",
    "flex_block_mask",
    "flex_fn",
    "get_baseline",
    "make_target",
    "register_baseline",
    "sdpa_fn",
    "unsupported_reason",
]
