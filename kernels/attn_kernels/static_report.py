"""The static kernel report: every Triton kernel compiled for a target GPU, no GPU needed.

:func:`kernel_specs` lists the kernels of the three families (the fused softmax kernels of full
and sliding-window attention, the FAVOR+ kernels, the decoding-step kernels) at their shipped
config for one dtype and head dim, and optionally at the configs ``attn-bench tune`` would try.
:func:`compile_row` compiles one of them with :func:`attn_kernels.aot.compile_for` (the launcher's
specialisation of the integer arguments, for the launch of a :class:`~attn_kernels.launch.LaunchSample`),
disassembles the cubin and reads its main loop with :mod:`attn_kernels.sass`: one flat dict per
kernel (:data:`COLUMNS`). A kernel that does not compile gives a row with its error.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import aot, sass
from .launch import KernelConfig, LaunchSample, LaunchShape, pad_pow2

FAMILIES = ("flash", "favor", "decode")
ARCHS = (80, 90, 100)
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

# One row per compiled kernel; the CSV's columns in order.
COLUMNS = (
    "kernel", "family", "pass", "role", "config", "block_m", "block_n", "num_warps", "num_stages",
    "arch", "dtype", "head_dim", "causal", "status", "error", "compile_s",
    "registers", "spill_bytes", "shared_mem", "constexpr_ints", "divisible_ints",
    "loops", "loop_choice", "loop_address", "loop_instructions", "loop_unit", "loop_items", "instr_per_item_per_warp",
    "hgmma", "hmma", "hgmma_tf32", "hmma_tf32", "hgmma_shapes",
    "loads", "utmaldg", "ldgsts", "ldg", "bar", "fmul", "ffma", "mufu",
)  # fmt: skip


@dataclass(frozen=True)
class KernelSpec:
    """One kernel launch to compile: ``kernel`` (e.g. ``"flash_fwd"``), its ``family`` and ``pass``
    (``fwd``, ``bwd``, ``decode``), ``role`` (``"shipped"``: the launcher's heuristic default;
    ``"candidate"``: another config ``attn-bench tune`` times), the compile arguments, and what one
    main-loop iteration walks: ``loop_unit`` (``keys``, ``queries``, ``features``) and
    ``loop_items`` of them: one tile (empty for a kernel without a tile loop)."""

    kernel: str
    family: str
    pass_: str
    role: str
    config: KernelConfig
    fn: object
    signature: dict[str, str | int] = field(repr=False)
    constexprs: dict[str, object] = field(repr=False)
    loop_unit: str
    loop_items: int


def kernel_names() -> dict[str, str]:
    """``{kernel: family}`` of every kernel the report can compile."""
    flash = ("flash_fwd", "flash_bwd_delta", "flash_bwd_dq", "flash_bwd_dkdv")
    favor = ("favor_key_max", "favor_state", "favor_fwd", "favor_query_state", "favor_bwd_dq", "favor_bwd_dkv")
    decode = ("decode_split", "decode_combine", "decode_favor_step")
    return {k: f for f, names in (("flash", flash), ("favor", favor), ("decode", decode)) for k in names}


def _roles(configs: list) -> list[tuple[str, object]]:
    return [("shipped" if i == 0 else "candidate", c) for i, c in enumerate(configs)]


def _flash_specs(dtype, head_dim: int, causal: bool, arch: int, candidates: bool, sample) -> list[KernelSpec]:
    from . import flash_configs, flash_kernels

    def spec(kernel: str, pass_: str, role: str, cfg: KernelConfig) -> KernelSpec:
        flags = dict(causal=causal, has_global=False, sample=sample)
        fn, sig, cx = flash_kernels.aot_spec(kernel, cfg, head_dim, dtype, **flags)
        unit, items = {"bwd_dkdv": ("queries", cfg.block_m), "bwd_delta": ("", 0)}.get(kernel, ("keys", cfg.block_n))
        return KernelSpec(f"flash_{kernel}", "flash", pass_, role, cfg, fn, sig, cx, unit, items)

    shape = LaunchShape(head_dim, torch.finfo(dtype).bits // 8, causal, n=sample.seq_len)
    capability = (arch // 10, arch % 10)
    fwd = flash_configs.tune_candidates(shape, False, capability)
    bwd = flash_configs.tune_candidates(shape, True, capability)
    if not candidates:
        fwd, bwd = fwd[:1], bwd[:1]
    out = [spec("fwd", "fwd", role, cfg) for role, cfg in _roles(fwd)]
    out.append(spec("bwd_delta", "bwd", "shipped", flash_configs.delta_config(head_dim)))
    for role, cfg in _roles(bwd):  # the dq kernel at its own tiles (transposed for the split modes)
        out += [spec("bwd_dq", "bwd", role, flash_configs.dq_config(cfg)), spec("bwd_dkdv", "bwd", role, cfg)]
    return out


def _favor_specs(dtype, head_dim: int, causal: bool, candidates: bool, sample) -> list[KernelSpec]:
    from . import favor_configs, favor_kernels

    shape = LaunchShape(head_dim, torch.finfo(dtype).bits // 8, causal, m_pad=pad_pow2(sample.features))
    plan = [  # (report name, kernel, backward state, pass, loop unit)
        ("favor_key_max", "key_max", False, "fwd", "features"),
        ("favor_state", "state", False, "fwd", "keys"),
        ("favor_fwd", "fwd", False, "fwd", "features"),
        ("favor_query_state", "state", True, "bwd", "queries"),
        ("favor_bwd_dq", "bwd_dq", False, "bwd", "features"),
        ("favor_bwd_dkv", "bwd_dkv", False, "bwd", "features"),
    ]
    out = []
    for name, kernel, bstate, pass_, unit in plan:
        configs = favor_configs.heuristic_configs(kernel, shape)
        for role, cfg in _roles(configs if candidates else configs[:1]):
            fn, sig, cx = favor_kernels.aot_spec(
                kernel, cfg, head_dim, dtype, causal=causal, backward_state=bstate, sample=sample
            )
            items = cx["BLOCK_N"] if kernel == "state" else cfg.block_f
            out.append(KernelSpec(name, "favor", pass_, role, cfg, fn, sig, cx, unit, items))
    return out


def _decode_specs(dtype, head_dim: int, sample, performer: bool) -> list[KernelSpec]:
    from . import decode

    out = []
    plan = [("decode_split", "split"), ("decode_combine", "combine")]
    for name, kernel in plan + ([("decode_favor_step", "favor_step")] if performer else []):
        fn, sig, cx, cfg = decode.aot_spec(kernel, head_dim, dtype, sample=sample)
        # No per-item figure for the combine kernel: ptxas unrolls its short loop over the parts.
        unit, items = ("keys", cfg.block_n) if kernel == "split" else ("", 0)
        out.append(KernelSpec(name, "decode", "decode", "shipped", cfg, fn, sig, cx, unit, items))
    return out


def kernel_specs(
    arch: int,
    dtype: torch.dtype,
    head_dim: int,
    *,
    causal: bool = False,
    candidates: bool = False,
    kernels: list[str] | None = None,
    sample: LaunchSample | None = None,
) -> tuple[list[KernelSpec], list[str]]:
    """``(specs, notes)``: the kernels to compile for ``sm_<arch>``, ``dtype`` and ``head_dim``
    (shipped configs; with ``candidates`` also the tuner's), those of the families or names in
    ``kernels`` only; ``notes`` says which families this head dim or dtype leaves out.

    Raises ValueError naming the argument for an unknown arch, dtype, kernel or a head dim
    outside 1..256.
    """
    from . import favor_configs, flash_configs

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {', '.join(map(str, ARCHS))}, got {arch!r}")
    if dtype not in DTYPES.values():
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or not 1 <= head_dim <= flash_configs.MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be an int in 1..{flash_configs.MAX_HEAD_DIM}, got {head_dim!r}")
    names = kernel_names()
    wanted = set(names)
    if kernels is not None:
        bad = [k for k in kernels if k not in names and k not in FAMILIES]
        if bad or not kernels:
            raise ValueError(
                f"kernels must name families ({', '.join(FAMILIES)}) or kernels ({', '.join(names)}), got {kernels!r}"
            )
        wanted = {k for k, fam in names.items() if k in kernels or fam in kernels}
    sample = sample or LaunchSample()
    specs, notes = [], []
    if wanted & {k for k, f in names.items() if f == "flash"}:
        specs += _flash_specs(dtype, head_dim, causal, arch, candidates, sample)
    performer = head_dim <= favor_configs.MAX_HEAD_DIM
    if wanted & {k for k, f in names.items() if f == "favor"}:
        if performer:
            specs += _favor_specs(dtype, head_dim, causal, candidates, sample)
        else:
            notes.append(f"favor_*: the FAVOR+ kernels take head dims up to {favor_configs.MAX_HEAD_DIM}")
    if wanted & {k for k, f in names.items() if f == "decode"}:
        specs += _decode_specs(dtype, head_dim, sample, performer)
        if not performer and "decode_favor_step" in wanted:
            notes.append(f"decode_favor_step: the Performer step takes head dims up to {favor_configs.MAX_HEAD_DIM}")
    return [s for s in specs if s.kernel in wanted], notes


def _loads(stats: sass.LoopStats) -> str:
    """How the loop loads from global memory: ``"TMA 2 + cp.async 4 + sync 1"`` (``none`` if it does not)."""
    kinds = (("TMA", stats.utmaldg), ("cp.async", stats.ldgsts), ("sync", stats.ldg))
    parts = [f"{what} {n}" for what, n in kinds if n]
    return " + ".join(parts) or "none"


def compile_row(spec: KernelSpec, arch: int, dtype: torch.dtype, head_dim: int, causal: bool) -> dict[str, object]:
    """Compile ``spec`` for ``sm_<arch>`` and read its cubin: one row of :data:`COLUMNS` (status
    ``ok``, or ``error`` with the compiler's last message line in ``error``)."""
    cfg = spec.config
    row: dict[str, object] = dict.fromkeys(COLUMNS, "")
    row.update(
        kernel=spec.kernel, family=spec.family, role=spec.role, config=cfg.name, block_m=cfg.block_m,
        block_n=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages, arch=f"sm_{arch}",
        dtype=str(dtype).removeprefix("torch."), head_dim=head_dim, causal=causal, loop_unit=spec.loop_unit,
    )  # fmt: skip
    row["pass"] = spec.pass_
    start = time.perf_counter()
    try:
        stats = aot.compile_for(
            spec.fn, spec.signature, spec.constexprs, arch=arch, num_warps=cfg.num_warps, num_stages=cfg.num_stages
        )
        listing = sass.parse(aot.disassemble(stats.cubin))
    except aot.ToolMissing:
        raise
    except Exception as exc:  # a kernel that does not build is a row, not the end of the report
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        row.update(status="error", error=(lines[-1] if lines else type(exc).__name__)[:300])
        row["compile_s"] = round(time.perf_counter() - start, 1)
        return row
    ints = [k for k, v in spec.signature.items() if isinstance(v, int)]
    row.update(
        status="ok", compile_s=round(time.perf_counter() - start, 1), registers=stats.registers,
        spill_bytes=stats.spill_bytes, shared_mem=stats.shared_mem,
        constexpr_ints=" ".join(k for k in ints if stats.signature[k] == "constexpr"),
        divisible_ints=" ".join(k for k in ints if k in stats.divisible),
    )  # fmt: skip
    main = sass.main_loop(listing)
    row["loops"] = 0 if main is None else main.loops
    if main is None:
        row["loop_choice"] = "no loop"
        return row
    ls = main.stats
    row.update(
        loop_choice=main.why, loop_address=f"{ls.start:#06x}-{ls.end:#06x}", loop_instructions=ls.instructions,
        hgmma=ls.hgmma, hmma=ls.hmma, hgmma_tf32=ls.hgmma_tf32, hmma_tf32=ls.hmma_tf32, hgmma_shapes=ls.hgmma_shapes,
        loads=_loads(ls), utmaldg=ls.utmaldg, ldgsts=ls.ldgsts, ldg=ls.ldg, bar=ls.bar, fmul=ls.fmul, ffma=ls.ffma,
        mufu=ls.mufu,
    )  # fmt: skip
    if spec.loop_items:
        row["loop_items"] = spec.loop_items
        row["instr_per_item_per_warp"] = round(ls.instructions / spec.loop_items, 2)
    return row


def kernel_report(
    specs: list[KernelSpec],
    arch: int,
    dtype: torch.dtype,
    head_dim: int,
    causal: bool,
    progress: Callable[[str], None] = lambda line: None,
) -> list[dict[str, object]]:
    """:func:`compile_row` of every spec in order, with a line to ``progress`` before and after each."""
    rows = []
    for i, spec in enumerate(specs, 1):
        progress(f"[{i}/{len(specs)}] {spec.kernel} {spec.config} ({spec.role}) ...")
        row = compile_row(spec, arch, dtype, head_dim, causal)
        done = f"{row['registers']} registers, {row['spill_bytes']} B spilled" if row["status"] == "ok" else "error"
        progress(f"[{i}/{len(specs)}] {spec.kernel} {spec.config}: {done} ({row['compile_s']} s)")
        rows.append(row)
    return rows


def versions(arch: int) -> dict[str, str]:
    """Triton's version and the ptxas / cuobjdump it ships (name and version), for a report header;
    raises :class:`attn_kernels.aot.ToolMissing` when one is missing."""
    import os

    ptxas, ptxas_version = aot.tool("ptxas", arch)  # ToolMissing also when Triton is not installed
    cuobjdump, cuobjdump_version = aot.tool("cuobjdump")
    import triton

    return {
        "triton": triton.__version__,
        "ptxas": f"{os.path.basename(ptxas)} {ptxas_version}",
        "cuobjdump": f"{os.path.basename(cuobjdump)} {cuobjdump_version}",
    }
