"""Generation from the incremental state: nucleus (top-p) sampling and a tiny decoder.

``top_p_sample`` implements temperature and nucleus sampling (Holtzman et al. 2019, "The Curious
Case of Neural Text Degeneration"): the next token is drawn from the smallest set of most likely
tokens whose probability mass reaches ``top_p``, renormalised. :class:`TinyDecoder` is a small
pre-norm transformer of :class:`AttentionLayer` blocks, and :func:`generate` runs it token by
token from the variants' decoding states (:mod:`attention_variants.decode`).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor, nn

from .decode import DecodeState
from .module import AttentionLayer


def _check_sampling(logits: object, temperature: object, top_p: object) -> tuple[Tensor, float, float]:
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    if logits.ndim < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have shape (..., V) with V >= 1, got {tuple(logits.shape)}")
    for name, val in (("temperature", temperature), ("top_p", top_p)):
        if isinstance(val, bool) or not isinstance(val, numbers.Real):
            raise TypeError(f"{name} must be a float, got {type(val).__name__}")
    assert isinstance(temperature, numbers.Real) and isinstance(top_p, numbers.Real)
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    return logits, float(temperature), float(top_p)


def top_p_probs(logits: Tensor, *, temperature: float = 1.0, top_p: float = 1.0) -> Tensor:
    """The distribution :func:`top_p_sample` draws from, ``(..., V)`` in float64.

    ``softmax(logits / temperature)`` restricted to its nucleus: the most likely tokens, in
    decreasing probability, up to and including the first at which their mass reaches ``top_p``
    (the smallest such prefix; ties in probability are cut in sort order), renormalised.
    ``temperature=0`` puts all the mass on the argmax.
    """
    logits, temperature, top_p = _check_sampling(logits, temperature, top_p)
    x = logits.detach().double()
    if temperature == 0:
        return torch.zeros_like(x).scatter_(-1, x.argmax(dim=-1, keepdim=True), 1.0)
    probs = torch.softmax(x / temperature, dim=-1)
    if top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        cum = torch.cumsum(sorted_p, dim=-1)
        before = torch.cat([torch.zeros_like(cum[..., :1]), cum[..., :-1]], dim=-1)  # mass of the more likely
        keep = before < top_p
        keep[..., 0] = True
        probs = probs * torch.zeros_like(keep).scatter_(-1, order, keep)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def top_p_sample(
    logits: Tensor, *, temperature: float = 1.0, top_p: float = 1.0, generator: torch.Generator | None = None
) -> Tensor:
    """Draw one token per row of ``logits (..., V)``: returns int64 indices of shape ``(...)``.

    Temperature scales the logits (``0``: greedy argmax); ``top_p < 1`` keeps only the nucleus
    (see :func:`top_p_probs`). ``generator`` makes draws reproducible.
    """
    probs = top_p_probs(logits, temperature=temperature, top_p=top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])


class TinyDecoder(nn.Module):
    """A small causal language model: token embedding, ``num_layers`` pre-norm blocks of an
    :class:`AttentionLayer` (causal, any variant) and an MLP, then an output projection. No
    positional encoding: causal attention alone orders the tokens. ``**options`` go to the variant.

    ``forward(tokens (B, N)) -> logits (B, N, V)``; :meth:`step` continues from decoding states.
    """

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int = 64,
        num_heads: int = 4,
        num_layers: int = 2,
        variant: str = "full",
        *,
        num_kv_heads: int | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.attn = nn.ModuleList(
            AttentionLayer(embed_dim, num_heads, variant, num_kv_heads=num_kv_heads, causal=True, **options)
            for _ in range(num_layers)
        )
        self.norm1 = nn.ModuleList(nn.LayerNorm(embed_dim) for _ in range(num_layers))
        self.norm2 = nn.ModuleList(nn.LayerNorm(embed_dim) for _ in range(num_layers))
        self.mlp = nn.ModuleList(
            nn.Sequential(nn.Linear(embed_dim, 4 * embed_dim), nn.GELU(), nn.Linear(4 * embed_dim, embed_dim))
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, vocab_size)

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits ``(B, N, V)`` of the whole sequence ``tokens (B, N)``, causal."""
        x = self.embed(tokens)
        for attn, n1, n2, mlp in zip(self.attn, self.norm1, self.norm2, self.mlp, strict=True):
            x = x + attn(n1(x), causal=True)
            x = x + mlp(n2(x))
        return self.head(self.norm(x))

    def init_state(self, batch: int, *, capacity: int | None = None) -> list[DecodeState]:
        """One decoding state per layer."""
        return [layer.init_state(batch, capacity=capacity) for layer in self.attn]

    def step(self, tokens: Tensor, states: list[DecodeState]) -> tuple[Tensor, list[DecodeState]]:
        """Logits ``(B, T, V)`` of the next ``T`` tokens ``tokens (B, T)``, given everything before them
        in ``states`` (updated in place). Equals the last ``T`` rows of :meth:`forward` on the whole text."""
        x = self.embed(tokens)
        for i, (attn, n1, n2, mlp) in enumerate(zip(self.attn, self.norm1, self.norm2, self.mlp, strict=True)):
            h, states[i] = attn.step(n1(x), states[i])
            x = x + h
            x = x + mlp(n2(x))
        return self.head(self.norm(x)), states


@torch.no_grad()
def generate(
    model: TinyDecoder,
    prompt: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Continue ``prompt (B, N0)`` (int64 token ids, N0 >= 1) by ``max_new_tokens`` sampled tokens:
    one prefill, then one decoding step per token. Returns ``(B, N0 + max_new_tokens)``."""
    if not isinstance(prompt, Tensor) or prompt.ndim != 2 or prompt.shape[1] < 1 or prompt.is_floating_point():
        shape = tuple(prompt.shape) if isinstance(prompt, Tensor) else type(prompt).__name__
        raise ValueError(f"prompt must be integer token ids of shape (B, N0) with N0 >= 1, got {shape}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    out = [prompt]
    states = model.init_state(prompt.shape[0], capacity=prompt.shape[1] + max_new_tokens)
    logits, states = model.step(prompt, states)
    for i in range(max_new_tokens):
        token = top_p_sample(logits[:, -1], temperature=temperature, top_p=top_p, generator=generator)[:, None]
        out.append(token)
        if i + 1 < max_new_tokens:
            logits, states = model.step(token, states)
    return torch.cat(out, dim=1)
