"""What a backend computes for a variant (:class:`Target`) and the refusal a backend raises when it
cannot run a configuration here (:class:`Unsupported`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

import attention_variants as av

Fn = Callable[[Tensor, Tensor, Tensor], Tensor]


class Unsupported(Exception):
    """The backend cannot run this configuration here (the message says why)."""


@dataclass(frozen=True)
class Target:
    """What a backend computes for a variant: the callable, the variant whose math it computes
    (``truth``: its float64 ground truth is what ``max_err`` is measured against), the backend that
    actually runs, whether it materialises N x N (scores or mask), and a note on its semantics
    (a peer's documented deviation, recorded with the row)."""

    fn: Fn
    truth: av.AttentionVariant
    backend_used: str
    builds_dense: bool
    note: str = ""
    ground_truth: Fn | None = None
    """float64 ground truth of ``fn`` on the full inputs, when it is not the truth variant's own (a
    peer whose documented semantics differ, e.g. performer-pytorch's epsilons). The checker then
    measures, and reports, how far that ground truth is from the truth variant's."""
