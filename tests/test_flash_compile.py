"""Every shipped launch configuration of the fused softmax kernels, compiled ahead of time.

No GPU needed: ``attn_kernels.aot.compile_for`` lowers each kernel to PTX for sm_80 (A100) and
sm_90 (H100) and runs the wheel's ``ptxas -v`` on it, with the integer arguments specialised on
their values in the default launch sample as Triton's launcher does. Registers, shared memory and
spills are printed (``pytest -s`` shows them); a forward kernel that spills fails the test (but
for the few bytes listed in ``_SPILL_BOUNDS``). Each config is compiled in the specialisation
with the most live state (causal, global tokens), and the forward also in its gathered-global-rows
specialisation (with its own, halved query tile). The 16-bit forwards (those at the register
limit) are compiled once more with a key padding mask (``HAS_PAD``), which must not make them
spill either.
"""

from __future__ import annotations

import pytest
import torch

from attn_kernels import flash_configs
from attn_kernels.launch import KernelConfig, LaunchShape
from tests.helpers import aot_release

flash_kernels = pytest.importorskip("attn_kernels.flash_kernels")
aot = pytest.importorskip("attn_kernels.aot")

ARCHS = [pytest.param(80, id="sm80"), pytest.param(90, id="sm90")]
_DT = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _specs() -> list:
    specs = []
    for kernel, cfg, head_dim, dtype in flash_configs.shipped_configs():
        name = f"{cfg}-D{head_dim}-{_DT[dtype]}"
        specs.append(pytest.param((kernel, cfg, head_dim, dtype, False, False), id=f"{kernel}-{name}"))
        if kernel == "fwd":
            gcfg = flash_configs.gathered_config(cfg)
            gname = f"{gcfg}-D{head_dim}-{_DT[dtype]}"
            specs.append(pytest.param((kernel, gcfg, head_dim, dtype, True, False), id=f"{kernel}_gathered-{gname}"))
        if kernel == "fwd" and dtype != torch.float32:  # the 16-bit forwards run at the register limit
            specs.append(pytest.param((kernel, cfg, head_dim, dtype, False, True), id=f"{kernel}_padded-{name}"))
    return specs


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("spec", _specs())
def test_shipped_config_compiles(spec, arch: int) -> None:
    kernel, cfg, head_dim, dtype, gathered, padded = spec
    fn, signature, constexprs = flash_kernels.aot_spec(kernel, cfg, head_dim, dtype, gathered=gathered, has_pad=padded)
    stats = aot.compile_for(fn, signature, constexprs, arch=arch, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    flavour = "_gathered" if gathered else "_padded" if padded else ""
    print(
        f"\n{kernel}{flavour} {cfg} D{head_dim} {_DT[dtype]} sm_{arch}: "
        f"{stats.registers} registers, {stats.spill_bytes} B spilled, {stats.shared_mem} B shared"
    )
    assert stats.arch == arch
    assert ".entry" in stats.ptx and f"sm_{arch}" in stats.ptx
    assert stats.registers > 0
    if kernel == "fwd":
        allowed = _SPILL_BOUNDS.get((aot_release(), str(cfg), head_dim, arch), 0)
        assert stats.spill_bytes <= allowed, f"forward kernel spills {stats.spill_bytes} bytes"


# Forward launches that spill a little (documented in docs/kernels.md): at most this many bytes,
# per Triton release ("3.6" or "newer", see aot_release). Head dims above 128 in 16 bits on
# sm_90: ptxas 12.8 (Triton 3.6) keeps the kernel at 128 registers and spills one 64-bit value
# (8 B stored, 8 B loaded); Triton 3.9 does not spill there.
_SPILL_BOUNDS = {("3.6", "M32-N32-w8-s1", 256, 90): 16}


def test_every_selected_config_is_shipped() -> None:
    """select_config only launches configs that the compile test builds, at a head dim at least
    as large (16-bit configs are compiled in bfloat16, float32 ones in float32)."""
    shipped = {(k, c, torch.finfo(t).bits // 8): d for k, c, d, t in flash_configs.shipped_configs()}
    for dtype in flash_configs.SUPPORTED_DTYPES:
        eb = torch.finfo(dtype).bits // 8
        for head_dim in (16, 40, 64, 80, 96, 128, 200, 256):
            for n in (1, 100, 4096, 65536):
                for window in (None, 16, 1024):
                    for causal in (False, True):
                        shape = LaunchShape(head_dim, eb, causal, n=n, window=window)
                        for backward, kernels in ((False, ("fwd",)), (True, ("bwd_dq", "bwd_dkdv"))):
                            cfg = flash_configs._select_gpu(shape, backward)
                            for kernel in kernels:
                                assert (kernel, cfg, eb) in shipped, (kernel, cfg, shape)
                                assert head_dim <= shipped[(kernel, cfg, eb)]


def test_compile_for_rejects_a_bad_signature() -> None:
    cfg = KernelConfig(64, 32, 4, 2)
    fn, signature, constexprs = flash_kernels.aot_spec("fwd", cfg, 64, torch.float16)
    signature.pop("NQ")
    with pytest.raises(ValueError, match="NQ"):
        aot.compile_for(fn, signature, constexprs, arch=80)
