"""Every shipped launch configuration of the fused softmax kernels, compiled ahead of time.

No GPU needed: ``attn_kernels.aot.compile_for`` lowers each kernel to PTX for sm_80 (A100) and
sm_90 (H100) and runs the wheel's ``ptxas -v`` on it, with the integer arguments specialised on
their values in the default launch sample as Triton's launcher does. Registers, shared memory and
spills are printed (``pytest -s`` shows them); a forward kernel that spills fails the test (but
for the few bytes listed in ``_SPILL_BOUNDS``). Each config is compiled for the architectures it
runs on (the sm_90 ones for sm_90 only) in the specialisation with the most live state (causal,
global tokens; causal full attention for a config that never sees a band), and the forward also
in its gathered-global-rows specialisation (with its own, halved query tile). The 16-bit
forwards (those at the register limit) are compiled once more with a key padding mask
(``HAS_PAD``), which must not make them spill either. A backward config's dq kernel is compiled
at its own tiles (transposed for the split modes).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from attn_kernels import flash_configs
from attn_kernels.launch import LaunchShape
from tests.helpers import aot_release

flash_kernels = pytest.importorskip("attn_kernels.flash_kernels")
aot = pytest.importorskip("attn_kernels.aot")

_DT = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _specs() -> list:
    """``(kernel, config, head dim, dtype, flags)`` per arch: the plain specialisation with the
    most live state (causal, global tokens, or causal full attention for a config that never
    sees a band), the forward's gathered global rows and, in 16 bits, its key padding."""
    specs = []
    for kernel, cfg, head_dim, dtype, archs, full_only in flash_configs.shipped_configs():
        name = f"{cfg}-D{head_dim}-{_DT[dtype]}"
        plain = {"has_global": not full_only}
        variants = [("", cfg, plain)]
        if kernel == "fwd" and not full_only:
            variants.append(("_gathered", flash_configs.gathered_config(cfg), {"gathered": True}))
        if kernel == "fwd" and dtype != torch.float32:  # the 16-bit forwards run at the register limit
            variants.append(("_padded", cfg, {**plain, "has_pad": True}))
        for flavour, vcfg, flags in variants:
            vname = name if vcfg == cfg else f"{vcfg}-D{head_dim}-{_DT[dtype]}"
            for arch in archs:
                spec = (kernel, vcfg, head_dim, dtype, flags, flavour)
                specs.append(pytest.param(spec, arch, id=f"{kernel}{flavour}-{vname}-sm{arch}"))
    return specs


@pytest.mark.compile_sweep
@pytest.mark.parametrize(("spec", "arch"), _specs())
def test_shipped_config_compiles(spec, arch: int) -> None:
    kernel, cfg, head_dim, dtype, flags, flavour = spec
    fn, signature, constexprs = flash_kernels.aot_spec(kernel, cfg, head_dim, dtype, **flags)
    stats = aot.compile_for(fn, signature, constexprs, arch=arch, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    print(
        f"\n{kernel}{flavour} {cfg} D{head_dim} {_DT[dtype]} sm_{arch}: "
        f"{stats.registers} registers, {stats.spill_bytes} B spilled, {stats.shared_mem} B shared"
    )
    assert stats.arch == arch
    assert ".entry" in stats.ptx and f"sm_{arch}" in stats.ptx
    assert stats.registers > 0
    if kernel == "fwd":
        allowed = _SPILL_BOUNDS.get((aot_release(), str(cfg), head_dim, arch, flavour), 0)
        assert stats.spill_bytes <= allowed, f"forward kernel spills {stats.spill_bytes} bytes"


# Forward launches that spill a little (documented in docs/kernels.md): at most this many bytes,
# per Triton release ("3.6" or "newer", see aot_release) and specialisation. Head dims above 128
# in 16 bits on sm_90: ptxas 12.8 (Triton 3.6) keeps the kernel at 128 registers and spills one
# 64-bit value (8 B stored, 8 B loaded); Triton 3.9 does not spill there. The 128 x 128 TMA
# forward with causal masks and key padding: 8 B under Triton 3.6 (255 registers).
_SPILL_BOUNDS = {("3.6", "M32-N32-w8-s1", 256, 90, flavour): 16 for flavour in ("", "_gathered", "_padded")}
_SPILL_BOUNDS[("3.6", "M128-N128-w8-s2-tma", 128, 90, "_padded")] = 8


def test_every_selected_config_is_shipped() -> None:
    """select_config only launches configs that the compile test builds, at a head dim at least
    as large (16-bit configs are compiled in bfloat16, float32 ones in float32)."""
    shipped = {(s.kernel, s.config, torch.finfo(s.dtype).bits // 8): s for s in flash_configs.shipped_configs()}
    for dtype in flash_configs.SUPPORTED_DTYPES:
        eb = torch.finfo(dtype).bits // 8
        for head_dim in (16, 40, 64, 80, 96, 128, 200, 256):
            for n in (1, 100, 4096, 65536):
                for window in (None, 16, 300, 1024, 5000):
                    for causal, capability in itertools.product((False, True), ((8, 0), (9, 0))):
                        shape = LaunchShape(head_dim, eb, causal, n=n, window=window)
                        for backward in (False, True):
                            cfg = flash_configs._select_gpu(shape, backward, capability)
                            fallback = flash_configs.pointer_config(shape, backward, capability)
                            kernels = [("fwd", cfg), ("fwd", fallback)]
                            if backward:
                                dq = flash_configs.dq_config
                                kernels = [("bwd_dq", dq(cfg)), ("bwd_dkdv", cfg), ("bwd_dq", dq(fallback))]
                            for kernel, kcfg in kernels:
                                s = shipped[(kernel, kcfg, eb)]
                                assert head_dim <= s.head_dim and capability[0] * 10 in s.archs, (kernel, kcfg, shape)
                                assert window is None or not s.full_only


def test_compile_for_rejects_a_bad_signature() -> None:
    cfg = flash_configs.FlashConfig(64, 32, 4, 2)
    fn, signature, constexprs = flash_kernels.aot_spec("fwd", cfg, 64, torch.float16)
    signature.pop("NQ")
    with pytest.raises(ValueError, match="NQ"):
        aot.compile_for(fn, signature, constexprs, arch=80)
