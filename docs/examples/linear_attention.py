"""Linear attention with elu+1 features (Katharopoulos et al., 2020), as a plug-in of attn-bench.

``out_i = phi(q_i) . S_i / phi(q_i) . z_i`` with ``phi(x) = elu(x * scale ** 0.5) + 1``,
``S_i = sum_j phi(k_j) v_j^T`` and ``z_i = sum_j phi(k_j)`` over the keys query ``i`` sees (all, or
``j <= i + Nk - Nq`` when causal; padded keys never). Not a softmax: it declares a reference
(``dense``), a ``torch`` backend and a decoding state, and every job takes it from there.
"""

import torch
import torch.nn.functional as F

import attention_variants as av


def phi(x, scale):
    return F.elu(x * scale**0.5) + 1


def normalise(num, den):  # a row that sees no key gives 0, as every variant's does
    return torch.where(den > 0, num / torch.where(den > 0, den, 1), 0)


@av.register_variant("linear_elu")
class LinearAttention(av.AttentionVariant):
    """Linear attention: O(N D Dv) time, no N x N matrix, a state of D x (Dv + 1) per head."""

    backward_flops_ratio = 2.0  # the linear form, as the Performer's

    def dense(self, q, k, v, causal, scale, upcast=True, key_padding_mask=None):
        """The reference: the N x N matrix phi(q) phi(k)^T written out, masked and normalised."""
        dt = torch.float64 if q.dtype == torch.float64 else torch.float32
        groups = q.shape[1] // k.shape[1]
        k, v = (x.repeat_interleave(groups, 1).to(dt if upcast else q.dtype) for x in (k, v))
        a = phi(q.to(k.dtype), scale) @ phi(k, scale).transpose(-1, -2)
        nq, nk = q.shape[2], k.shape[2]
        if causal:
            a = a * torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril(nk - nq)
        if key_padding_mask is not None:
            a = a * key_padding_mask[:, None, None, :]
        return normalise(a @ v, a.sum(-1, keepdim=True)).to(q.dtype)

    def decode_state(self, layout, *, capacity):
        return LinearState(layout)

    def decode_step(self, q, k, v, state, scale, backend):
        out, sums = linear_torch(self, q, k, v, True, scale, start=state.sums)
        state.sums = sums
        return out


class LinearState(av.DecodeState):
    """``sums (B, Hk, D, Dv + 1)``: ``[S, z]`` over every token so far, in float32 (float64 inputs: float64)."""

    def __init__(self, layout):
        super().__init__(layout)
        dt = torch.float64 if layout.dtype == torch.float64 else torch.float32
        b, hk, d, dv = layout.batch, layout.kv_heads, layout.head_dim, layout.value_dim
        self.sums = torch.zeros(b, hk, d, dv + 1, dtype=dt, device=layout.device)

    def tensors(self):
        return [self.sums]


@av.register_backend(LinearAttention, "torch", padding=True)
def linear_torch(variant, q, k, v, causal, scale, key_padding_mask=None, start=None):
    """Sums of phi(k) [v, 1]: one product (non-causal) or a cumulative sum over the keys (causal,
    O(N D Dv) memory). ``start``: sums of earlier tokens (decoding); then it returns the new sums too."""
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    b, h, nq, _ = q.shape
    hk, nk = k.shape[1], k.shape[2]
    fk = phi(k.to(dt), scale)
    if key_padding_mask is not None:
        fk = fk * key_padding_mask[:, None, :, None]
    vz = torch.cat([v.to(dt), torch.ones_like(v[..., :1], dtype=dt)], -1)  # [v, 1]: numerator and normaliser
    fq = phi(q.to(dt), scale).view(b, hk, h // hk, nq, -1)
    if not causal:
        sums = fk.transpose(-1, -2) @ vz + (0 if start is None else start)
        out = fq @ sums[:, :, None]
    else:
        sums = torch.cumsum(fk[..., :, None] * vz[..., None, :], dim=2)  # (B, Hk, Nk, D, Dv + 1)
        if start is not None:
            sums = sums + start[:, :, None]
        idx = torch.arange(nq, device=q.device) + nk - nq  # bottom-right: the last key each query sees
        seen = sums[:, :, idx.clamp(min=0)] * (idx >= 0)[:, None, None]
        out = (fq[..., None, :] @ seen[:, :, None]).squeeze(-2)
        sums = sums[:, :, -1]
    out = normalise(out[..., :-1], out[..., -1:]).reshape(b, h, nq, -1).to(q.dtype)
    return out if start is None else (out, sums)
