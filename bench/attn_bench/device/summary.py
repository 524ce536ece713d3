"""device-check's SUMMARY.md: the pytest counts and failures read from the logs, the status
counts of the sweep and verify files, and the kernel table against the card's ceilings."""

from __future__ import annotations

import math
import re
from pathlib import Path

# ---------------------------------------------------------------------------------------------
# Reading the steps' output
# ---------------------------------------------------------------------------------------------

_PYTEST_LINE = re.compile(r"\b(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")

_PYTEST_FINAL = re.compile(r"=+ (.*\d+ (?:passed|failed|error|errors|skipped|deselected).*) in [\d.]+s")


def pytest_counts(log: str) -> dict[str, int]:
    """Outcome counts from a ``pytest -v`` log: the final summary line, or (for a run stopped by
    its time box) the per-test lines."""
    final = _PYTEST_FINAL.findall(log)
    if final:
        counts = {}
        for part in final[-1].split(","):
            m = re.match(r"\s*(\d+) (\w+)", part)
            if m:
                counts[{"errors": "error"}.get(m.group(2), m.group(2))] = int(m.group(1))
        return counts
    counts = {}
    for line in log.splitlines():
        if "::" not in line:
            continue
        m = _PYTEST_LINE.search(line)
        if m:
            key = m.group(1).lower()
            counts[key] = counts.get(key, 0) + 1
    if counts:
        counts["unfinished"] = 1
    return counts


def pytest_failures(log: str) -> list[str]:
    """The ``FAILED nodeid - message`` / ``ERROR ...`` lines of pytest's short summary."""
    return [ln.strip() for ln in log.splitlines() if ln.startswith(("FAILED ", "ERROR "))]


def _counts_text(counts: dict[str, int]) -> str:
    fin = " (stopped by its time box)" if counts.pop("unfinished", None) else ""
    return ", ".join(f"{n} {s}" for s, n in counts.items()) + fin


def _status_counts(path: Path) -> dict[str, int]:
    """Rows per ``status`` of a results or verify CSV ({} when it does not exist)."""
    if not path.exists():
        return {}
    import pandas as pd

    df = pd.read_csv(path)
    return df["status"].value_counts().to_dict() if len(df) else {}


# ---------------------------------------------------------------------------------------------
# SUMMARY.md
# ---------------------------------------------------------------------------------------------

_LINE_BACKENDS = ("triton", "sdpa", "flex", "torch")


def _ms(x) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}"


def kernel_table(df, matmul_tflops: float | None):
    """Per variant, setting and N: triton vs sdpa vs flex (and torch) time, the Triton kernel's
    TFLOP/s, its fraction of the measured matmul ceiling, and every line's numerics gate.

    A row that did not run shows its status in place of the time (``WRONG``, ``ERROR``...), and
    its error in the gate column."""
    import pandas as pd

    from attn_bench.sweep.analysis import in_n_order, line_label, option_cols, setting_label

    rows = []
    options = option_cols(df)
    keys = ["variant", *options, "dtype", "heads", "kv_heads", "head_dim", "causal", "pass", "seq_len"]
    df = df.copy()
    for c in options:
        df[c] = pd.to_numeric(df[c], errors="coerce").fillna(-1).astype(int)
    df = in_n_order(df, ["variant", *options, "dtype", "heads", "kv_heads", "head_dim"])
    for _, g in df.groupby(keys, dropna=False, sort=False):
        first = g.iloc[0]
        row = {
            "variant": line_label(first).rsplit(" / ", 1)[0],
            "setting": setting_label(first).replace(f"{first['device']}-", ""),
            "pass": first["pass"],
            "N": int(first["seq_len"]),
        }
        gates = []
        by = {r["backend"]: r for _, r in g.iterrows()}
        for b in _LINE_BACKENDS:
            r = by.get(b)
            if r is None:
                row[f"{b} ms"] = ""
                continue
            if r["status"] == "ok":
                row[f"{b} ms"] = _ms(r["time_ms"])
            else:
                row[f"{b} ms"] = str(r["status"]).upper()
            if r["status"] in ("ok", "wrong"):
                gates.append(f"{b} {'ok' if r['status'] == 'ok' else 'FAIL'}")
            elif r["status"] not in ("skipped",):
                err = str(r.get("error") or "")[:90]
                gates.append(f"{b} {str(r['status']).upper()}: {err}")
        t = by.get("triton")
        tf = t["tflops"] if t is not None and t["status"] == "ok" else math.nan
        row["triton TFLOP/s"] = _ms(tf)
        row["% of matmul"] = f"{100 * tf / matmul_tflops:.0f}%" if matmul_tflops and not math.isnan(tf) else ""
        s = by.get("sdpa")
        if t is not None and s is not None and t["status"] == "ok" and s["status"] == "ok":
            row["sdpa/triton"] = f"{s['time_ms'] / t['time_ms']:.2f}x"
        else:
            row["sdpa/triton"] = ""
        row["gate"] = "; ".join(gates)
        rows.append(row)
    return pd.DataFrame(rows)


def tuning_comparison(table) -> list[dict]:
    """Old and new softmax configs per tuned shape of the default plan, from one tuning run: the
    new heuristic default, the earlier default (an sm_80 card's config, which every card ran before
    the sm_90 configs) and the config kept, each with its time (ms) in that run. ``table`` is an
    :class:`attn_kernels.tuning.Table`."""
    from attn_bench.device.tune import plan
    from attn_kernels import flash_configs

    rows = []
    for key in plan(kernels=["flash_fwd", "flash_bwd"]):
        e = table.entry(key.kernel, key.table_key)
        if not e or not isinstance(e.get("timings"), dict):
            continue
        earlier = flash_configs.earlier_config(key.shape(), key.kernel == "flash_bwd").name
        times = e["timings"]
        rows.append(
            {"kernel": key.kernel, "shape": key.table_key, "new default": e.get("default"),
             "ms": times.get(e.get("default")), "earlier default": earlier, "earlier ms": times.get(earlier),
             "kept": e.get("name"), "kept ms": e.get("ms")}
        )  # fmt: skip
    return rows


def summary_markdown(record: dict, sweep_dir: Path, verify_csv: Path, tests_log: Path) -> str:
    """The one-page summary: kernel table, steps, environment, numerics, what did not run."""
    import pandas as pd

    from attn_bench.sweep.report import md_table

    env = record.get("environment", {})
    steps = record.get("steps", [])
    md = [f"# device-check: {env.get('gpu') or 'no GPU (dry run)'}\n"]
    md.append(
        f"Started {record.get('started')}; {record.get('elapsed_s')} s of a {record.get('budget_s'):g} s budget. "
        f"torch {env.get('torch')}, Triton {env.get('triton')}, CUDA {env.get('cuda_build')}, "
        f"driver {env.get('driver', '-')}, commit {env.get('git_commit', '?')}.\n"
    )
    ceil = env.get("matmul_bf16_tflops")
    if ceil:
        md.append(
            f"Measured ceilings: **{ceil} TFLOP/s** bf16 matmul, **{env.get('copy_gb_s')} GB/s** device copy "
            f"(read + write).\n"
        )

    results = sweep_dir / "results.csv"
    df = pd.read_csv(results) if results.exists() else None
    md.append("\n## Triton vs SDPA vs FlexAttention\n")
    md.append(
        "Median ms per call. `% of matmul`: the Triton kernel's TFLOP/s over the measured bf16 matmul rate. "
        "A line that did not run shows its status instead of a time, and its error under `gate`.\n"
    )
    if df is not None:
        ran = df[df["status"] != "skipped"]
        md.append(md_table(kernel_table(ran, ceil)) if len(ran) else "_(no row ran)_\n")
        skipped = df[df["status"] == "skipped"]
        if len(skipped):
            md.append(f"\n{len(skipped)} of {len(df)} configs were not reached within the sweep's budget.\n")
    else:
        sweep_step = next((s for s in steps if s["name"] == "sweep"), None)
        md.append(f"_(no sweep: {sweep_step['detail'] if sweep_step else 'not run'})_\n")

    md.append("\n## Steps\n")
    view = pd.DataFrame(
        [
            {
                "step": s["name"],
                "status": s["status"],
                "seconds": f"{s['seconds']:.0f}",
                "time box": "" if s["box_s"] is None else f"{s['box_s']:.0f}",
                "detail": s["detail"],
            }
            for s in steps
        ]
    )
    md.append(md_table(view))

    tuned = record.get("tuning") or {}
    if tuned:
        md.append("\n## Tuning table\n")
        used = "none used"
        if tuned.get("table_used"):
            used = f"used, {tuned.get('entries', 0)} entries ({tuned.get('file')})"
        md.append(
            f"Table before: {tuned.get('table_before') or '-'}; tuning {tuned.get('status')}: {tuned.get('detail')}. "
            f"Launches: {used}.\n"
        )
        if tuned.get("comparison"):
            md.append("Softmax configs per shape, old and new, timed in one tuning run (ms; the kept one launches):\n")
            md.append(md_table(pd.DataFrame(tuned["comparison"])))
        impls = tuned.get("favor_impl") or {}
        if impls:
            md.append(
                "\nFAVOR+ implementations, forward + backward at N=16k, H=16 (ms; the table keeps the chosen one):\n"
            )
            names = sorted({name for e in impls.values() for name in e["timings"]})
            rows = [
                {"shape": key, **{name: f"{e['timings'][name]:.3g}" if name in e["timings"] else "-" for name in names}}
                | {"chosen": e["chosen"] or "-"}
                for key, e in impls.items()
            ]
            md.append(md_table(pd.DataFrame(rows)))

    cp_readme = sweep_dir.parent / "cp" / "README.md"
    if cp_readme.exists():
        text = cp_readme.read_text()
        part = text.split("## Targets", 1)[1].split("\n## ", 1)[0] if "## Targets" in text else ""
        md.append("\n## Context parallelism over NCCL (targets)\n")
        md.append(part.strip() + "\n" if part.strip() else "_(no targets in the cp report)_\n")

    md.append("\n## Numerics\n")
    if tests_log.exists() and tests_log.stat().st_size:
        fails = pytest_failures(tests_log.read_text(errors="replace"))
        md.append(f"GPU tests (`pytest -m gpu`): {len(fails)} failure(s).\n")
        for line in fails[:20]:
            md.append(f"- `{line[:220]}`")
        md.append("")
    if verify_csv.exists():
        v = pd.read_csv(verify_csv)
        if len(v):
            piv = v.pivot_table(index=["backend", "dtype"], columns="status", values="variant", aggfunc="count")
            md.append("`attn-bench verify` on CUDA (checks by status):\n")
            md.append(md_table(piv.fillna(0).astype(int).reset_index()))
            bad = v[v["status"].isin(["wrong", "error"])]
            for _, r in bad.head(20).iterrows():
                md.append(
                    f"- {r['status'].upper()} {r['variant']}({r['options'] if isinstance(r['options'], str) else ''}) "
                    f"{r['backend']} {r['dtype']} {r['shape']}: {str(r['message'])[:160]}"
                )
            md.append("")

    if df is not None:
        from attn_bench.sweep.report import failed_rows_table

        md.append("\n## Sweep rows that failed\n")
        md.append(failed_rows_table(df, skip=("ok", "skipped"), width=160))
        comp = df[df["compile_s"].notna() & (df["status"] == "ok")]
        if len(comp):
            c = comp.groupby("backend")["compile_s"].agg(["count", "median", "max", "sum"]).reset_index()
            md.append("\nFirst-call time (compilation, autotuning) by backend, s:\n")
            md.append(md_table(c))

    if env.get("sdpa_backends"):
        md.append("\n## Environment\n")
        md.append(
            f"{env.get('gpu')} (sm_{str(env.get('capability', '')).replace('.', '')}, {env.get('sm_count')} SMs, "
            f"{env.get('memory_gib')} GiB, L2 {env.get('l2_mib')} MiB); {env.get('cpu_count')} CPU cores "
            f"({env.get('cpu_model')}); Python {env.get('python')}.\n"
        )
        md.append(
            "SDPA backends (each alone, bf16, causal, with backward): "
            + ", ".join(f"{k} {v}" for k, v in env["sdpa_backends"].items())
            + ".\n"
        )
    md.append(f"\nFiles: {', '.join(record.get('files', []))}.\n")
    return "\n".join(md)
