"""Ahead-of-time compilation of the decoding-step kernels for sm_90 (no GPU needed).

The specialisations the launcher picks for the decode-gpu shape at its most query rows (32 query
heads over 8 key heads and T = 16 new tokens: 64 rows per key head; D = 128), lowered to PTX and
run through ``ptxas -v``: none may spill. When the configs were chosen, T = 1, D = 64 and sm_80
were compiled too, also without spills.
"""

from __future__ import annotations

import pytest

from attn_kernels.decode import FAVOR_WARPS, FEATURE_BLOCK, MAX_ROWS, MAX_ROWS_FP32, _row_blocks, _softmax_config
from attn_kernels.launch import pad_pow2

decode_kernels = pytest.importorskip("attn_kernels.decode_kernels")
aot = pytest.importorskip("attn_kernels.aot")

_T = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}
_ELEM = {"bf16": 2, "fp16": 2, "fp32": 4}
_DATA = {"Q", "KC", "VC", "KN", "VN", "GK", "GV", "K", "V", "O"}
_FLOAT32_PTRS = {"M", "L", "ACC", "DEN", "WS", "KV", "SHIFT", "KV_OUT", "SHIFT_OUT"}


def _signature(fn, dtype: str, constexprs: dict) -> dict[str, str]:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            continue
        if name in _DATA:
            sig[name] = _T[dtype]
        elif name == "GPOS":
            sig[name] = "*i32"
        elif name in _FLOAT32_PTRS:
            sig[name] = "*fp32"
        elif name in ("qk_scale", "half_scale", "log_norm", "relu_eps"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _specs() -> list:
    """``pytest.param(name, dtype, fn, constexprs, warps)`` as the launcher picks them, at
    T = 16 (the most query rows per program) and head dim 128."""
    specs = []
    d, t = 128, 16
    for dtype in ("bf16", "fp32"):
        block_m, _ = _row_blocks(4 * t, MAX_ROWS if dtype == "bf16" else MAX_ROWS_FP32)
        cfg = _softmax_config(d, _ELEM[dtype], block_m)
        tiles = dict(BLOCK_M=block_m, BLOCK_D=d, BLOCK_DV=d, HEAD_D=d, HEAD_DV=d)
        split = dict(RING=True, BLOCK_N=cfg.block_n, PREC="ieee", **tiles)
        specs.append(pytest.param(f"split-{dtype}", dtype, decode_kernels._softmax_split_kernel, split, cfg.num_warps))
    block_m, _ = _row_blocks(4 * t)
    tiles = dict(BLOCK_M=block_m, BLOCK_D=d, BLOCK_DV=d, HEAD_D=d, HEAD_DV=d)
    favor = dict(SOFTMAX=True, BLOCK_F=FEATURE_BLOCK, BLOCK_T=pad_pow2(t), **tiles)
    combine = dict(BLOCK_M=block_m, BLOCK_DV=d, HEAD_DV=d)
    specs.append(pytest.param("favor-bf16", "bf16", decode_kernels._favor_step_kernel, favor, FAVOR_WARPS))
    specs.append(pytest.param("combine-bf16", "bf16", decode_kernels._combine_kernel, combine, 4))
    return specs


SPECS = _specs()


@pytest.mark.parametrize("arch", [90], ids=lambda a: f"sm{a}")
@pytest.mark.parametrize(("name", "dtype", "fn", "constexprs", "warps"), SPECS, ids=[s.values[0] for s in SPECS])
def test_decode_kernels_compile_without_spills(name, dtype, fn, constexprs, warps, arch: int) -> None:
    num_stages = 2 if name.startswith("split") else 1
    stats = aot.compile_for(
        fn, _signature(fn, dtype, constexprs), constexprs, arch=arch, num_warps=warps, num_stages=num_stages
    )
    print(f"sm_{arch} {name:20s} regs {stats.registers:3d}  spill {stats.spill_bytes:5d} B")
    assert stats.spill_bytes == 0, f"{name} spills {stats.spill_bytes} bytes on sm_{arch}"
