"""Ahead-of-time compilation of the FAVOR+ kernels for sm_80 and sm_90 (no GPU needed).

Every shipped configuration that :func:`attn_kernels.favor_configs.keep` accepts for the main shape (bfloat16,
head dim 64, 256 features, causal and not) is lowered to PTX and run through ``ptxas -v``;
other dtypes, the relu kernel, the backward flavours of the state kernel, head dim 128 and the
key padding specialisation (``HAS_PAD``) of the key kernels and the causal query pass are spot-checked.
Registers and spills are reported at the end of the module; the forward kernels (key maximum,
key states, query pass) must not spill.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from attn_kernels import favor_configs
from attn_kernels.favor_configs import FeatureConfig
from attn_kernels.launch import LaunchShape

favor_kernels = pytest.importorskip("attn_kernels.favor_kernels")
aot = pytest.importorskip("attn_kernels.aot")

ARCHS = (80, 90)
FORWARD_KERNELS = ("key_max", "state", "fwd")
_FNS = {
    "key_max": favor_kernels._key_max_kernel,
    "state": favor_kernels._state_kernel,
    "fwd": favor_kernels._fwd_kernel,
    "bwd_dq": favor_kernels._bwd_dq_kernel,
    "bwd_dkv": favor_kernels._bwd_dkv_kernel,
}
_TRITON_DTYPE = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}
_N_SPLIT = {"bf16": 2, "fp16": 2, "fp32": 0}
# Pointer arguments holding tensors in the input dtype; every other pointer is float32.
_DATA_PTRS = {"q_ptr", "k_ptr", "v_ptr", "o_ptr", "do_ptr", "dq_ptr", "dk_ptr", "dv_ptr", "x_ptr", "y_ptr"}


@dataclass(frozen=True)
class Spec:
    kernel: str
    cfg: FeatureConfig
    dtype: str = "bf16"
    causal: bool = False
    feature: str = "softmax"
    d: int = 64
    m: int = 256
    backward_state: bool = False  # the state kernel as the backward uses it (per-row lse, weights)
    padded: bool = False  # with a key padding mask

    @property
    def id(self) -> str:
        parts = [self.kernel, self.cfg.name, self.dtype, f"D{self.d}", f"m{self.m}"]
        if self.causal:
            parts.append("causal")
        if self.feature != "softmax":
            parts.append(self.feature)
        if self.backward_state:
            parts.append("bwd")
        if self.padded:
            parts.append("padded")
        return "-".join(parts)

    def signature(self) -> dict[str, str]:
        fn = _FNS[self.kernel]
        sig = {}
        for name in fn.arg_names:
            if name in self.constexprs():
                continue
            if name in _DATA_PTRS or (name == "wt_ptr" and self.dtype != "fp32"):
                sig[name] = "*" + _TRITON_DTYPE[self.dtype]
            elif name == "kpm_ptr":
                sig[name] = "*i8"
            elif name.endswith("_ptr"):
                sig[name] = "*fp32"
            elif name == "half_s2":
                sig[name] = "fp32"
            else:
                sig[name] = "i32"
        return sig

    def constexprs(self) -> dict[str, object]:
        pad = {"D_PAD": self.d, "M_PAD": self.m}
        split = {"N_SPLIT": _N_SPLIT[self.dtype], "HAS_PAD": self.padded}
        if self.kernel == "key_max":
            return {**pad, **split, "BLOCK_N": favor_configs.BLOCK_ROWS, "BLOCK_F": self.cfg.block_f}
        common = {
            **pad,
            **split,
            "DV_PAD": self.d,
            "BLOCK_F": self.cfg.block_f,
            "KERNEL": self.feature,
            "DOT_PREC": "tf32x3" if self.dtype == "fp32" else "tf32",
        }
        if self.kernel == "state":
            return {
                **common,
                "BLOCK_N": favor_configs.CHUNK if self.causal else favor_configs.BLOCK_ROWS,
                "STAB": 2 if self.backward_state else 1,
                "HAS_WEIGHT": self.backward_state,
            }
        rows = "BLOCK_N" if self.kernel == "bwd_dkv" else "BLOCK_M"
        return {**common, rows: self.cfg.block_m, "CHUNK": favor_configs.CHUNK, "CAUSAL": self.causal}


def _specs() -> list[Spec]:
    specs = []
    for kernel in _FNS:
        # key_max and state compile the same for both forms (CHUNK == BLOCK_ROWS rows).
        for causal in (False, True) if kernel in ("fwd", "bwd_dq", "bwd_dkv") else (False,):
            shape = LaunchShape(64, 2, causal, m_pad=256)
            specs += [Spec(kernel, cfg, causal=causal) for cfg in favor_configs.kept_configs(kernel, shape)]
    # Spot checks of the other specialisations, with the first config kept for them.
    for kernel, kw in [
        ("fwd", {"causal": True, "dtype": "fp16"}),
        ("fwd", {"causal": True, "dtype": "fp32"}),
        ("fwd", {"causal": False, "dtype": "fp32"}),
        ("fwd", {"causal": True, "feature": "relu"}),
        ("fwd", {"causal": True, "d": 128}),
        ("fwd", {"causal": False, "d": 128}),
        ("state", {"causal": True, "backward_state": True}),
        ("state", {"causal": False, "dtype": "fp32"}),
        ("bwd_dq", {"causal": True, "feature": "relu", "dtype": "fp16"}),
        ("bwd_dkv", {"causal": True, "feature": "relu", "dtype": "fp16"}),
        ("key_max", {"causal": False, "padded": True}),
        ("state", {"causal": True, "padded": True}),
        ("fwd", {"causal": True, "padded": True}),
        ("bwd_dkv", {"causal": True, "padded": True}),
    ]:
        d = kw.get("d", 64)
        shape = LaunchShape(d, 4 if kw.get("dtype") == "fp32" else 2, kw["causal"], m_pad=256)
        specs.append(Spec(kernel, favor_configs.kept_configs(kernel, shape)[0], **kw))
    return specs


SPECS = _specs()
_REPORT: list[str] = []


@pytest.fixture(scope="module", autouse=True)
def report(request: pytest.FixtureRequest):
    """Print the ptxas table after the run (when output is no longer captured)."""
    yield
    writer = request.config.pluginmanager.get_plugin("terminalreporter")
    lines = list(_REPORT)

    def write() -> None:
        writer.write_line("")
        writer.write_line("FAVOR+ kernels, ptxas -v (registers per thread, spill bytes, shared memory):")
        for line in lines:
            writer.write_line("  " + line)

    if writer is not None and lines:
        request.config.add_cleanup(write)


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.id)
def test_compiles_without_forward_spills(spec: Spec, arch: int, record_property) -> None:
    stats = aot.compile_for(
        _FNS[spec.kernel],
        spec.signature(),
        spec.constexprs(),
        arch=arch,
        num_warps=spec.cfg.num_warps,
        num_stages=spec.cfg.num_stages,
    )
    record_property("registers", stats.registers)
    record_property("spill_bytes", stats.spill_bytes)
    _REPORT.append(
        f"sm_{arch} {spec.id:48s} regs {stats.registers:3d}  spill {stats.spill_bytes:5d} B  smem {stats.shared_mem} B"
    )
    assert ".entry" in stats.ptx
    if spec.kernel in FORWARD_KERNELS and not spec.backward_state and not _known_spill(spec, arch):
        assert stats.spill_bytes == 0, f"{spec.id} spills {stats.spill_bytes} bytes on sm_{arch}"


def _known_spill(spec: Spec, arch: int) -> bool:
    """Forward specialisations known to spill (reported above, documented in docs/kernels.md).

    The causal query pass with float32 inputs (three-TF32 products double every operand), and
    with head dim 128 on sm_80 (a few bytes with the smallest config).
    """
    if spec.kernel != "fwd" or not spec.causal:
        return False
    return spec.dtype == "fp32" or (spec.d > 64 and arch == 80)
