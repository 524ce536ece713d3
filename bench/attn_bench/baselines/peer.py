"""What a peer library is to the sweep (:class:`Peer`) and the helpers its adapters share.

See :mod:`attn_bench.baselines.peers` for the adapters' contract."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

import torch
from torch import Tensor

import attention_variants as av
from attention_variants import masks

Fn = Callable[[Tensor, Tensor, Tensor], Tensor]
CheckFn = Callable[[av.AttentionVariant, torch.device, torch.dtype, int, bool], "str | None"]
MakeFn = Callable[[av.AttentionVariant, Tensor, Tensor, Tensor, bool, float], Fn]

PEERS_EXTRA = "pip install .[peers]"


@dataclass(frozen=True)
class Peer:
    """One peer library as a backend of the sweep (see the module docstring)."""

    name: str  # backend name in the sweep
    module: str  # the module imported to run it
    install: str  # how to install it
    variants: tuple[str, ...]  # variants it serves
    devices: tuple[str, ...]  # device types it runs on
    exact: bool  # True: our semantics up to rounding; False: a documented deviation (semantic_deviation)
    semantics: str  # the documented mapping of our semantics onto its parameters
    check_options: CheckFn  # peer-specific part of check (after variant, device and import)
    make: MakeFn

    def check(
        self,
        variant: av.AttentionVariant,
        device: torch.device | str,
        dtype: torch.dtype,
        head_dim: int,
        needs_grad: bool = False,
    ) -> str | None:
        """None if this peer can run ``variant`` on ``device`` in ``dtype``, else why not."""
        device = torch.device(device)
        if variant.name not in self.variants:
            return f"{self.name} serves {', '.join(self.variants)} only, not {variant.name}"
        if device.type not in self.devices:
            return f"{self.name} runs on {' and '.join(d.upper() for d in self.devices)} only, not {device.type}"
        reason = import_reason(self.module, self.install)
        if reason:
            return reason
        return self.check_options(variant, device, dtype, head_dim, needs_grad)


def import_reason(module: str, install: str) -> str | None:
    """None if ``module`` imports, else a sentence saying it is missing (or broken) and how to get it."""
    try:
        with warnings.catch_warnings():  # performer-pytorch imports distutils (deprecated) at import time
            warnings.simplefilter("ignore", DeprecationWarning)
            importlib.import_module(module)
    except ImportError as exc:
        missing = exc.name or ""
        if missing and (module == missing or module.startswith(missing + ".")):
            return f"{module} is not installed ({install})"
        # Installed, but something it needs is not (e.g. distutils on Python 3.12 without setuptools).
        return f"{module} failed to import ({install}): {type(exc).__name__}: {exc}"
    except Exception as exc:  # a broken install (e.g. an extension built for another torch)
        return f"{module} failed to import ({install}): {type(exc).__name__}: {exc}"
    return None


def _refuse(reason: str) -> NoReturn:
    from attn_bench.baselines.target import Unsupported

    raise Unsupported(reason)


def _global_tokens_reason(variant: av.AttentionVariant, peer: str) -> str | None:
    if getattr(variant, "global_tokens", None) not in (None, 0):
        return f"{peer} has no global tokens"
    return None


def _window(variant: av.AttentionVariant, causal: bool) -> tuple[int, int] | None:
    """Our effective ``(left, right)`` reach (causal folded in), or None for full attention."""
    window = getattr(variant, "window", None)
    return None if window is None else masks.window_bounds(window, causal)


def _to_bnhd(x: Tensor) -> Tensor:
    """``(B, H, N, D) -> (B, N, H, D)`` as a view (last dim stays contiguous)."""
    return x.transpose(1, 2)
