"""The AOT path applies Triton's launcher specialisation to integer arguments: checked against the
documented rule and the installed launcher's own function, and through a real compile."""

from __future__ import annotations

import random

import pytest
import torch

from attn_kernels.launch import LaunchSample

aot = pytest.importorskip("attn_kernels.aot")
pytest.importorskip("triton.backends.nvidia.compiler")


# Hand-written from the documented rule: 1 is a constant, multiples of 16 (0 too) are divisible,
# the type is the narrowest of i32, i64, u64 that holds the value.
RULE = {
    1: ("constexpr", 1),
    0: ("i32", 16),
    -1: ("i32", None),
    2: ("i32", None),
    16: ("i32", 16),
    -16: ("i32", 16),
    4097: ("i32", None),
    2**31 - 16: ("i32", 16),
    2**31 - 1: ("i32", None),
    -(2**31): ("i32", 16),
    2**31: ("i64", 16),
    -(2**31) - 1: ("i64", None),
    2**40 + 8: ("i64", None),
    2**63 - 1: ("i64", None),
    -(2**63): ("i64", 16),
    2**63: ("u64", 16),
    2**64 - 1: ("u64", None),
}


def _launcher(value: int) -> tuple[str, int | None]:
    """What the installed Triton's launcher does with an int argument (its own function)."""
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime import jit

    impl = getattr(jit, "native_specialize_impl", None)
    if impl is None:
        pytest.skip("this Triton has no native_specialize_impl")
    kind, key = impl(CUDABackend, value, False, True, True)  # (arg, is_const, specialize, align)
    if kind == "constexpr":
        return kind, key
    return kind, 16 if key == "D" else None


def test_specialize_int_follows_the_rule_and_the_launcher() -> None:
    rng = random.Random(0)
    drawn = [rng.randrange(-(2**33), 2**33) for _ in range(200)] + [16 * rng.randrange(1, 2**26) for _ in range(50)]
    for value, expected in RULE.items():
        assert aot.specialize_int(value) == expected, value
        assert _launcher(value) == expected, value
    for value in drawn:
        assert aot.specialize_int(value) == _launcher(value), value
    for bad in (True, 1.0, "1"):
        with pytest.raises(TypeError, match="int"):
            aot.specialize_int(bad)
    with pytest.raises(ValueError, match="64 bits"):
        aot.specialize_int(2**64)


def test_compile_for_specialises_integer_values() -> None:
    """An integer given by value reaches the compiler as the launcher would pass it: 1 becomes a
    constant (gone from the kernel's parameters), a multiple of 16 carries the divisibility hint."""
    from attn_kernels import flash_kernels
    from attn_kernels.launch import KernelConfig

    cfg = KernelConfig(64, 16, 4, 1)

    def params(sample: LaunchSample, head_dim: int = 64, **ints: int):
        fn, sig, cx = flash_kernels.aot_spec("bwd_delta", cfg, head_dim, torch.float16, sample=sample)
        sig.update(ints)
        stats = aot.compile_for(fn, sig, cx, arch=80, num_warps=4, num_stages=1)
        entry = stats.ptx[stats.ptx.index(".entry") :].split(")", 1)[0]
        return stats, entry.count(".param")

    typed, n_typed = params(LaunchSample(), H="i32", NQ="i32")
    assert typed.signature["H"] == "i32" and "NQ" not in typed.divisible and "O" in typed.divisible
    one, n_one = params(LaunchSample(heads=1, kv_heads=1, seq_len=4096))
    assert one.signature["H"] == "constexpr" and "NQ" in one.divisible and "stride_om" in one.divisible
    assert n_one == n_typed - 1  # H is compiled in
    odd, _ = params(LaunchSample(heads=3, kv_heads=3, seq_len=4097), head_dim=40)
    assert odd.signature["H"] == "i32" and "NQ" not in odd.divisible and "stride_om" not in odd.divisible
    with pytest.raises(TypeError, match="NQ"):
        params(LaunchSample(), NQ=4096.0)
