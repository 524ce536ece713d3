"""The report of a sweep directory: PNG plots and a Markdown page (``README.md``)."""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

import pandas as pd

from attn_bench.sweep.analysis import (
    SETTING,
    compare_runs,
    crossovers,
    exponents,
    line_cols,
    line_label,
    load_results,
    noisy_mask,
    ok_rows,
    setting_label,
    speedups,
    without_copies,
)
from attn_bench.sweep.markdown import _cell, md_table
from attn_bench.sweep.noise import noise_paragraph, noise_warning, noisy_table
from attn_bench.sweep.plots import accuracy_plots, sweep_plots
from attn_bench.sweep.run import not_run

PAGE = "README.md"


def _mib(x) -> float:
    return float(x) / 2**20 if pd.notna(x) else math.nan


def failed_rows_table(df: pd.DataFrame, skip: tuple[str, ...] = ("ok",), width: int = 140) -> str:
    """Markdown table of the rows whose status is not in ``skip``, with their (cut) error."""
    bad = df[~df["status"].isin(skip)]
    if bad.empty:
        return "_(none)_\n"
    view = bad.assign(line=bad.apply(line_label, axis=1))[["line", "pass", "seq_len", "status", "error"]]
    return md_table(view.assign(error=view["error"].astype("string").fillna("").str.slice(0, width)))


def not_run_rows(configs: list) -> pd.DataFrame:
    """Rows (status ``not run``) for configs of the plan that have no row: the run stopped first."""
    rows = [{**c.to_row(), "status": "not run", "error": "the run stopped before it"} for c in configs]
    return pd.DataFrame(rows)


def unfinished_notice(directory: Path, meta: dict, missing: int, planned: int | None, ran: int) -> str:
    """A note for the top of the page when the run did not measure its whole plan (interrupted,
    stopped by an error, or killed while ``running``), with the two ways on; "" when it did."""
    status = meta.get("status", "?")
    if planned is None or (status == "complete" and not missing):
        return ""
    missing = missing or max(0, planned - ran)
    if not missing:
        return ""
    how = {
        "interrupted": "**Interrupted**",
        "failed": f"**Stopped by an error** ({meta.get('error', '?')})",
        "running": "**Not finished** (metadata.json still says `running`: the run goes on, or it was killed)",
    }.get(status, f"**Incomplete** (status `{status}`)")
    where = shlex.quote(str(directory))
    return (
        f"> {how}: {ran} of {planned} configs have a row; {missing} did not run (listed under "
        f"[Rows that did not run](#rows-that-did-not-run)). Continue the run with "
        f"`attn-bench sweep --out {where} --resume`; write this page again with `attn-bench report {where}`.\n"
    )


def time_tables(df: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """Median time (ms) per line x N, one table per setting and pass; a noisy row's cell is
    marked ``*``."""
    ok = without_copies(ok_rows(df))
    out = []
    for _, s in ok.groupby([*SETTING, "pass"], dropna=False, sort=False):
        first = s.iloc[0]
        cell = [_cell(t) + ("*" if noisy else "") for t, noisy in zip(s["time_ms"], noisy_mask(s), strict=True)]
        s = s.assign(line=s.apply(line_label, axis=1), cell=cell)
        piv = s.pivot_table(index="line", columns="seq_len", values="cell", aggfunc="first", sort=False)
        piv = piv[sorted(piv.columns, key=int)]  # numeric order of N, whatever order the rows ran in
        piv.columns = [f"N={c}" for c in piv.columns]
        out.append((f"{setting_label(first)}, {first['pass']}", piv.reset_index()))
    return out


def decode_table(df: pd.DataFrame) -> pd.DataFrame:
    """Decode rows per line and context: per-token time, tokens/s, held memory, prefill, and the
    line's fitted exponent of per-token time in the context length (noisy rows left out)."""
    from attn_bench.sweep.analysis import fit_exponent

    ok = without_copies(ok_rows(df))
    ok = ok[ok["pass"] == "decode"]
    rows = []
    for _, g in ok.groupby([*SETTING, *line_cols(df)], dropna=False, sort=False):
        g = g.sort_values("seq_len")
        quiet = g[~noisy_mask(g)]
        k = fit_exponent(quiet["seq_len"], quiet["time_ms"])
        trend = "" if math.isnan(k) else ("flat" if k < 0.25 else f"grows ~N^{k:.2f}")
        for _, r in g.iterrows():
            rows.append(
                {
                    "setting": setting_label(r),
                    "line": line_label(r),
                    "context N": int(r["seq_len"]),
                    "ms / token": r["time_ms"],
                    "p90 ms": r["time_ms_p90"],
                    "tokens/s": r.get("tokens_per_s"),
                    "state MiB": r["peak_mem_bytes"] / 2**20,
                    "prefill ms": r.get("prefill_ms"),
                    "per-token time": trend,
                }
            )
    return pd.DataFrame(rows)


def headline(df: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """Per setting and pass, at the largest N each line reached: time, memory, speed-up."""
    ok = without_copies(ok_rows(df))
    sp = speedups(df, baseline)
    rows = []
    line = [*SETTING, *line_cols(df)]
    for _, g in ok.groupby(line, dropna=False, sort=False):
        last = g.sort_values("seq_len").iloc[-1]
        match = sp[(sp[[*line, "seq_len"]] == last[[*line, "seq_len"]]).all(axis=1)] if len(sp) else sp
        rows.append(
            {
                "setting": setting_label(last),
                "pass": last["pass"],
                "line": line_label(last),
                "N": int(last["seq_len"]),
                "time ms": last["time_ms"],
                "p10..p90 ms": f"{last['time_ms_p10']:.3g}..{last['time_ms_p90']:.3g}",
                "noisy": "noisy" if str(last.get("noisy", "")).lower() in ("true", "1") else "",
                "peak MiB": _mib(last["peak_mem_bytes"]),
                "GFLOP/s": last["tflops"] * 1e3,
                f"speed-up vs {baseline}": match["speedup"].iloc[0] if len(match) else math.nan,
                "max_err": last["max_err"],
            }
        )
    out = pd.DataFrame(rows)
    return out.drop(columns="noisy") if len(out) and not out["noisy"].any() else out


def write_report(
    directory: Path | str, baseline: str = "sdpa", compare: Path | str | None = None, threshold: float = 0.10
) -> Path:
    """Write the plots and ``README.md`` into ``directory``; returns the page's path."""
    d = Path(directory)
    df = load_results(d)
    meta = {}
    if (d / "metadata.json").exists():
        meta = json.loads((d / "metadata.json").read_text())
    files = sweep_plots(df, d, baseline)
    acc = None
    if (d / "performer_accuracy.csv").exists():
        acc = pd.read_csv(d / "performer_accuracy.csv")
        files["accuracy"] = accuracy_plots(acc, d)

    md: list[str] = []
    name = meta.get("preset") or d.name
    md.append(f"# Attention benchmark: {name}\n")
    missing, planned = not_run(d, meta)
    for notice in (unfinished_notice(d, meta, len(missing), planned, len(df)), noise_warning(df, meta, d)):
        if notice:
            md.append(notice)
    machine = meta.get("cpu_model", "?")
    if meta.get("gpu"):
        machine = f"{meta['gpu']} (host CPU {machine})"
    md.append(
        f"Machine: **{machine}**, {meta.get('cpu_count', '?')} logical cores "
        f"({meta.get('torch_threads', '?')} torch threads). "
        f"Python {meta.get('python', '?')}, torch {meta.get('torch', '?')}, triton {meta.get('triton', '?')}, "
        f"commit `{meta.get('git_commit', '?')}`.\n"
    )
    md.append(
        f"Command: `{meta.get('command', '?')}`; started {meta.get('started', '?')}, "
        f"finished {meta.get('finished', '?')} ({meta.get('status', '?')}).\n"
    )
    md.append(
        f"Peak memory method: {meta.get('memory_method', '?')}. Memory is what one call allocates "
        "beyond its inputs (outputs and gradients included).\n"
    )
    ceil = meta.get("ceilings")
    if ceil:
        gemm = ", ".join(f"{v:g} GFLOP/s {k}" for k, v in ceil.get("gemm_gflops", {}).items())
        md.append(
            f"Measured ceilings: matmul {gemm}; copy {ceil.get('copy_gb_s', '?')} GB/s ({ceil.get('method', '?')}). "
            "A row whose rate exceeds the matmul ceiling is refused as an error, never published.\n"
        )
    md.append(
        "Times are medians over repeated calls after a warm-up (`torch.utils.benchmark` on CPU, "
        "`triton.testing.do_bench` on CUDA); FLOPs are analytic and mask-aware (only visible query-key "
        "pairs; backward counted as 2.5x forward for softmax attention, 2x for Performer). Every row was "
        "checked against the float64 reference before it was timed. Raw rows: [results.csv](results.csv), "
        "[metadata.json](metadata.json).\n"
    )

    md.append(noise_paragraph(df, meta))
    counts = df["status"].value_counts().to_dict()
    noisy = int(noisy_mask(ok_rows(df)).sum())
    md.append(
        "Rows by status: "
        + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
        + (f" ({noisy} of the ok rows noisy)" if noisy else "")
        + (f"; {len(missing)} configs of the plan not run" if missing else "")
        + ".\n"
    )

    md.append(f"\n## Headline (largest N of each line; speed-up against `{baseline}`)\n")
    md.append(md_table(headline(df, baseline)))

    dec = decode_table(df)
    if len(dec):
        md.append("\n## Decoding: the cost of one generated token against the context length\n")
        md.append(
            "`decode` rows: one token at a time from the variant's incremental state after a prompt of N "
            "tokens (`sdpa`: one query against the whole cache). Per-token time (median, p90), tokens/s "
            "(batch / time), the memory the decoder holds (cache or state) and the prefill time. "
            "*Per-token time* says where the cost stops growing: the fitted exponent of time in N over "
            "the line's lengths (about 1 for a cache read in full, about 0 for a fixed-size state).\n\n"
        )
        md.append(md_table(dec))
    md.append("\n## Scaling exponents (time and memory ~ N^k, least-squares in log-log)\n")
    md.append(
        "`top 3`: fitted over the three largest lengths, where fixed overheads matter least. "
        "Expect about 2 for full attention's time, 1 for the sliding window and the Performer.\n\n"
    )
    md.append(md_table(exponents(df)))

    md.append("\n## Crossover: where the efficient variants start to pay off\n")
    md.append(
        "Smallest N at which each line is faster than full attention (log-log interpolation between "
        "the measured lengths; the efficient line must stay faster at every larger length).\n\n"
    )
    md.append(md_table(crossovers(df)))

    md.append("\n## Plots\n")
    for kind, title in (
        ("time", "Time vs N"),
        ("memory", "Peak memory vs N"),
        ("speedup", f"Speed-up vs {baseline}"),
        ("flops", "Achieved FLOP/s vs N"),
    ):
        for f in files.get(kind, []):
            md.append(f"### {title}: {f.stem.split('_', 3)[-1]}\n\n![{title}]({f.name})\n")

    if acc is not None and not acc.empty:
        md.append("\n## Performer accuracy against exact softmax attention\n")
        feat = acc[acc["study"] == "features"]
        s0 = f"s={feat['sharpness'].iloc[0]:g}" if len(feat) else ""
        md.append(
            "Output error `rms(out - exact) / rms(v)` in float64 (the approximation alone, no rounding), mean "
            f"over {acc['seed'].nunique()} random draws (band: min..max), N={int(acc['seq_len'].iloc[0])}, "
            f"D={int(acc['head_dim'].iloc[0])}. Sharpness `s` is the standard deviation of the attention logits "
            f"(q, k entries ~ N(0, s)); the error-vs-features study uses {s0}. The FAVOR+ estimator's variance "
            "grows like exp(|q'|^2 + |k'|^2), so as the softmax sharpens the error explodes: that is where "
            "positive random features break down.\n\n"
        )
        for f in files.get("accuracy", []):
            md.append(f"![{f.stem}]({f.name})\n")
        for study, col in (("features", "num_features"), ("sharpness", "sharpness")):
            sub = acc[acc["study"] == study]
            if sub.empty:
                continue
            piv = sub.pivot_table(index=col, columns="ortho", values="rel_err", aggfunc="mean").reset_index()
            piv.columns = [col, *[("orthogonal" if str(c) == "True" else "i.i.d.") for c in piv.columns[1:]]]
            md.append(f"\n{md_table(piv)}")
        approx = df[df["approx_err"].notna()]
        for variant, g in approx.groupby("variant", sort=False):
            md.append(
                f"\nIn the sweep itself, `approx_err` (max abs error against the exact attention it approximates) "
                f"of the {variant} rows ranges from {g['approx_err'].min():.3g} to {g['approx_err'].max():.3g}.\n"
            )

    noisy_rows = noisy_table(df)
    if len(noisy_rows):
        md.append("\n## Noisy rows (left out of the exponents and crossovers)\n")
        md.append(md_table(noisy_rows))

    md.append("\n## Median time (ms) by line and N\n")
    if len(noisy_rows):
        md.append("`*`: a noisy row (see above).\n")
    for title, tab in time_tables(df):
        md.append(f"\n**{title}**\n\n{md_table(tab)}")

    from attn_bench.sweep.cards import several_cards

    if several_cards(df):  # a run over a cluster of mixed cards
        from attn_bench.sweep.cards import card_plots, card_rows, cards_section, load_cards

        rows = card_rows(load_cards([d]), baseline)
        md.append("\n## Cards side by side\n")
        md.append(cards_section(rows, card_plots(rows, d, baseline), baseline))

    md.append("\n## Rows that did not run\n")
    md.append(failed_rows_table(pd.concat([df, not_run_rows(missing)], ignore_index=True) if missing else df))

    if compare is not None:
        old = load_results(compare)
        cmp = compare_runs(df, old, threshold)
        md.append(f"\n## Comparison against `{compare}`\n")
        md.append(
            f"{len(cmp)} rows in common; ratio = time here / time there. **Regression**: slower by more than "
            f"{threshold:.0%}, or a row that was ok and is not now. "
            f"{int(cmp['regression'].sum())} regression(s), {int(cmp['improvement'].sum())} improvement(s).\n\n"
        )
        if len(cmp):
            view = cmp.assign(line=cmp.apply(line_label, axis=1))
            view = view[
                [
                    "line",
                    "pass",
                    "causal",
                    "seq_len",
                    "status_old",
                    "status",
                    "time_ms_old",
                    "time_ms",
                    "ratio",
                    "regression",
                ]
            ]
            view = view.assign(regression=view["regression"].map({True: "**REGRESSION**", False: ""}))
            md.append(md_table(view.sort_values("ratio", ascending=False)))
            cmp.to_csv(d / "compare.csv", index=False)

    page = d / PAGE
    page.write_text("\n".join(md))
    return page
