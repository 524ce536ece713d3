"""Ahead-of-time compilation of the chunked FAVOR+ kernels for sm_90 and sm_80 (no GPU needed).

The default launch config of every chunked kernel, in every form it launches in (key states
causal and split, query-side states causal and split, the combine, the query pass and dQ causal
and not, dK and dV causal: their non-causal forms are subsets), is lowered to PTX for bfloat16 at
head dim 64 with 256 features, the causal query and backward kernels also at head dim 128, plus
spot checks (float16, the float32 feature path, relu, key padding, GQA). On sm_90
the 16-bit kernels must run every product on wgmma (no ``mma.sync``, no ``.tf32`` operands) and
must not spill. Registers and spills are reported at the end of the module (``pytest -s`` shows
them); integer arguments get no divisibility hints here (``attn_kernels.aot``), but the head dims
are constexprs of these kernels, so their row strides are known at compile time either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from attn_kernels import favor_chunk_configs as cfgs
from attn_kernels.launch import LaunchShape

K = pytest.importorskip("attn_kernels.favor_chunk_kernels")
aot = pytest.importorskip("attn_kernels.aot")

_TYPES = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}
# Pointers in the input dtype (the rest are float32, or the feature dtype, or int8).
_DATA = {"k_ptr", "q_ptr", "v_ptr", "o_ptr", "do_ptr", "dq_ptr", "dk_ptr", "dv_ptr", "y_ptr"}
_FEAT = {"phi_ptr", "x_ptr", "psi_ptr", "r_ptr"}


@dataclass(frozen=True)
class Spec:
    """One kernel specialisation: ``kernel`` a key of :data:`attn_kernels.favor_chunk_configs.CONFIGS`
    (or ``combine``), ``mode`` the state kernel's ``keys``/``queries``."""

    kernel: str
    causal: bool
    dtype: str = "bf16"
    d: int = 64
    m: int = 256
    fp32_path: bool = False  # float32 features (float32 inputs, float16 with a gradient)
    relu: bool = False
    padded: bool = False
    groups: int = 1

    @property
    def shape(self) -> LaunchShape:
        return LaunchShape(self.d, 4 if self.fp32_path else 2, self.causal, m_pad=self.m)

    @property
    def cfg(self) -> cfgs.ChunkConfig:
        if self.kernel == "combine":
            return cfgs.ChunkConfig(32, 32, 4, 1)
        return cfgs.candidates(self.kernel, self.shape)[0]

    @property
    def id(self) -> str:
        parts = [self.kernel, self.cfg.name, self.dtype + ("-fp32feat" if self.fp32_path else ""), f"D{self.d}"]
        parts += ["causal" if self.causal else "full"]
        parts += [
            x for x, on in (("relu", self.relu), ("padded", self.padded), (f"G{self.groups}", self.groups > 1)) if on
        ]
        return "-".join(parts)

    def fn(self):
        return {
            "chunk_features": K._key_features_kernel,
            "chunk_state": K._state_kernel,
            "chunk_state_bwd": K._state_kernel,
            "combine": K._combine_kernel,
            "chunk_fwd": K._fwd_kernel,
            "chunk_dq": K._dq_kernel,
            "chunk_dk": K._dk_kernel,
            "chunk_dv": K._dv_kernel,
        }[self.kernel]

    def constexprs(self) -> dict[str, object]:
        cfg, d = self.cfg, self.d
        feat = {"SOFTMAX": not self.relu, "CAUSAL": self.causal, "FP32": self.fp32_path}
        if self.kernel == "chunk_features":
            split = 0 if self.fp32_path else 1
            return {"D": d, "D_PAD": d, "M": self.m, "M_PAD": self.m, "CHUNK": cfgs.CHUNK, "BLOCK_F": cfg.block_n,
                    "N_SPLIT": split, "SOFTMAX": not self.relu, "HAS_PAD": self.padded}  # fmt: skip
        if self.kernel in cfgs.STATE_KERNELS:
            return {"DV": d, "DV_PAD": d, "M_PAD": self.m, "CHUNK": cfgs.CHUNK, "BLOCK_K": cfg.block_m,
                    "BLOCK_V": min(cfg.block_n, d), "KEYS": self.kernel == "chunk_state", **feat}  # fmt: skip
        if self.kernel == "combine":
            return {"DV_PAD": d, "M_PAD": self.m, "BLOCK_K": cfg.block_m, "SHIFT": not self.relu}
        dims = {"DV": d, "DV_PAD": d, "M_PAD": self.m, "CHUNK": cfgs.CHUNK, "BLOCK_F": cfg.block_n, **feat}
        if self.kernel == "chunk_dv":
            return {"G": self.groups, **dims, "HAS_PAD": self.padded}
        dims |= {"D": d, "D_PAD": d}
        if self.kernel == "chunk_dk":
            return {"G": self.groups, **dims, "HAS_PAD": self.padded}
        rows = cfgs.CHUNK if self.causal else cfg.block_m
        return {**dims, "M": self.m, "BLOCK_M": rows, "N_SPLIT": 0 if self.fp32_path else 1}

    def _feature_operand(self, name: str) -> bool:
        """``h_ptr``: the states in the feature dtype (float32 partial sums of a split state pass);
        ``w_ptr``: the gradient projection (float32 sums and weights in the state kernel)."""
        state = self.kernel in cfgs.STATE_KERNELS
        return (name == "h_ptr" and not (state and not self.causal)) or (name == "w_ptr" and not state)

    def signature(self) -> dict[str, str]:
        sig = {}
        for name in self.fn().arg_names:
            if name in self.constexprs():
                continue
            if name in _DATA or (name == "wt_ptr" and not self.fp32_path):
                sig[name] = _TYPES[self.dtype]
            elif name in _FEAT or self._feature_operand(name):
                sig[name] = "*fp32" if self.fp32_path else _TYPES[self.dtype]
            elif name == "kpm_ptr":
                sig[name] = "*i8"
            elif name.endswith("_ptr"):
                sig[name] = "*fp32"
            elif name in ("half2", "scale"):
                sig[name] = "fp32"
            else:
                sig[name] = "i32"
        return sig


def _specs() -> list[Spec]:
    every_form = [Spec("chunk_features", False), Spec("combine", False)]
    every_form += [
        Spec(k, c) for k in ("chunk_state", "chunk_state_bwd", "chunk_fwd", "chunk_dq") for c in (False, True)
    ]
    every_form += [Spec("chunk_dk", True), Spec("chunk_dv", True)]  # their non-causal forms are subsets
    wide = [Spec(k, True, d=128) for k in ("chunk_fwd", "chunk_dq", "chunk_dk", "chunk_dv")]
    spots = [
        Spec("chunk_fwd", True, fp32_path=True, dtype="fp32"),
        Spec("chunk_dq", True, fp32_path=True, dtype="fp16"),
        Spec("chunk_fwd", True, relu=True, dtype="fp16"),
        Spec("chunk_dk", True, relu=True, padded=True),
        Spec("chunk_dk", True, groups=4),
        Spec("chunk_dv", True, groups=4),
    ]
    return every_form + wide + spots


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
        writer.write_line("Chunked FAVOR+ kernels, ptxas -v (registers per thread, spill bytes, shared memory):")
        for line in lines:
            writer.write_line("  " + line)

    if writer is not None and lines and request.config.getoption("capture") == "no":
        request.config.add_cleanup(write)


def _compile(spec: Spec, arch: int):
    cfg = spec.cfg
    return aot.compile_for(
        spec.fn(), spec.signature(), spec.constexprs(), arch=arch, num_warps=cfg.num_warps, num_stages=cfg.num_stages
    )


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.id)
def test_sm90_wgmma_only_and_no_spills(spec: Spec) -> None:
    stats = _compile(spec, 90)
    _REPORT.append(
        f"sm_90 {spec.id:52s} regs {stats.registers:3d}  spill {stats.spill_bytes:5d} B  smem {stats.shared_mem} B"
    )
    ptx = stats.ptx
    if spec.kernel == "combine":
        assert ".entry" in ptx
        return
    assert "wgmma.mma_async" in ptx, f"{spec.id}: no wgmma"
    assert "mma.sync" not in ptx, f"{spec.id}: a product fell back to mma.sync"
    tf32 = [line for line in ptx.splitlines() if "wgmma.mma_async" in line and ".tf32" in line]
    if spec.fp32_path:
        assert tf32, f"{spec.id}: the float32 feature path should take tf32x3 products"
        return  # the accuracy path: spills are reported, not gated (docs/kernels.md)
    assert not tf32, f"{spec.id}: TF32 products for 16-bit inputs"
    assert stats.spill_bytes == 0, f"{spec.id} spills {stats.spill_bytes} bytes on sm_90"


SM80 = [Spec("chunk_features", False), Spec("chunk_fwd", True), Spec("chunk_dk", True)]


@pytest.mark.parametrize("spec", SM80, ids=lambda s: s.id)
def test_sm80_compiles(spec: Spec) -> None:
    """The A100 path (mma.sync, cp.async) builds from the same source."""
    stats = _compile(spec, 80)
    _REPORT.append(
        f"sm_80 {spec.id:52s} regs {stats.registers:3d}  spill {stats.spill_bytes:5d} B  smem {stats.shared_mem} B"
    )
    assert ".entry" in stats.ptx
