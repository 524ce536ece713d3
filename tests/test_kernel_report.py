"""The static kernel report: the SASS reader on hand-written listings, and ``attn-bench kernels``
(one kernel compiled, checked against ``ptxas -v`` and ``cuobjdump`` run here directly; bad
options; missing tools; a kernel that does not compile)."""

from __future__ import annotations

import csv
import inspect
import re
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from attn_bench.cli import app
from attn_kernels import sass
from attn_kernels.launch import LaunchSample

aot = pytest.importorskip("attn_kernels.aot")
pytest.importorskip("triton.backends.nvidia.compiler")

runner = CliRunner()


def _text(res) -> str:
    return " ".join(res.output.replace("│", " ").split())


# -- SASS ---------------------------------------------------------------------------------------------


def _sass(*lines: tuple[int, str]) -> str:
    head = "\n\tcode for sm_90a\n\t\tFunction : k\n"
    body = [
        f"        /*{a:04x}*/                   {t} ;      /* 0x000fe20000000f00 */\n{' ' * 103}/* 0x0 */"
        for a, t in lines
    ]
    return head + "\n".join(body) + "\n"


SNIPPET = _sass(
    (0x000, "LDC R1, c[0x0][0x28]"),
    (0x010, "@P3 BRA 0x150"),  # forward: not a loop
    # masked edge pass: the same MMAs plus mask arithmetic
    (0x020, "HGMMA.64x32x16.F32.BF16 R88, gdesc[UR8], RZ, !UPT"),
    (0x030, "ISETP.GE.AND P1, PT, R2, R3, PT"),
    (0x040, "FSEL R4, R4, -INF , P1"),
    (0x050, "MUFU.EX2 R5, R4"),
    (0x060, "FMUL R6, R5, R7"),
    (0x070, "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24"),
    (0x080, "BAR.SYNC.DEFER_BLOCKING 0x0"),
    (0x090, "@P0 BRA 0x20"),
    # interior pass
    (0x0A0, "LDGSTS.E.BYPASS.128 [R10], desc[UR6][R12.64]"),
    (0x0B0, "HGMMA.64x32x16.F32.BF16 R88, gdesc[UR8], RZ, !UPT"),
    (0x0C0, "NOP"),
    (0x0D0, "FFMA R6, R5, R7, R8"),
    (0x0E0, "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24"),
    (0x0F0, "@!P2 BRA 0xa0"),
    # an outer loop around an inner one, no MMA
    (0x100, "LDG.E R1, desc[UR4][R2.64]"),
    (0x110, "FFMA R6, R5, R7, R8"),
    (0x120, "@P1 BRA 0x110"),
    (0x130, "UTMALDG.2D [UR8], [UR4]"),
    (0x140, "BRA 0x100"),
    (0x150, "EXIT"),
    (0x160, "BRA 0x160"),  # the trap after EXIT
    (0x170, "NOP"),
)


def test_sass_loops_and_main_loop() -> None:
    ins = sass.parse(SNIPPET)
    assert len(ins) == 24 and ins[1].predicate == "@P3" and ins[2].opcode == "HGMMA.64x32x16.F32.BF16"
    loops = sass.loops(ins)
    assert [(lp.start, lp.end) for lp in loops] == [(0x20, 0x90), (0xA0, 0xF0), (0x100, 0x140), (0x110, 0x120)]
    assert [lp.start for lp in sass.innermost(loops)] == [0x20, 0xA0, 0x110]
    main = sass.main_loop(ins)
    assert main is not None and main.loops == 4 and main.candidates == 3
    s = main.stats
    assert (s.start, s.end, s.instructions) == (0xA0, 0xF0, 5)  # the NOP is not counted
    assert (s.hgmma, s.hmma, s.hgmma_tf32, s.ldgsts, s.ldg, s.utmaldg, s.bar) == (2, 0, 0, 1, 0, 0, 0)
    assert (s.fmul, s.ffma, s.mufu) == (0, 1, 0)
    assert s.hgmma_shapes == "64x32x16 x1, 64x128x16 x1"
    assert "shortest of 2" in main.why
    masked = sass.loop_stats(loops[0])
    assert (masked.instructions, masked.fmul, masked.mufu, masked.bar, masked.opcodes["ISETP"]) == (8, 1, 1, 1, 1)
    outer = sass.loop_stats(loops[2])
    assert (outer.ldg, outer.utmaldg, outer.ffma) == (1, 1, 1)


def test_sass_main_loop_without_mma_and_without_loops() -> None:
    no_mma = sass.parse(SNIPPET.split("/*0100*/")[0].rsplit("\n", 1)[0])  # up to the interior pass only
    assert sass.main_loop(no_mma).stats.start == 0xA0
    plain = _sass((0x0, "FFMA R1, R2, R3, R4"), (0x10, "@P0 BRA 0x0"), (0x20, "FFMA R1, R2, R3, R4"),
                  (0x30, "FFMA R1, R2, R3, R4"), (0x40, "@P1 BRA 0x20"), (0x50, "EXIT"))  # fmt: skip
    main = sass.main_loop(sass.parse(plain))
    assert main.stats.start == 0x20 and main.stats.ffma == 2 and "no MMA; 2 FFMA" in main.why
    assert sass.main_loop(sass.parse(_sass((0x0, "MOV R1, R2"), (0x10, "EXIT")))) is None
    tf32 = sass.parse(_sass((0x0, "HGMMA.64x64x8.F32.TF32 R24, gdesc[UR4], R24"),
                            (0x10, "HMMA.1684.F32.TF32 R4, R8, R12, R4"),
                            (0x20, "HMMA.16816.F32.BF16 R4, R8, R12, R4"), (0x30, "@P0 BRA 0x0")))  # fmt: skip
    s = sass.main_loop(tf32).stats
    assert (s.hgmma, s.hmma, s.hgmma_tf32, s.hmma_tf32, s.hgmma_shapes) == (1, 2, 1, 1, "64x64x8 x1")


# -- attn-bench kernels -------------------------------------------------------------------------------


def _ptxas_direct(ptx: str, tmp_path: Path) -> tuple[int, int]:
    """Registers and spill bytes of ``ptxas -v`` run here on the PTX, with the options Triton's
    own ptxas step passes (``-lineinfo``; newer releases add ``--regAllocOptLevel=2``)."""
    from triton.backends.nvidia.compiler import CUDABackend

    ptxas, _ = aot.tool("ptxas", 90)
    extra = ["--regAllocOptLevel=2"] if "regAllocOptLevel=2" in inspect.getsource(CUDABackend.make_cubin) else []
    (tmp_path / "k.ptx").write_text(ptx)
    cmd = [ptxas, "-lineinfo", "-v", *extra, "--gpu-name=sm_90a", str(tmp_path / "k.ptx"), "-o", str(tmp_path / "k.o")]
    log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    stores, loads = map(int, re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log).groups())
    return regs, stores + loads


def test_cli_on_one_kernel_agrees_with_ptxas_and_cuobjdump(tmp_path: Path) -> None:
    from attn_kernels import static_report

    out = tmp_path / "report"
    res = runner.invoke(app, ["kernels", "--kernels", "decode_split", "--head-dim", "64", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "[1/1] decode_split" in (res.stderr if hasattr(res, "stderr") else res.output)
    with open(out / "kernels.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert row["status"] == "ok" and row["kernel"] == "decode_split" and row["arch"] == "sm_90"
    assert "| decode_split | shipped |" in (out / "README.md").read_text()

    (spec,) = static_report.kernel_specs(90, torch.bfloat16, 64, kernels=["decode_split"])[0]
    cfg = spec.config
    stats = aot.compile_for(spec.fn, spec.signature, spec.constexprs, arch=90, num_warps=cfg.num_warps,
                            num_stages=cfg.num_stages)  # fmt: skip
    regs, spills = _ptxas_direct(stats.ptx, tmp_path)
    assert (int(row["registers"]), int(row["spill_bytes"])) == (regs, spills)
    (tmp_path / "k.cubin").write_bytes(stats.cubin)
    cuobjdump, _ = aot.tool("cuobjdump")
    usage = subprocess.run([cuobjdump, "-res-usage", str(tmp_path / "k.cubin")], capture_output=True, text=True)
    assert int(re.search(r"REG:(\d+)", usage.stdout).group(1)) == regs
    # the main loop's figures, counted here on the listing between the loop's addresses
    listing = subprocess.run([cuobjdump, "-sass", str(tmp_path / "k.cubin")], capture_output=True, text=True).stdout
    lo, hi = (int(x, 16) for x in row["loop_address"].split("-"))
    body = [m.group(2) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][\w.]*)", listing)
            if lo <= int(m.group(1), 16) <= hi]  # fmt: skip
    ops = [op.split(".")[0] for op in body if op != "NOP"]
    assert int(row["loop_instructions"]) == len(ops) > 0
    assert int(row["hmma"]) == ops.count("HMMA") > 0 and int(row["hgmma"]) == ops.count("HGMMA")
    assert int(row["bar"]) == ops.count("BAR") and int(row["ldgsts"]) == ops.count("LDGSTS")
    assert float(row["instr_per_item_per_warp"]) == pytest.approx(len(ops) / int(row["block_n"]), abs=0.01)
    assert "T" in row["constexpr_ints"].split() and "PERIOD" in row["constexpr_ints"].split()


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--arch", "sm_75"], "--arch"),
        (["--dtype", "float64"], "--dtype"),
        (["--head-dim", "0"], "--head-dim"),
        (["--head-dim", "300"], "--head-dim"),
        (["--head-dim", "x"], "--head-dim"),
        (["--kernels", "nope"], "--kernels"),
        (["--kernels", " , "], "--kernels"),
    ],
)
def test_bad_options(tmp_path: Path, args: list[str], option: str) -> None:
    res = runner.invoke(app, ["kernels", "--out", str(tmp_path / "r"), *args])
    assert res.exit_code == 2, res.output
    assert option in res.output and "Traceback" not in res.output, res.output
    assert not (tmp_path / "r").exists()


def test_out_holding_other_files_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine\n")
    res = runner.invoke(app, ["kernels", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "--out" in res.output and "notes.txt" in _text(res), res.output


def test_missing_tools_give_a_clear_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from triton import knobs

    for name in ("ptxas", "ptxas_blackwell", "cuobjdump"):
        descriptor = next(vars(c)[name] for c in type(knobs.nvidia).__mro__ if name in vars(c))
        monkeypatch.setattr(descriptor, "default_path", str(tmp_path / "missing" / name))
        monkeypatch.delenv(descriptor.key, raising=False)
    with pytest.raises(aot.ToolMissing, match=r"cuobjdump not found.*ships with the Triton wheel"):
        aot.tool("cuobjdump")
    with pytest.raises(aot.ToolMissing, match="ptxas not found"):
        aot.tool("ptxas", 90)
    res = runner.invoke(app, ["kernels", "--out", str(tmp_path / "r")])
    assert res.exit_code == 2, res.output
    assert "needs Triton's NVIDIA tools" in _text(res) and "not found" in _text(res)
    assert "Traceback" not in res.output and not (tmp_path / "r").exists()


def test_a_kernel_that_does_not_compile_is_a_row() -> None:
    from attn_kernels import static_report

    (spec,) = static_report.kernel_specs(90, torch.bfloat16, 64, kernels=["flash_bwd_delta"])[0]
    broken = replace(spec, constexprs={**spec.constexprs, "BLOCK_M": 24})  # tl.arange needs a power of two
    row = static_report.compile_row(broken, 90, torch.bfloat16, 64, False)
    assert row["status"] == "error" and row["error"] and row["registers"] == ""
    assert set(row) == set(static_report.COLUMNS)


def test_library_refuses_bad_arguments() -> None:
    from attn_kernels import static_report

    for kwargs, name in [
        (dict(arch=75), "arch"),
        (dict(dtype=torch.float64), "dtype"),
        (dict(head_dim=512), "head_dim"),
        (dict(kernels=["flash_nope"]), "kernels"),
    ]:
        args = {"arch": 90, "dtype": torch.bfloat16, "head_dim": 64, **kwargs}
        with pytest.raises(ValueError, match=name):
            static_report.kernel_specs(args.pop("arch"), args.pop("dtype"), args.pop("head_dim"), **args)
    with pytest.raises(ValueError, match="kv_heads"):
        LaunchSample(heads=16, kv_heads=3)
    with pytest.raises(ValueError, match="seq_len"):
        LaunchSample(seq_len=0)
    specs, notes = static_report.kernel_specs(90, torch.bfloat16, 256, kernels=["favor", "decode"])
    assert {s.kernel for s in specs} == {"decode_split", "decode_combine"} and len(notes) == 2
