"""The Transformers side of the whole-model benchmark: the model built from a row, the attention
implementations registered with Transformers (``skip``, the gate's float64 truth, the ``av_*``
backends), and the logits' numerics gate."""

from __future__ import annotations

import copy
import math
from typing import Any

from attn_bench.model.config import SKIP_IMPL, ModelConfig, impl_variant

_TRUTH: dict[str, Any] = {}  # the variant the gate's ground-truth attention computes

TRUTH_IMPL = "bench_truth"  # the gate's ground-truth attention (registered by this module)

GATE_FACTOR = 4.0

GATE_ATOL = {"float32": 1e-4, "float16": 2e-3, "bfloat16": 1e-2}

# -- attention implementations --------------------------------------------------------------------


def _repeat_kv(x: Any, groups: int) -> Any:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def skip_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, **kwargs: Any):
    """Attention skipped: ``q + k + v`` per head, ``(B, N, H, D)``; O(N), and every projection
    stays in the graph (q ``(B, H, N, D)``, k and v ``(B, Hk, N, D)``)."""
    groups = query.shape[1] // key.shape[1]
    out = query + _repeat_kv(key, groups) + _repeat_kv(value, groups)
    return out.transpose(1, 2).contiguous(), None


def truth_attention(
    module: Any, query: Any, key: Any, value: Any, attention_mask: Any, scaling: float | None = None, **kwargs: Any
):
    """The gate's ground truth, ``(B, N, H, D)``: the variant in :data:`_TRUTH` computed in the
    inputs' dtype, independently of the implementations under test (see the module doc)."""
    from attn_bench.core.numerics import softmax_by_rows

    variant = _TRUTH["variant"]
    causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", False)))
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    if variant.softmax:
        mod = variant.mask_mod(query.shape[2], key.shape[2], causal, query.device)
        out = softmax_by_rows(query, key, value, mod, scale)
    else:
        out = variant.dense(query, key, value, causal, scale, upcast=False)
    return out.transpose(1, 2).contiguous(), None


def register_implementations() -> str | None:
    """Register ``skip`` and the gate's truth with Transformers, and the project's ``av_*``
    implementations through :mod:`attention_variants.hf`; returns why the latter failed, or None."""
    from transformers import AttentionInterface

    AttentionInterface.register(SKIP_IMPL, skip_attention)
    AttentionInterface.register(TRUTH_IMPL, truth_attention)
    try:
        from attention_variants import hf
    except ImportError as exc:
        return f"attention_variants.hf is not available ({exc})"
    hf.register()
    return None


def variant_of(cfg: ModelConfig, model_config: Any) -> Any:
    """The attention variant the row's implementation computes in every layer (``sdpa``: exact
    attention), as :func:`attention_variants.hf.layer_variant` picks it for the model."""
    import attention_variants as av
    from attn_bench.core.variants import exact_variant

    if impl_variant(cfg.impl) is None:
        return av.get_variant(exact_variant())
    from attention_variants import hf

    return hf.layer_variant(cfg.impl, None, model_config)[0]


# -- the model ------------------------------------------------------------------------------------


def hf_config(cfg: ModelConfig, impl: str | None = None) -> Any:
    """The Transformers config of ``cfg`` (no dropout; the variant's options in ``av_options``)."""
    from transformers import BertConfig, LlamaConfig

    common = dict(
        vocab_size=cfg.vocab,
        hidden_size=cfg.hidden,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        intermediate_size=cfg.ffn(),
        max_position_embeddings=max(cfg.seq_len, cfg.gate_len),
        tie_word_embeddings=True,
    )
    if cfg.arch == "llama":
        out = LlamaConfig(num_key_value_heads=cfg.kv_heads, attention_dropout=0.0, **common)
    else:
        out = BertConfig(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **common)
    out.av_options = dict(cfg.options)  # read by attention_variants.hf
    out._attn_implementation = impl or cfg.impl
    return out


def build_model(cfg: ModelConfig, seed: int) -> Any:
    """The model with random weights (seeded), on ``cfg.device`` in ``cfg.dtype``, in eval mode."""
    import torch
    from transformers import BertForMaskedLM, LlamaForCausalLM

    torch.manual_seed(seed)
    cls = LlamaForCausalLM if cfg.arch == "llama" else BertForMaskedLM
    with torch.device(cfg.device):
        model = cls(hf_config(cfg))
    return model.to(getattr(torch, cfg.dtype)).eval()


def set_impl(model: Any, impl: str) -> None:
    """Switch every attention layer of ``model`` to ``impl`` (a registered implementation)."""
    for m in model.modules():
        if hasattr(m, "config") and hasattr(m.config, "_attn_implementation"):
            m.config._attn_implementation = impl


def gate(model: Any, cfg: ModelConfig, ids: Any, perturb: float = 0.0) -> dict[str, Any]:
    """The numerics gate of the model's logits on ``ids`` (see the module doc)."""
    import torch

    _TRUTH["variant"] = variant_of(cfg, model.config)
    with torch.no_grad():
        out = model(input_ids=ids).logits.double() + perturb
        set_impl(model, TRUTH_IMPL)
        try:
            naive = model(input_ids=ids).logits.double()
            set_impl(model, SKIP_IMPL)
            skipped = model(input_ids=ids).logits.double()
            set_impl(model, "sdpa")
            sdpa = model(input_ids=ids).logits.double()
            set_impl(model, TRUTH_IMPL)
            truth_model = copy.deepcopy(model).double()
            truth = truth_model(input_ids=ids).logits
            del truth_model
        finally:
            set_impl(model, cfg.impl)
    err = float((out - truth).abs().max())
    naive_err = float((naive - truth).abs().max())
    skip_err = float((skipped - truth).abs().max())  # what the gate could see: attention's effect
    sdpa_diff = float((out - sdpa).abs().max())  # exact attention: agreement; the others: their deviation
    bound = GATE_FACTOR * naive_err + GATE_ATOL[cfg.dtype] * float(truth.abs().max())
    ok = math.isfinite(err) and err <= bound
    return {
        "max_err": err,
        "err_bound": bound,
        "naive_err": naive_err,
        "skip_err": skip_err,
        "sdpa_diff": sdpa_diff,
        "gate_n": ids.shape[1],
        "ok": ok,
    }
