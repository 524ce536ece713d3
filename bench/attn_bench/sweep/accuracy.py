"""Performer (FAVOR+) approximation error against exact softmax attention.

Inputs: ``v ~ N(0, 1)`` and ``q, k ~ N(0, s)`` entries (``B=1``), so with the default scale
``D**-0.5`` the attention logits ``q.k / sqrt(D)`` have standard deviation ``s``: the
*sharpness*. As ``s`` grows the softmax grows peaked and the FAVOR+ estimator's variance, which
grows like ``exp(|q'|^2 + |k'|^2)`` with ``|q'|^2 = s sqrt(D)``, explodes: that is where
positive random features break down. Both the Performer (``torch`` backend) and the exact
attention run in float64, so the error is the approximation alone, not rounding.

``rel_err = rms(out - exact) / rms(v)``: the output error in units of the values' scale (the
exact output of soft attention over random values is itself close to zero, so dividing by its
norm would be ill-conditioned).
"""

from __future__ import annotations

import torch

import attention_variants as av
from attn_bench.core.config import AccuracyStudy


def performer_error(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_features: int,
    ortho: bool,
    seed: int,
    causal: bool,
    variant: str,
) -> tuple[float, float]:
    """``(rel_err, max_err)`` of the random-feature ``variant`` with ``num_features`` against the exact
    attention it approximates (``rel_err`` relative to the RMS of ``v``)."""
    perf = av.get_variant(variant, num_features=num_features, ortho=ortho, seed=seed)
    exact = perf.exact().reference(q, k, v, causal=causal)
    out = perf(q, k, v, causal=causal, backend="torch")
    diff = out - exact
    return (diff.pow(2).mean().sqrt() / v.pow(2).mean().sqrt()).item(), diff.abs().max().item()


def run_accuracy(study: AccuracyStudy) -> list[dict]:
    rows = []
    d, n, h = study.head_dim, study.seq_len, study.heads
    for causal in study.causal:
        for seed in range(study.seeds):
            gen = torch.Generator().manual_seed(10_000 + seed)
            q, k, v = (torch.randn(1, h, n, d, generator=gen, dtype=torch.float64) for _ in range(3))
            s0 = study.features_sharpness
            for m in study.num_features:
                for ortho in (True, False):
                    rel, mx = performer_error(q * s0**0.5, k * s0**0.5, v, m, ortho, seed, causal, study.variant)
                    rows.append(_row("features", n, d, causal, m, ortho, s0, seed, rel, mx))
            for s in study.sharpness:
                for ortho in (True, False):
                    m = study.sharpness_features
                    rel, mx = performer_error(q * s**0.5, k * s**0.5, v, m, ortho, seed, causal, study.variant)
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
