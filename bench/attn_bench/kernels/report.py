"""The files of ``attn-bench kernels``: ``kernels.csv`` (every column of
:data:`attn_kernels.static_report.COLUMNS`) and ``README.md`` (the table, how to read it, versions)."""

from __future__ import annotations

import csv
from pathlib import Path

CSV = "kernels.csv"
README = "README.md"
# (header, row key or a function of the row) of the Markdown table.
_TABLE = (
    ("kernel", "kernel"),
    ("role", "role"),
    ("config", "config"),
    ("regs", "registers"),
    ("spill B", "spill_bytes"),
    ("smem KB", lambda r: f"{int(r['shared_mem']) / 1024:.0f}" if r["status"] == "ok" else ""),
    ("HGMMA", "hgmma"),
    ("HMMA", "hmma"),
    ("TF32", lambda r: (int(r["hgmma_tf32"]) + int(r["hmma_tf32"])) if r["hgmma"] != "" else ""),
    ("loads", "loads"),
    ("instr/iter", "loop_instructions"),
    ("per iter", lambda r: f"{r['loop_items']} {r['loop_unit']}" if r["loop_items"] != "" else ""),
    ("instr/item/warp", "instr_per_item_per_warp"),
    ("BAR", "bar"),
    ("FMUL", "fmul"),
    ("FFMA", "ffma"),
    ("MUFU", "mufu"),
)

_HOW_TO_READ = """\
**How to read it.** One row per kernel launch: `role` is `shipped` for the config the launcher
picks without a tuning table (FAVOR+: the first of the configs it autotunes among) and `candidate`
for the other configs `attn-bench tune` times (`--candidates`). Registers and spill bytes (stores +
loads) come from Triton's own `ptxas -v` step, shared memory from Triton's metadata; the rest from
the SASS of the same cubin (`cuobjdump -sass`), per iteration of the kernel's main loop and per
warp. The main loop is found as a branch back to an earlier address (the body runs from its
target to the branch); of the innermost loops, the one with the most tensor-core instructions
(HGMMA = wgmma, HMMA = mma.sync; FFMA when there are none) and, of those, the fewest
instructions: the fused softmax kernels walk their tiles in a masked edge pass, the unmasked
interior pass and another masked pass, and the interior one is the steady state (`kernels.csv`
says how each was chosen in `loop_choice`). `TF32`: MMAs with TF32 operands. Loads: `TMA`
(UTMALDG), `cp.async` (LDGSTS), `sync` (LDG: synchronous global loads). `per iter`: the keys,
queries or features of the tile one iteration walks; `instr/item/warp` divides the loop's
instructions by them (the tile loops are not unrolled: their MMA counts are one tile's). `BAR`:
CTA barriers per iteration. Integer arguments are specialised on their values in the launch
named above, as Triton's launcher does (`kernels.csv`: `constexpr_ints` became constants,
`divisible_ints` got the divisibility-by-16 hint)."""


def _cell(row: dict[str, object], key) -> str:
    value = key(row) if callable(key) else row[key]
    return str(value).replace("|", "/")


def markdown_table(rows: list[dict[str, object]]) -> str:
    """The rows as a Markdown table (a compile error spans the figures' columns)."""
    lines = ["| " + " | ".join(h for h, _ in _TABLE) + " |", "|" + "---|" * len(_TABLE)]
    for r in rows:
        if r["status"] != "ok":
            cells = [_cell(r, k) for _, k in _TABLE[:3]] + [f"error: {_cell(r, 'error')}"] + [""] * (len(_TABLE) - 4)
        else:
            cells = [_cell(r, k) for _, k in _TABLE]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def command_line(options: dict[str, object]) -> str:
    """The ``attn-bench kernels`` command that makes this report."""
    parts = ["attn-bench kernels", f"--arch {options['arch']}", f"--dtype {options['dtype']}"]
    parts.append(f"--head-dim {options['head_dim']}")
    if options.get("causal"):
        parts.append("--causal")
    if options.get("candidates"):
        parts.append("--candidates")
    if options.get("kernels"):
        parts.append(f"--kernels {options['kernels']}")
    return " ".join(parts)


def write_report(
    rows: list[dict[str, object]],
    out: Path,
    *,
    options: dict[str, object],
    versions: dict[str, str],
    notes: list[str],
) -> None:
    """Write ``out/kernels.csv`` and ``out/README.md`` (``out`` is created)."""
    from attn_kernels.launch import LaunchSample
    from attn_kernels.static_report import COLUMNS

    out.mkdir(parents=True, exist_ok=True)
    with open(out / CSV, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    s = LaunchSample()
    form = "causal" if options.get("causal") else "non-causal"
    lines = [
        f"# Static kernel report: {options['arch']}, {options['dtype']}, head dim {options['head_dim']}, {form}",
        "",
        f"`{command_line(options)}`: compiled ahead of time, no GPU involved. Triton {versions['triton']}, "
        f"{versions['ptxas']}, {versions['cuobjdump']}.",
        "",
        f"The launch the kernels are specialised for: batch {s.batch}, {s.heads} query heads over {s.kv_heads} "
        f"key/value heads, N = {s.seq_len} (contiguous tensors, full attention, no global tokens or padding), "
        f"{s.features} random features (FAVOR+), decoding steps of {s.new_tokens} token(s) after {s.seq_len} cached, "
        f"a GPU of {s.sms} SMs where the host sizes its grid to it.",
        "",
        markdown_table(rows),
        "",
        _HOW_TO_READ,
    ]
    if notes:
        lines += ["", "**Left out.** " + "; ".join(notes) + "."]
    (out / README).write_text("\n".join(lines) + "\n")
