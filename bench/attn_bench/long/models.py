"""Classifiers of documents longer than the encoder's training length ``L``.

Every strategy returns logits ``(B, 1, C)`` like an encoder :class:`~attn_bench.task.train.TaskModel`
and has ``causal = False``, so :func:`attn_bench.task.train.train` and ``evaluate`` drive it as is.

- ``truncate``: the encoder (length ``L``) over the first ``L`` tokens only.
- ``segment_pool``: the document cut into chunks of ``L`` (the last one padded), each encoded by
  the same encoder into its mean hidden state; the chunk vectors are mean-pooled and classified.
- ``hierarchical``: the same chunk vectors plus a learned segment position, one full-attention
  block over the segments, a norm, a mean over segments, then the head.
- ``whole``: one encoder over the whole input with the run's attention variant (any registered
  variant: a sliding window, the Performer, a plug-in's).

The first three run exact attention (:func:`attn_bench.core.variants.exact_variant`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from attn_bench.core.variants import exact_variant
from attn_bench.task.train import Block, TaskModel

WHOLE = "whole"
"""The strategy that attends over the whole input, with any variant."""
STRATEGIES: tuple[str, ...] = ("truncate", "segment_pool", "hierarchical", WHOLE)


def chunk(ids: Tensor, length: int, pad: int = 0) -> Tensor:
    """``(B, N)`` -> ``(B, ceil(N / length), length)``; the last chunk is padded with ``pad``."""
    b, n = ids.shape
    s = -(-n // length)
    out = ids.new_full((b, s * length), pad)
    out[:, :n] = ids
    return out.view(b, s, length)


def unchunk(chunks: Tensor, n: int) -> Tensor:
    """Inverse of :func:`chunk`: ``(B, S, L, ...)`` -> ``(B, n, ...)`` (the padding dropped)."""
    b, s, length = chunks.shape[:3]
    return chunks.reshape(b, s * length, *chunks.shape[3:])[:, :n]


class LongClassifier(nn.Module):
    """One strategy over documents ``(B, N)`` (token id 0 is padding); see the module docstring."""

    causal = False

    def __init__(
        self,
        strategy: str,
        vocab_size: int,
        num_classes: int,
        segment_len: int,
        seq_len: int,
        *,
        variant: str | None = None,
        options: dict[str, Any] | None = None,
        d_model: int = 32,
        heads: int = 2,
        layers: int = 2,
        conv: int = 3,
    ) -> None:
        super().__init__()
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; strategies are {', '.join(STRATEGIES)}")
        self.strategy, self.segment_len = strategy, segment_len
        whole = strategy == WHOLE
        if whole and variant is None:
            raise ValueError(f"strategy {WHOLE!r} needs a variant")
        self.encoder = TaskModel(
            vocab_size,
            num_classes,
            seq_len if whole else segment_len,
            variant=variant if whole else exact_variant(),
            options=options if whole else {},
            d_model=d_model,
            heads=heads,
            layers=layers,
            causal=False,
            conv=conv,
        )
        if strategy == "hierarchical":
            segments = -(-seq_len // segment_len)
            self.seg_pos = nn.Parameter(torch.randn(segments, d_model) * 0.02)
            self.seg_block = Block(d_model, heads, exact_variant(), {}, False, 0)
            self.seg_norm = nn.LayerNorm(d_model)

    def segment_vectors(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """Chunk vectors ``(B, S, d_model)`` and which chunks hold a token ``(B, S)`` (bool)."""
        chunks = chunk(ids, self.segment_len)
        b, s, length = chunks.shape
        # the last chunk's padding is masked: a chunk's vector is that of its tokens alone
        vecs = self.encoder.pool(chunks.reshape(b * s, length), mask_padding=True).view(b, s, -1)
        return vecs, (chunks != 0).any(-1)

    def forward(self, ids: Tensor) -> Tensor:
        """Logits ``(B, 1, C)`` of documents ``ids`` ``(B, N)``."""
        enc = self.encoder
        if self.strategy == "truncate":
            return enc.head(enc.pool(ids[:, : self.segment_len]))
        if self.strategy == WHOLE:
            return enc(ids)
        vecs, keep = self.segment_vectors(ids)
        if self.strategy == "hierarchical":
            vecs = self.seg_norm(self.seg_block(vecs + self.seg_pos[: vecs.shape[1]]))
        w = keep.unsqueeze(-1).to(vecs.dtype)
        pooled = (vecs * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp_min(1)
        return enc.head(pooled)
