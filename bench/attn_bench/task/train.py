"""A small Transformer built from :class:`attention_variants.AttentionLayer`, and its training loop.

Plain PyTorch: AdamW, linear warm-up then cosine decay, gradient clipping and a fixed number of
steps. The held-out accuracy is measured every ``eval_every`` steps; the time to reach a target
accuracy is the training time (evaluation excluded) at the first evaluation at or above it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attention_variants import AttentionLayer
from attn_bench.task.tasks import IGNORE, TaskData


class Block(nn.Module):
    """Pre-norm block: optional short causal depthwise convolution, attention, MLP."""

    def __init__(
        self, d_model: int, heads: int, variant: str, options: dict[str, Any], causal: bool, conv: int
    ) -> None:
        super().__init__()
        self.conv = nn.Conv1d(d_model, d_model, conv, groups=d_model, padding=conv - 1) if conv > 1 else None
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = AttentionLayer(d_model, heads, variant, causal=causal, **options)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        if self.conv is not None:  # causal: output t sees inputs t-conv+1..t
            x = x + self.conv(x.transpose(1, 2))[..., : x.shape[1]].transpose(1, 2)
        x = x + self.attn(self.norm1(x), key_padding_mask=key_padding_mask)
        return x + self.mlp(self.norm2(x))


class TaskModel(nn.Module):
    """Token and learned position embeddings, ``layers`` blocks, a final norm and a linear head.

    A causal model predicts at every position; an encoder (``causal=False``) mean-pools the
    non-padding positions (token id 0 is padding) and predicts at position 0 only."""

    def __init__(
        self,
        vocab_size: int,
        num_classes: int,
        seq_len: int,
        *,
        variant: str,
        options: dict[str, Any] | None = None,
        d_model: int = 64,
        heads: int = 4,
        layers: int = 2,
        causal: bool = True,
        conv: int = 0,
    ) -> None:
        super().__init__()
        self.causal = causal
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Parameter(torch.randn(seq_len, d_model) * 0.02)
        opts = options or {}
        self.blocks = nn.ModuleList(Block(d_model, heads, variant, opts, causal, conv) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)

    def features(self, ids: Tensor, mask_padding: bool = False) -> Tensor:
        """Final-norm hidden states ``(B, N, d_model)`` of ``ids`` ``(B, N)``; with
        ``mask_padding``, padding (id 0) is invisible as a key, so a padded sequence gives its
        real tokens the states of the unpadded one."""
        mask = (ids != 0) if mask_padding else None
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)

    def pool(self, ids: Tensor, mask_padding: bool = False) -> Tensor:
        """Mean of the hidden states over the non-padding positions: ``(B, 1, d_model)`` (zeros
        for a row of padding only); ``mask_padding`` as in :meth:`features`."""
        x = self.features(ids, mask_padding)
        keep = (ids != 0).unsqueeze(-1).to(x.dtype)
        return (x * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True).clamp_min(1)

    def forward(self, ids: Tensor) -> Tensor:
        """Logits ``(B, N, C)`` (causal) or ``(B, 1, C)`` (encoder)."""
        return self.head(self.features(ids) if self.causal else self.pool(ids))


def _loss_and_hits(model: nn.Module, ids: Tensor, labels: Tensor) -> tuple[Tensor, int, int]:
    logits = model(ids)
    if not model.causal:
        labels = labels[:, :1]
    mask = labels != IGNORE
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
    hits = int((logits.argmax(-1)[mask] == labels[mask]).sum())
    return loss, hits, int(mask.sum())


@torch.no_grad()
def evaluate_metrics(model: nn.Module, data: TaskData, batch: int, device: torch.device) -> tuple[float, float]:
    """Accuracy and mean cross-entropy (nats) over the labelled positions of ``data``."""
    model.eval()
    hits = total = 0
    loss_sum = 0.0
    for i in range(0, data.inputs.shape[0], batch):
        loss, h, t = _loss_and_hits(model, data.inputs[i : i + batch].to(device), data.labels[i : i + batch].to(device))
        hits, total, loss_sum = hits + h, total + t, loss_sum + float(loss) * t
    model.train()
    return hits / max(total, 1), loss_sum / max(total, 1)


def evaluate(model: nn.Module, data: TaskData, batch: int, device: torch.device) -> float:
    """Accuracy over the labelled positions of ``data``."""
    return evaluate_metrics(model, data, batch, device)[0]


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``steps``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


@dataclass
class TrainResult:
    """What a training run measured; curves are lists of ``(step, value)`` or ``(step, time, value)``."""

    final_acc: float
    best_acc: float
    train_s: float
    time_to_target_s: float | None
    tokens_per_s: float
    peak_mem_bytes: int
    final_loss: float
    loss_curve: list[tuple[int, float]] = field(default_factory=list)
    eval_curve: list[tuple[int, float, float]] = field(default_factory=list)
    eval_loss_curve: list[tuple[int, float]] = field(default_factory=list)  # held-out (step, loss)


def saved_tensor_bytes(model: nn.Module, ids: Tensor, labels: Tensor) -> int:
    """Bytes of the distinct tensors one training step's forward saves for the backward pass."""
    seen: dict[tuple, int] = {}

    def pack(t: Tensor) -> Tensor:
        key = (t.untyped_storage().data_ptr(), t.device.type)
        seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _, _ = _loss_and_hits(model, ids, labels)
    del loss
    return sum(seen.values())


def train(
    model: nn.Module,
    train_data: TaskData,
    test_data: TaskData,
    *,
    steps: int,
    batch: int,
    lr: float = 3e-3,
    weight_decay: float = 0.01,
    warmup_frac: float = 0.1,
    clip: float = 1.0,
    eval_every: int = 50,
    target_acc: float | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int, float], None] | None = None,
) -> TrainResult:
    """Train ``model`` for ``steps`` AdamW steps on random batches of ``train_data``; evaluate on
    ``test_data`` every ``eval_every`` steps and at the end.

    ``model`` is a :class:`TaskModel` or any module with its interface: a ``causal`` attribute and
    ``forward(ids (B, N)) -> logits`` (``(B, N, C)`` causal, ``(B, 1, C)`` otherwise)."""
    device = torch.device(device)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = max(1, int(warmup_frac * steps))
    g = torch.Generator().manual_seed(seed)
    n = train_data.inputs.shape[0]
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        idx = torch.randint(n, (batch,), generator=torch.Generator().manual_seed(seed + 1))
        act = saved_tensor_bytes(model, train_data.inputs[idx].to(device), train_data.labels[idx].to(device))
    loss_curve: list[tuple[int, float]] = []
    eval_curve: list[tuple[int, float, float]] = []
    eval_loss_curve: list[tuple[int, float]] = []
    train_s, t_target, loss_val = 0.0, None, math.nan
    for step in range(steps):
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        idx = torch.randint(n, (batch,), generator=g)
        loss, _, _ = _loss_and_hits(model, train_data.inputs[idx].to(device), train_data.labels[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        loss_val = float(loss.detach())  # synchronises, so the step's time is measured whole
        train_s += time.perf_counter() - t0
        loss_curve.append((step + 1, loss_val))
        if progress is not None:
            progress(step + 1, steps, loss_val)
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            acc, test_loss = evaluate_metrics(model, test_data, 4 * batch, device)
            eval_curve.append((step + 1, train_s, acc))
            eval_loss_curve.append((step + 1, test_loss))
            if t_target is None and target_acc is not None and acc >= target_acc:
                t_target = train_s
    # CPU: parameters, gradients, two AdamW moments, and the activations saved for backward.
    peak = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else 4 * params + act
    accs = [a for _, _, a in eval_curve]
    return TrainResult(
        final_acc=accs[-1],
        best_acc=max(accs),
        train_s=train_s,
        time_to_target_s=t_target,
        tokens_per_s=steps * batch * train_data.inputs.shape[1] / train_s,
        peak_mem_bytes=peak,
        final_loss=loss_val,
        loss_curve=loss_curve,
        eval_curve=eval_curve,
        eval_loss_curve=eval_loss_curve,
    )
