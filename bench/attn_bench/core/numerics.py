"""The numerics checker: one backend's output (and gradients) against a float64 ground truth.

One checker for everything: ``attn-bench verify``, every sweep row (measured before timing; a row
that fails gets ``status=wrong`` and no speed figures) and the test suite (tests/helpers.py).

Ground truth. For a softmax variant (``variant.softmax``: ``softmax(scale q k^T)`` under the
variant's mask predicate) the checker computes it itself, in float64, from the predicate alone:
query rows in blocks, ``exp(s - rowmax)`` written out, the normalisation applied after the
product with V, heads gathered by index. It shares no arithmetic with the variant's own code, so
a wrong ``reference`` backend fails too. A variant that is not a softmax (the Performer, a
plug-in's own math) has no second definition: its float64 ``reference`` is the ground truth.

Criterion (FlashAttention's): ``max|out - truth| <= factor * max|pt - truth| + atol[dtype]``,
where ``pt`` is a naive computation of the same attention in the same dtype, with and without
float32 accumulation (the larger finite error counts): for a softmax variant the checker's own
formula in that dtype, otherwise the variant's ``dense``. ``factor`` is 2 for outputs and 3 for
gradients. Also fla's RMS criterion, ``rms(out - truth) <= ratio[dtype] * rms(truth) + atol``.
A peer library whose math differs from ours by design (performer-pytorch's epsilons) is gated
against its own math in float64, and its distance from ours is reported (``semantic_dev``).

Before any number, the output must be a tensor of the inputs' dtype, device and shape
``(B, H, Nq, Dv)``, finite everywhere.

Long sequences: the float64 ground truth needs ``B*H*rows*Nk`` elements. When the whole problem
does not fit in ``check_elems``, a sample of ``rows`` query rows spread over the whole sequence is
checked (:func:`sample_rows`: the first and the last rows, runs across tile edges, random runs),
each run exactly: for a softmax variant the ground truth of rows ``[s, e)`` applies the mask
predicate of the whole problem at those rows' own positions; for another variant (whose row
depends on its own query and, when causal, on the keys up to its aligned position) it is the
variant on ``q[..., s:e, :]`` with, when causal, the keys up to the last row's aligned position, so
that bottom-right alignment puts every row where it was. Gradients are then not checked, since dk
and dv depend on every query.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

import attention_variants as av
from attention_variants.checks import resolve_scale
from attention_variants.dense import compute_dtype
from attention_variants.masks import MaskMod
from attn_bench.baselines.target import Target

ATOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}

RMS_RATIO = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 4e-2}

FWD_FACTOR = 2.0

BWD_FACTOR = 3.0

TRUTH_BLOCK = 128  # query rows per block of the independent softmax computation

SAMPLE_RUNS = 16  # at most this many runs of query rows make a long sequence's sample

TILE_ROWS = 64  # the sample's runs straddle multiples of this (the kernels' query tiles are 16 to 128 rows)

Fn = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    max_err: float | None  # output, over the checked rows
    bound: float | None
    grad_err: float | None = None  # max over dq, dk, dv (None when not checked)
    grad_bound: float | None = None
    approx_err: float | None = None  # an approximation's output against its exact variant (float64)
    rows: int = 0  # query rows checked
    message: str = ""
    semantic_dev: float | None = None  # a peer's own float64 math against ours (its documented deviation)


def _max_abs(x: Tensor, ref: Tensor) -> float:
    if x.numel() == 0:
        return 0.0
    return (x.double() - ref.double()).abs().max().item()


def _rms(x: Tensor) -> float:
    return x.double().pow(2).mean().sqrt().item() if x.numel() else 0.0


def run_with_grads(
    fn, q: Tensor, k: Tensor, v: Tensor, dout: Tensor | None
) -> tuple[Tensor, tuple[Tensor, ...] | None]:
    """``fn(q, k, v)`` and, when ``dout`` is given, the gradients of q, k, v (zeros where unused)."""
    if dout is None:
        with torch.no_grad():
            return fn(q, k, v), None
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), dout.to(out.dtype), allow_unused=True)
    grads = tuple(torch.zeros_like(t) if g is None else g for g, t in zip(grads, (q, k, v), strict=True))
    return out.detach(), grads


def softmax_by_rows(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mod: MaskMod | None,
    scale: float,
    acc: torch.dtype | None = None,
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    """Masked softmax attention written out, independent of the variants' code.

    ``q (B,H,Nq,D)``, ``k (B,Hk,Nk,D)``, ``v (B,Hk,Nk,Dv)``; ``mod(qi, ki)`` the mask predicate
    (None: all visible); ``key_padding_mask (B, Nk)``: keys where it is False are hidden as well.
    Rows with no visible key give 0. Computes in ``acc`` (default: the input dtype) and returns
    the input dtype. Differentiable.
    """
    dtype = q.dtype
    acc = acc or dtype
    nq, nk = q.shape[2], k.shape[2]
    heads = torch.arange(q.shape[1], device=q.device) // (q.shape[1] // k.shape[1])
    kh, vh = k[:, heads].to(acc), v[:, heads].to(acc)
    keys = torch.arange(nk, device=q.device)[None, :]
    outs = []
    for start in range(0, nq, TRUTH_BLOCK):
        rows = torch.arange(start, min(nq, start + TRUTH_BLOCK), device=q.device)[:, None]
        s = torch.matmul(q[:, :, start : start + TRUTH_BLOCK].to(acc) * scale, kh.transpose(-1, -2))
        if mod is not None:
            s = s.masked_fill(~mod(rows, keys), float("-inf"))
        if key_padding_mask is not None:
            s = s.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
        top = s.amax(dim=-1, keepdim=True).detach()
        p = torch.exp(s - torch.where(torch.isfinite(top), top, 0.0))
        num, den = torch.matmul(p, vh), p.sum(dim=-1, keepdim=True)
        outs.append(torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 0.0))
    return torch.cat(outs, dim=2).to(dtype) if outs else q.new_zeros(*q.shape[:3], v.shape[-1])


def truth_fn(variant: av.AttentionVariant, causal: bool, scale: float, key_padding_mask: Tensor | None = None) -> Fn:
    """The float64 ground truth of ``variant`` (see the module docstring), with the keys where
    ``key_padding_mask (B, Nk)`` is False hidden."""
    kpm = key_padding_mask
    if variant.softmax:
        return lambda a, b, c: softmax_by_rows(
            a, b, c, variant.mask_mod(a.shape[2], b.shape[2], causal, a.device), scale, key_padding_mask=kpm
        )
    return lambda a, b, c: variant(a, b, c, causal=causal, scale=scale, backend="reference", key_padding_mask=kpm)


def same_dtype_fns(
    variant: av.AttentionVariant, causal: bool, scale: float, key_padding_mask: Tensor | None = None
) -> list[Fn]:
    """Naive computations in the inputs' dtype, without and with float32 accumulation: the error
    PyTorch itself makes in that dtype, which sets the bound."""
    kpm = key_padding_mask
    if variant.softmax:

        def naive(a, b, c, acc=None):
            mod = variant.mask_mod(a.shape[2], b.shape[2], causal, a.device)
            return softmax_by_rows(a, b, c, mod, scale, acc, key_padding_mask=kpm)

        return [naive, lambda a, b, c: naive(a, b, c, compute_dtype(a.dtype))]
    if kpm is None:  # a plug-in's dense() may predate key padding
        return [lambda a, b, c, up=up: variant.dense(a, b, c, causal, scale, upcast=up) for up in (False, True)]
    return [
        lambda a, b, c, up=up: variant.dense(a, b, c, causal, scale, upcast=up, key_padding_mask=kpm)
        for up in (False, True)
    ]


def sample_rows(nq: int, rows: int, seed: int = 0) -> list[tuple[int, int]]:
    """Sorted disjoint runs ``[start, end)`` of query rows, ``rows`` rows in all, spread over
    ``0 .. nq``: the first rows, the last rows, runs straddling tile edges (multiples of
    :data:`TILE_ROWS`) picked evenly over the sequence, and random runs (a generator seeded with
    ``seed``); all rows, ``[(0, nq)]``, when ``rows >= nq``."""
    if rows >= nq:
        return [(0, nq)]
    count = max(1, min(SAMPLE_RUNS, rows))
    length = max(1, rows // count)
    starts = [0, nq - length]
    edges = list(range(TILE_ROWS, nq, TILE_ROWS))
    n_edges = min(len(edges), (count - 2) // 2)
    if n_edges > 0:
        picks = {edges[round(i * (len(edges) - 1) / max(1, n_edges - 1))] for i in range(n_edges)}
        starts += [e - length // 2 for e in sorted(picks)]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    while len(starts) < count:
        starts.append(int(torch.randint(0, nq - length + 1, (1,), generator=gen)))
    covered: set[int] = set()
    for a in starts:
        a = max(0, min(a, nq - length))
        covered.update(range(a, a + min(length, rows - len(covered))))
    while len(covered) < rows:  # runs that overlapped: random rows up to ``rows``
        covered.add(int(torch.randint(0, nq, (1,), generator=gen)))
    runs: list[tuple[int, int]] = []
    for i in sorted(covered):
        if runs and i == runs[-1][1]:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def _rows_fns(
    variant: av.AttentionVariant,
    causal: bool,
    scale: float,
    kpm: Tensor | None,
    nq: int,
    nk: int,
    start: int,
    end: int,
    device: torch.device,
) -> tuple[Fn, list[Fn], int]:
    """``(truth, same-dtype fns, kend)`` for query rows ``[start, end)`` of an ``Nq x Nk`` problem:
    functions of ``(q[..., start:end, :], k[..., :kend, :], v[..., :kend, :])`` (see the module doc)."""
    if variant.softmax:
        whole = variant.mask_mod(nq, nk, causal, device)
        mod = whole if start == 0 or whole is None else (lambda r, c: whole(r + start, c))

        def naive(a, b, c, acc=None):
            return softmax_by_rows(a, b, c, mod, scale, acc, key_padding_mask=kpm)

        return naive, [naive, lambda a, b, c: naive(a, b, c, compute_dtype(a.dtype))], nk
    kend = nk - (nq - end) if causal else nk
    kp = None if kpm is None else kpm[:, : max(0, kend)]
    return truth_fn(variant, causal, scale, kp), same_dtype_fns(variant, causal, scale, kp), kend


def _output_problem(out: object, q: Tensor, v: Tensor) -> str:
    """Why ``out`` is not an attention output of ``q`` and ``v``'s dtype, device and shape, or ``""``."""
    if not isinstance(out, Tensor):
        return f"output is a {type(out).__name__}, not a tensor"
    want = (*q.shape[:3], v.shape[-1])
    if tuple(out.shape) != want:
        return f"output shape {tuple(out.shape)}, expected {want}"
    if out.dtype != q.dtype:
        return f"output dtype {out.dtype}, expected the inputs' {q.dtype}"
    if out.device != q.device:
        return f"output on {out.device}, expected the inputs' {q.device}"
    if not torch.isfinite(out).all():
        return "non-finite output"
    return ""


def _bound(errs: list[float], factor: float, dtype: torch.dtype, extra: float) -> float:
    finite = [e for e in errs if math.isfinite(e)]
    return factor * (max(finite) if finite else 0.0) + ATOL[dtype] + extra


def _compare(name: str, out: Tensor, ref: Tensor, pts: list[Tensor], factor: float, extra: float):
    """``(err, bound, failure message or "")`` of one tensor."""
    dtype = out.dtype
    if not torch.isfinite(out).all():
        return math.nan, None, f"non-finite {name}"
    err = _max_abs(out, ref)
    bound = _bound([_max_abs(p, ref) for p in pts], factor, dtype, extra)
    if err > bound:
        return err, bound, f"{name} max err {err:.3g} > bound {bound:.3g} ({factor:g} x same-dtype PyTorch err + atol)"
    diff_rms, ref_rms = _rms(out.double() - ref.double()), _rms(ref)
    if diff_rms > RMS_RATIO[dtype] * ref_rms + ATOL[dtype] + extra:
        return err, bound, f"{name} rms err {diff_rms:.3g} > {RMS_RATIO[dtype]:.1g} x rms(truth) {ref_rms:.3g} + atol"
    return err, bound, ""


def check(
    fn: Fn,
    variant: av.AttentionVariant,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool,
    *,
    scale: float | None = None,
    grads: bool = False,
    check_elems: int = 1 << 26,
    approx: bool = True,
    ground_truth: Fn | None = None,
    fwd_factor: float = FWD_FACTOR,
    bwd_factor: float = BWD_FACTOR,
    key_padding_mask: Tensor | None = None,
) -> CheckResult:
    """Check ``fn(q, k, v)`` (which should compute ``variant``) against the float64 ground truth.

    ``ground_truth``: ``fn``'s own float64 semantics on the full inputs, when they differ from
    ``variant``'s by design (a peer's documented deviation); its distance from ``variant``'s
    ground truth is then measured and reported as ``semantic_dev``, never added to the bound.

    ``key_padding_mask (B, Nk)``: ``fn`` is expected to hide the keys where it is False (``fn``
    applies it itself); the ground truth and the same-dtype bound computations apply it on their
    own (for a softmax variant, together with the mask predicate: a row left with no key is 0)."""
    nq, nk = q.shape[2], k.shape[2]
    scale = resolve_scale(scale, q.shape[-1])
    bh = q.shape[0] * q.shape[1]
    rows = min(nq, max(1, check_elems // max(1, bh * nk)))
    runs = sample_rows(nq, rows, seed=nq)
    rows = sum(e - s for s, e in runs)
    grads = grads and rows == nq
    gen = torch.Generator(device="cpu").manual_seed(1234)
    dout = torch.randn(q.shape[0], q.shape[1], nq, v.shape[-1], generator=gen).to(q.device, q.dtype) if grads else None

    out, g = run_with_grads(fn, q, k, v, dout)
    problem = _output_problem(out, q, v)
    if problem:
        return CheckResult(False, None, None, rows=0, message=problem)
    kpm = key_padding_mask

    def on_rows(
        make: Callable[[int, int], tuple[Fn, list[Fn], int]], pick: int | None, a: Tensor, b: Tensor, c: Tensor
    ):
        """The rows of ``runs`` of ``make(start, end)``'s truth (``pick`` None) or same-dtype fn ``pick``."""
        parts = []
        for start, end in runs:
            truth, pts, kend = make(start, end)
            f = truth if pick is None else pts[pick]
            if kend <= 0:  # causal with Nq > Nk: rows before the first key see none
                parts.append(a.new_zeros(*a.shape[:2], end - start, c.shape[-1]))
            else:
                with torch.no_grad():
                    parts.append(f(a[:, :, start:end], b[:, :, :kend], c[:, :, :kend]))
        return torch.cat(parts, dim=2)

    def rows_of(x: Tensor) -> Tensor:
        return torch.cat([x[:, :, s:e] for s, e in runs], dim=2)

    def make(start: int, end: int, var: av.AttentionVariant = variant):
        return _rows_fns(var, causal, scale, kpm, nq, nk, start, end, q.device)

    out_rows = rows_of(out)
    q64, k64, v64 = q.double(), k.double(), v.double()
    n_pts = len(make(0, nq)[1])
    if grads:  # the whole problem: one run, with gradients
        truth, pt_fns, _ = make(0, nq)
        ref, ref_g = run_with_grads(truth, q64, k64, v64, dout.double())
        pts = [run_with_grads(f, q, k, v, dout) for f in pt_fns]
    else:
        ref, ref_g = on_rows(make, None, q64, k64, v64), None
        pts = [(on_rows(make, i, q, k, v), None) for i in range(n_pts)]
    semantic_dev = None
    if ground_truth is not None:
        ours = ref
        ref, ref_g = run_with_grads(ground_truth, q64, k64, v64, None if dout is None else dout.double())
        ref = rows_of(ref)
        semantic_dev = _max_abs(ref, ours)

    approx_err = None
    if approx and variant.approximates is not None:
        exact = variant.exact()
        approx_err = _max_abs(out_rows, on_rows(lambda s, e: make(s, e, exact), None, q64, k64, v64))

    if out_rows.shape != ref.shape:
        return CheckResult(
            False, None, None, rows=rows, message=f"shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
        )
    err, bound, message = _compare("output", out_rows, ref, [p[0] for p in pts], fwd_factor, 0.0)
    grad_err = grad_bound = None
    if grads and not message:
        assert g is not None and ref_g is not None
        grad_err, grad_bound = -1.0, 0.0
        for i, name in enumerate(("dq", "dk", "dv")):
            e, b, msg = _compare(name, g[i], ref_g[i], [p[1][i] for p in pts if p[1] is not None], bwd_factor, 0.0)
            if not math.isfinite(e) or e > grad_err:  # report the worst gradient and its own bound
                grad_err, grad_bound = e, b
            if msg:
                message = msg
                break
    ok = not message
    if rows < nq:
        where = f"{len(runs)} runs from row {runs[0][0]} to {runs[-1][1] - 1}: first, last, tile edges, random"
        message = message or f"checked {rows} of {nq} query rows ({where}; forward only)"
    if semantic_dev is not None:
        message = "; ".join(
            filter(None, [message, f"gated against its own float64 math, {semantic_dev:.3g} from ours (semantic_dev)"])
        )
    return CheckResult(ok, err, bound, grad_err, grad_bound, approx_err, rows, message, semantic_dev)


def check_target(
    target: Target,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool,
    *,
    grads: bool = False,
    check_elems: int = 1 << 26,
    approx: bool = True,
) -> CheckResult:
    """:func:`check` of a sweep or verify target (a backend or baseline of a variant)."""
    res = check(
        target.fn,
        target.truth,
        q,
        k,
        v,
        causal,
        grads=grads,
        check_elems=check_elems,
        approx=approx,
        ground_truth=target.ground_truth,
    )
    if target.note and res.ok:
        res = CheckResult(**{**res.__dict__, "message": "; ".join(filter(None, [target.note, res.message]))})
    return res
