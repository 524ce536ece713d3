"""Performer (FAVOR+) approximation error against exact softmax attention.

Inputs ``q, k, v ~ N(0, 1)`` with ``B=1``; with the default scale ``D**-0.5`` the attention
logits ``q.k / sqrt(D)`` then have standard deviation 1. *Sharpness* ``s`` multiplies ``q`` by
``s``, so the logits have standard deviation ``s`` and the softmax grows peaked; positive
random features need exponentially many features as ``s`` grows, which is where they break
down. Both the Performer (``torch`` backend) and the exact attention run in float64, so the
error is the approximation alone, not rounding. ``rel_err = ||out - exact||_F / ||exact||_F``.
"""

from __future__ import annotations

import torch

import attention_variants as av

from .config import AccuracyStudy


def performer_error(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_features: int, ortho: bool, seed: int, causal: bool
) -> tuple[float, float]:
    """``(rel_err, max_err)`` of FAVOR+ with ``num_features`` against exact softmax attention."""
    exact = av.FullAttention().reference(q, k, v, causal=causal)
    perf = av.PerformerAttention(num_features=num_features, ortho=ortho, seed=seed)
    out = perf(q, k, v, causal=causal, backend="torch")
    diff = out - exact
    return (diff.norm() / exact.norm()).item(), diff.abs().max().item()


def run_accuracy(study: AccuracyStudy) -> list[dict]:
    rows = []
    d, n, h = study.head_dim, study.seq_len, study.heads
    for causal in study.causal:
        for seed in range(study.seeds):
            gen = torch.Generator().manual_seed(10_000 + seed)
            q, k, v = (torch.randn(1, h, n, d, generator=gen, dtype=torch.float64) for _ in range(3))
            for m in study.num_features:
                for ortho in (True, False):
                    rel, mx = performer_error(q, k, v, m, ortho, seed, causal)
                    rows.append(_row("features", n, d, causal, m, ortho, 1.0, seed, rel, mx))
            for s in study.sharpness:
                for ortho in (True, False):
                    m = study.sharpness_features
                    rel, mx = performer_error(q * s, k, v, m, ortho, seed, causal)
                    rows.append(_row("sharpness", n, d, causal, m, ortho, s, seed, rel, mx))
    return rows


def _row(study, n, d, causal, m, ortho, sharpness, seed, rel, mx) -> dict:
    return {
        "study": study,
        "seq_len": n,
        "head_dim": d,
        "causal": causal,
        "num_features": m,
        "ortho": ortho,
        "sharpness": sharpness,
        "seed": seed,
        "rel_err": rel,
        "max_err": mx,
    }
