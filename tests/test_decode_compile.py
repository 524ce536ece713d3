"""Ahead-of-time compilation of the decoding-step kernels for sm_90 (no GPU needed).

The specialisations the launcher picks for the decode-gpu shape at its most query rows (32 query
heads over 8 key heads and T = 16 new tokens: 64 rows per key head; D = 128), lowered to PTX and
run through ``ptxas -v`` with the integer arguments specialised on their values as the launcher
does: none may spill. When the configs were chosen, T = 1, D = 64 and sm_80 were compiled too,
also without spills.
"""

from __future__ import annotations

import pytest
import torch

from attn_kernels import decode
from attn_kernels.launch import LaunchSample

pytest.importorskip("attn_kernels.decode_kernels")
aot = pytest.importorskip("attn_kernels.aot")

# The decode-gpu shape at its most query rows: 32 query heads over 8 key heads, T = 16 new tokens.
_SAMPLE = LaunchSample(heads=32, kv_heads=8, new_tokens=16)
_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _specs() -> list:
    """``pytest.param(name, kernel, dtype)`` as the launcher picks them at head dim 128."""
    specs = [pytest.param(f"split-{dtype}", "split", dtype) for dtype in ("bf16", "fp32")]
    specs.append(pytest.param("favor-bf16", "favor_step", "bf16"))
    specs.append(pytest.param("combine-bf16", "combine", "bf16"))
    return specs


SPECS = _specs()


@pytest.mark.parametrize("arch", [90], ids=lambda a: f"sm{a}")
@pytest.mark.parametrize(("name", "kernel", "dtype"), SPECS, ids=[s.values[0] for s in SPECS])
def test_decode_kernels_compile_without_spills(name: str, kernel: str, dtype: str, arch: int) -> None:
    fn, signature, constexprs, cfg = decode.aot_spec(kernel, 128, _DTYPES[dtype], sample=_SAMPLE)
    stats = aot.compile_for(fn, signature, constexprs, arch=arch, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    print(f"sm_{arch} {name:20s} regs {stats.registers:3d}  spill {stats.spill_bytes:5d} B")
    assert stats.spill_bytes == 0, f"{name} spills {stats.spill_bytes} bytes on sm_{arch}"
