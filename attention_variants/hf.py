"""Hugging Face Transformers integration: the variants as ``attn_implementation`` choices.

>>> from attention_variants import hf
>>> hf.register()                       # once per process; needs ``pip install .[hf]``
>>> model = AutoModelForCausalLM.from_config(cfg, attn_implementation="av_sliding_window")

:func:`register` adds ``av_<name>`` for every registered variant (``av_full``,
``av_sliding_window``, ``av_performer``, and a plug-in's, e.g. ``av_linear_elu``; call it again
after registering more) to ``transformers.AttentionInterface`` (the attention function a model's
layers call) and to ``transformers.AttentionMaskInterface`` (the mask that the model builds once
per forward and hands to every layer). The mask function returns only the key padding, a bool
``(B, Nk)`` tensor (True = a real key) or None when nothing is padded; the causal and window
structure is computed by the variants from the layer's own arguments, never as a dense 4-D mask.

Which attention a layer computes (the *window rule*):

- A layer that the model gives a window (the ``sliding_window`` argument its attention call
  passes: Mistral's ``config.sliding_window``, Qwen2's sliding layers, ModernBERT's local layers)
  computes exact sliding-window attention with that window under every ``av_*`` implementation;
  the window is part of the model. Transformers passes ``s`` meaning ``s`` keys back including
  the token itself (Mistral) or ``s - 1`` each side (ModernBERT passes ``local_attention // 2 + 1``);
  both are our ``window = s - 1``: ``(s - 1, 0)`` causal, ``(s - 1, s - 1)`` bidirectional.
- Any other layer computes ``av_full``: full attention; ``av_performer``: FAVOR+ with
  ``num_features`` features drawn from ``seed``; ``av_sliding_window``: our sliding window with
  ``window`` -- unless the model defines windows on some layers (``config.sliding_window`` is
  set), in which case its other layers are global by design and stay full attention;
  ``av_<name>``: variant ``name`` with the options it takes.
- ``window``, ``num_features``, ``seed``, ``backend`` and a plug-in variant's options default to
  the values given to :func:`register`; a model overrides them with a dict ``config.av_options``
  (e.g. ``{"window": 64, "backend": "torch"}``). Each variant takes the ones it accepts.

Causality comes from the call's ``is_causal`` or else the module's (False for encoders). Queries
are aligned to the end of the keys (bottom-right), which is what decoding with a dynamic KV cache
needs (``Nq = 1`` against the whole cache). A static cache also works: keys beyond the 2-D
attention mask (slots not yet written) are dropped. Grouped-query attention runs without
expanding k/v. There is no attention dropout: a call in training mode with ``dropout > 0`` raises
ValueError (set ``config.attention_dropout = 0``, or ``model.eval()``). Not supported (ValueError):
custom mask patterns (``or_mask_function`` / ``and_mask_function``, e.g. image-token masks),
chunked attention (``config.attention_chunk_size``, Llama 4), ready 4-D masks passed by the
caller, ``softcap``, attention sinks (``s_aux``) and position biases.
Packed sequences (several sequences in one row, told apart only by ``position_ids``) are not
detected: pass one sequence per row with an ``attention_mask``.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from . import masks
from .base import AttentionVariant, get_variant, list_backends, list_variants, variant_class
from .performer import PerformerAttention

PREFIX = "av_"
"""``attn_implementation`` of variant ``name``: ``PREFIX + name``."""

_defaults: dict[str, Any] = {"window": 128, "num_features": 256, "seed": 0, "backend": "auto"}


def implementations() -> tuple[str, ...]:
    """The ``attn_implementation`` names :func:`register` adds: ``av_<name>`` per registered variant."""
    return tuple(PREFIX + name for name in list_variants())


def option_names() -> tuple[str, ...]:
    """Keys of :func:`register`'s options and of a model's ``config.av_options``: ``backend`` and
    every option a registered variant accepts (``window``, ``num_features``, ``seed``, ...)."""
    names = {"backend", *_defaults}
    for name in list_variants():
        names.update(variant_class(name).option_names())
    return tuple(sorted(names))


def register(
    *,
    window: masks.WindowArg = 128,
    num_features: int = 256,
    seed: int = 0,
    backend: str = "auto",
    **options: Any,
) -> None:
    """Register ``av_<name>`` of every registered variant with Transformers.

    Safe to call again: the names stay registered (variants registered since are added) and the
    defaults become the ones given.

    Args:
        window: the window of ``av_sliding_window`` on models that define none (an int ``w``:
            ``w`` keys back when causal, ``w`` each side otherwise; or a pair ``(left, right)``).
        num_features: the Performer's random feature count ``m``.
        seed: the seed of the Performer's projection (the same ``W`` in every layer).
        backend: the backend of every call (``"auto"``, ``"torch"``, ``"triton"``, ``"reference"``).
        options: defaults of other variants' options (a plug-in's), by name.
    """
    try:
        from transformers import AttentionInterface, AttentionMaskInterface
    except ImportError as exc:
        raise ImportError(
            "attention_variants.hf needs Hugging Face Transformers: pip install '.[hf]' "
            "(or pip install 'transformers>=4.56')"
        ) from exc
    given = {"window": window, "num_features": num_features, "seed": seed, "backend": backend, **options}
    _defaults.update(check_options(given))
    for name in implementations():
        AttentionInterface.register(name, _attention_function(name))
        AttentionMaskInterface.register(name, key_padding_mask)


def check_options(options: Mapping[str, Any], where: str = "options") -> dict[str, Any]:
    """Validate a dict of :func:`option_names` entries; ValueError/TypeError naming the bad one."""
    if not isinstance(options, Mapping):
        raise TypeError(f"{where} must be a dict, got {type(options).__name__}")
    known = option_names()
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(map(repr, unknown))} in {where}; keys are {', '.join(known)}")
    out = dict(options)
    if "window" in out:
        window = masks.check_window(out["window"])
        out["window"] = tuple(window) if isinstance(window, tuple) else window
    if "num_features" in out:
        PerformerAttention(num_features=out["num_features"])  # validates without drawing
    if "seed" in out:
        seed = out["seed"]
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"seed in {where} must be an int, got {type(seed).__name__}")
    if "backend" in out and out["backend"] not in ("auto", *list_backends()):
        raise ValueError(
            f"backend in {where} must be one of auto, {', '.join(list_backends())}; got {out['backend']!r}"
        )
    return out


def _model_options(config: object) -> dict[str, Any]:
    opts = dict(_defaults)
    override = getattr(config, "av_options", None)
    if override is not None:
        opts.update(check_options(override, "config.av_options"))
    return opts


# Variant objects are cached so that the Performer's projection is drawn once, not per call.
@functools.lru_cache(maxsize=64)
def _cached_variant(name: str, options: tuple[tuple[str, Any], ...]) -> AttentionVariant:
    return get_variant(name, **dict(options))


def _variant(name: str, options: dict[str, Any]) -> AttentionVariant:
    """Variant ``name`` with the options of ``options`` it accepts."""
    kw = tuple((k, options[k]) for k in variant_class(name).option_names() if k in options)
    try:
        return _cached_variant(name, kw)
    except TypeError:  # an unhashable option (a tensor): not cached
        return get_variant(name, **dict(kw))


def layer_variant(
    implementation: str, sliding_window: int | None, config: object = None
) -> tuple[AttentionVariant, str]:
    """The variant one layer computes under ``implementation`` (see the module's window rule), and
    the backend it runs on. ``sliding_window`` is what the layer's attention call passes."""
    if implementation not in implementations():
        raise ValueError(f"implementation must be one of {', '.join(implementations())}, got {implementation!r}")
    name = implementation.removeprefix(PREFIX)
    opts = _model_options(config)
    if sliding_window is not None:
        if isinstance(sliding_window, bool) or not isinstance(sliding_window, numbers.Integral) or sliding_window < 1:
            raise ValueError(
                f"sliding_window must be a positive int (keys including the token), got {sliding_window!r}"
            )
        return _variant("sliding_window", {"window": int(sliding_window) - 1}), opts["backend"]
    if name == "sliding_window" and getattr(config, "sliding_window", None) is not None:
        name = "full"  # the model's global layers
    return _variant(name, opts), opts["backend"]


def key_padding_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | Tensor = 0,
    kv_offset: int = 0,
    mask_function: Any = None,
    attention_mask: Tensor | None = None,
    use_vmap: bool = False,
    **kwargs: Any,
) -> Tensor | None:
    """The ``AttentionMaskInterface`` function of the ``av_*`` implementations.

    ``attention_mask`` is the model's 2-D mask ``(B, seen + Nq)`` (True = a real token; already
    bool), or None. Returns the padding of the keys this call attends to, bool ``(B, Nk')``: keys
    ``kv_offset .. kv_offset + Nk' - 1``, where ``Nk' = kv_length`` unless the 2-D mask ends
    earlier (a static cache: later slots are unwritten, and the attention function drops them).
    None when no key is padded or dropped.
    """
    if use_vmap:
        raise ValueError(
            "the av_* attention implementations support causal, bidirectional and sliding-window "
            "masks with key padding; this model asked for a custom mask pattern (or_mask_function / "
            "and_mask_function)"
        )
    if getattr(kwargs.get("config"), "attention_chunk_size", None) is not None:
        raise ValueError("the av_* attention implementations do not support chunked attention (attention_chunk_size)")
    if attention_mask is None:
        return None
    if attention_mask.ndim != 2:
        raise ValueError(f"attention_mask must be 2-D (batch, keys), got shape {tuple(attention_mask.shape)}")
    covered = min(kv_length, attention_mask.shape[-1] - kv_offset)
    if covered < 1:
        raise ValueError(
            f"attention_mask has {attention_mask.shape[-1]} columns but the keys start at position {kv_offset}"
        )
    padding = attention_mask[:, kv_offset : kv_offset + covered].to(torch.bool)
    if covered == kv_length and bool(padding.all()):
        return None
    return padding


def attention_forward(
    implementation: str,
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """The ``AttentionInterface`` function of ``implementation``.

    ``query (B, H, Nq, D)``, ``key (B, Hk, Nk, D)``, ``value (B, Hk, Nk, Dv)`` (H a multiple of Hk,
    not expanded); ``attention_mask`` what :func:`key_padding_mask` returned. Returns
    ``(out (B, Nq, H, Dv), None)``: Transformers' layout and no attention weights.
    """
    if dropout:
        raise ValueError(
            f"{implementation} has no attention dropout, got dropout={dropout} (the module is in training mode "
            "with attention dropout): set the config's attention dropout to 0 or call model.eval()"
        )
    if softcap is not None:
        raise ValueError(f"{implementation} does not support softcap (got {softcap})")
    for name in ("s_aux", "position_bias"):
        if kwargs.get(name) is not None:
            raise ValueError(f"{implementation} does not support {name}")
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    if attention_mask is not None:
        if not isinstance(attention_mask, Tensor) or attention_mask.ndim != 2 or attention_mask.dtype != torch.bool:
            shape = tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask)
            raise ValueError(
                f"{implementation} expects the bool (batch, keys) key padding mask its mask function builds, got "
                f"{shape}; pass a 2-D attention_mask to the model (ready 4-D masks are not supported)"
            )
        nk = attention_mask.shape[1]
        if attention_mask.shape[0] != query.shape[0] or nk > key.shape[2]:
            raise ValueError(
                f"attention_mask of shape {tuple(attention_mask.shape)} does not fit batch {query.shape[0]} and "
                f"{key.shape[2]} keys"
            )
        if nk < key.shape[2]:  # unwritten slots of a static cache
            key, value = key[:, :, :nk], value[:, :, :nk]
    variant, backend = layer_variant(implementation, sliding_window, getattr(module, "config", None))
    extra = {} if attention_mask is None else {"key_padding_mask": attention_mask}
    out = variant(query, key, value, causal=causal, scale=scaling, backend=backend, **extra)
    return out.transpose(1, 2).contiguous(), None


def _make_forward(implementation: str):
    def forward(
        module: torch.nn.Module,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        **kwargs: Any,
    ) -> tuple[Tensor, None]:
        return attention_forward(implementation, module, query, key, value, attention_mask, **kwargs)

    forward.__name__ = forward.__qualname__ = implementation + "_attention_forward"
    forward.__doc__ = f"``{implementation}``: see :func:`attention_forward`."
    return forward


_ATTENTION_FUNCTIONS: dict[str, Any] = {}


def _attention_function(implementation: str) -> Any:
    """The ``AttentionInterface`` function of ``implementation``, made once."""
    if implementation not in _ATTENTION_FUNCTIONS:
        _ATTENTION_FUNCTIONS[implementation] = _make_forward(implementation)
    return _ATTENTION_FUNCTIONS[implementation]
