"""What the kernels read from the environment once per process: whether Triton imports, the
interpreter mode, the autotuning cap's variable and the devices' compute capability."""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton  # noqa: F401

    HAS_TRITON = True
    _TRITON_IMPORT_ERROR = ""
except Exception as exc:  # pragma: no cover - depends on the installation
    HAS_TRITON = False
    _TRITON_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"


# Read by the FAVOR+ launcher: at most this many configs autotuned per kernel (each is one
# compilation); set by benchmark runs on a time budget.
AUTOTUNE_ENV = "ATTN_TRITON_AUTOTUNE_MAX"
DIRECT_LAUNCH_ENV = "ATTN_TRITON_DIRECT_LAUNCH"  # "0": every launch through the Triton JIT


@functools.cache
def interpreter_enabled() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (``TRITON_INTERPRET=1``).

    Read once (Triton itself fixes the mode when a kernel is defined); a test that changes the
    variable calls :func:`refresh_environment`."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def device_capability(device: torch.device) -> tuple[int, int]:
    """``(major, minor)`` compute capability of the CUDA ``device``, queried once per device."""
    return _capability(torch.cuda.current_device() if device.index is None else device.index)


def interpreter_range(start, end=None, step=1):
    """``range`` over runtime (tensor) bounds for kernels run by Triton's interpreter.

    The interpreter runs a kernel as Python, where ``range`` turns its bounds into ints. Triton
    3.6's interpreter holds every runtime scalar (program ids, integer arguments, scalar loads)
    as a 1-element NumPy array and converts it with ``int()``, which NumPy 2.4 refuses for arrays
    of one dimension, so a loop whose bounds are not constants fails there (later interpreters
    squeeze the array first). This walks the range by comparisons instead, which every version
    accepts. The kernel modules use it in place of ``tl.range`` only under the interpreter: the
    compiled kernels keep ``tl.range``, the same loop as ``range``.
    """
    if end is None:
        start, end = 0, start
    n = start
    while n < end:
        yield n
        n = n + step


def triton_unavailable_reason(device: torch.device) -> str | None:
    """None if Triton kernels can run on ``device``, else a sentence saying why not."""
    if not HAS_TRITON:
        return f"Triton is not importable ({_TRITON_IMPORT_ERROR})"
    if device.type == "cuda":
        # The capability query below would fail on a PyTorch without CUDA or a machine without a GPU.
        return None if torch.cuda.is_available() else f"CUDA is not available here (asked for {device})"
    if device.type == "cpu" and interpreter_enabled():
        return None
    return f"Triton kernels need a CUDA device, got {device} (on CPU only under TRITON_INTERPRET=1)"
