"""Which context-parallel strategy a variant gets: the one it declares, or the all-gather fallback."""

from __future__ import annotations

from ..base import AttentionVariant, get_variant
from ..full import FullAttention
from ..performer import PerformerAttention
from ..sliding_window import SlidingWindowAttention

FALLBACK = "all-gather"
"""The strategy of a variant that declares none (:mod:`.gather`)."""

# The declared strategies and the variant class each computes.
STRATEGIES: dict[str, type[AttentionVariant]] = {
    "ring": FullAttention,
    "halo": SlidingWindowAttention,
    "scan": PerformerAttention,
}


def strategy_of(variant: AttentionVariant | str) -> str:
    """The context-parallel strategy of ``variant`` (an instance or a registered name): its
    declared ``context_parallel`` (``ring``, ``halo``, ``scan``) or :data:`FALLBACK`. A declared
    strategy that is unknown, or that computes another variant than this one, raises ValueError."""
    var = get_variant(variant) if isinstance(variant, str) else variant
    name = var.context_parallel
    if name is None:
        return FALLBACK
    if name not in STRATEGIES:
        raise ValueError(
            f"variant {var.name!r} declares context_parallel={name!r}; strategies are {', '.join(STRATEGIES)}"
        )
    if not isinstance(var, STRATEGIES[name]):
        raise ValueError(
            f"variant {var.name!r} declares context_parallel={name!r}, which computes {STRATEGIES[name].__name__} only"
        )
    return name
