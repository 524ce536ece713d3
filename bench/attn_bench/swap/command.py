"""``attn-bench swap`` as a function: the corpus checked and recorded, then the study's runs."""

from __future__ import annotations

from typing import Any

from attn_bench.core.setup import JobExit


def swap_command(**options: Any) -> None:
    """:func:`attn_bench.task.command.train_study` of the swap presets, with the corpus's manifest
    (file lists, sizes, SHA-256) in ``metadata.json``; ``options`` as for ``train_study``."""
    from attn_bench.swap.corpus import load_corpus, manifest
    from attn_bench.swap.report import write_swap_report
    from attn_bench.swap.run import JOB, SwapResult, load_swap_presets
    from attn_bench.task.command import train_study

    try:
        corpus = manifest(load_corpus())
    except (OSError, ValueError) as exc:
        raise JobExit(f"Error: the corpus: {exc}", 2) from None
    train_study(
        kind="swap", default="swap-quick", presets=lambda v: load_swap_presets(variants=v),
        write_report=write_swap_report, extra_meta={"corpus": corpus}, job=JOB, result_cls=SwapResult, **options,
    )  # fmt: skip
