"""Full, sliding-window and Performer attention behind one interface, with reference,
PyTorch and Triton backends.

>>> import attention_variants as av
>>> out = av.attention(q, k, v, variant="sliding_window", window=256, causal=True)
"""

# Variants register in this order, which list_variants() and the harness report.
from . import full, sliding_window, performer  # noqa: I001, F401
from . import masks
from .base import (
    EXACT_VARIANT,
    AttentionVariant,
    Backend,
    SweepOption,
    attention,
    get_variant,
    list_backends,
    list_variants,
    register_backend,
    register_variant,
    variant_class,
)
from .capabilities import NEEDS
from .decode import DecodeState, KVCache, PerformerState, StateLayout, WindowCache
from .full import FullAttention
from .generate import TinyDecoder, generate, top_p_probs, top_p_sample
from .module import AttentionLayer
from .favor import PrecisionWarning, draw_projection
from .performer import PerformerAttention
from .sliding_window import SlidingWindowAttention

__all__ = [
    "EXACT_VARIANT",
    "NEEDS",
    "AttentionLayer",
    "AttentionVariant",
    "Backend",
    "DecodeState",
    "KVCache",
    "PerformerState",
    "StateLayout",
    "TinyDecoder",
    "WindowCache",
    "FullAttention",
    "PerformerAttention",
    "PrecisionWarning",
    "SlidingWindowAttention",
    "SweepOption",
    "attention",
    "draw_projection",
    "generate",
    "get_variant",
    "list_backends",
    "list_variants",
    "masks",
    "register_backend",
    "register_variant",
    "top_p_probs",
    "top_p_sample",
    "variant_class",
]

__version__ = "0.1.0"
