"""Runs of ``attn-bench long``: a :class:`LongConfig` per (strategy, N, seed), trained and measured
through :func:`attn_bench.task.run.run_tasks` (worker pool, atomic ``results.csv``, resume).

Presets live in ``long_presets.toml``: each group is a cross product of ``strategies``,
``seq_lens`` and ``seeds`` at one ``segment_len`` (the model's training length ``L``), the
``whole`` strategy once per variant of ``variants`` (``--variants`` replaces them); other keys set
:class:`~attn_bench.task.run.TaskConfig` fields, the variants' sweep options and the generator's
``params``. The other strategies run exact attention.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import attention_variants as av
from attn_bench.core.config import RunSettings
from attn_bench.core.variants import exact_variant
from attn_bench.long.models import STRATEGIES, WHOLE
from attn_bench.task.run import (
    TaskConfig,
    TaskPreset,
    TaskResult,
    _as_list,
    _task_data,
    _variant_options,
    expand_group,
    parse_presets,
    train_config,
)

LONG_TASK = "long_majority"
JOB = "attn_bench.long.run:run_long_row"


@dataclass(frozen=True)
class LongConfig(TaskConfig):
    """A task run plus the strategy and the model's training length ``segment_len`` (``L``)."""

    strategy: str = "truncate"
    segment_len: int = 32

    def label(self) -> str:
        opt = "".join(f" {k}={v}" for k, v in self.options)
        what = f"{WHOLE} {self.variant}" if self.strategy == WHOLE else self.strategy
        return f"{what}{opt} L={self.segment_len} N={self.seq_len} seed={self.seed}"

    def needs(self) -> list[tuple[str, str]]:
        """An encoder over the whole input; the segment strategies mask a chunk's padding."""
        if self.strategy == WHOLE:
            return [(self.variant, "non_causal")]
        return [(self.variant, "non_causal"), (self.variant, "key_padding")]


@dataclass(frozen=True)
class LongResult(TaskResult):
    """A task result plus inference time per document and the prefix Bayes bound."""

    config: LongConfig
    infer_ms_per_doc: float | None = None
    prefix_bound: float | None = None  # best accuracy of any classifier of the first L tokens

    config_cls: ClassVar[type] = LongConfig


def _split(data: Any, n: int) -> tuple[Any, Any]:
    head = dataclasses.replace(data, inputs=data.inputs[:n], labels=data.labels[:n])
    tail = dataclasses.replace(data, inputs=data.inputs[n:], labels=data.labels[n:])
    return head, tail


def inference_ms(model: Any, inputs: Any, batch: int, device: str) -> float:
    """Milliseconds per document of a no-grad forward over ``inputs`` ``(S, N)`` in batches."""
    import torch

    model.eval()
    with torch.no_grad():
        model(inputs[:batch].to(device))  # warm-up
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(0, inputs.shape[0], batch):
            model(inputs[i : i + batch].to(device))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - t0) / inputs.shape[0]


def run_long(cfg: LongConfig, progress: Callable[..., None] | None = None) -> LongResult:
    """Generate the documents from ``cfg.seed``, train the strategy's model, and measure."""
    import torch

    from attn_bench.long.models import LongClassifier
    from attn_bench.task.tasks import prefix_bayes_accuracy

    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    data = _task_data(cfg.task, cfg.train_size + cfg.test_size, cfg.seq_len, 1000 + cfg.seed, cfg.params)
    tr, te = _split(data, cfg.train_size)
    labels = te.labels[:, 0]
    chance = float(torch.bincount(labels).max()) / labels.numel()
    bound = prefix_bayes_accuracy(te.inputs, cfg.segment_len, dict(cfg.params).get("evidence", 7))
    model = LongClassifier(
        cfg.strategy,
        data.vocab_size,
        data.num_classes,
        cfg.segment_len,
        cfg.seq_len,
        variant=cfg.variant,
        options=_variant_options(cfg),
        d_model=cfg.d_model,
        heads=cfg.heads,
        layers=cfg.layers,
        conv=cfg.conv,
    )
    res = train_config(cfg, model, tr, te, progress)
    return LongResult(
        cfg,
        "ok",
        final_acc=res.final_acc,
        best_acc=res.best_acc,
        chance_acc=chance,
        train_s=res.train_s,
        time_to_target_s=res.time_to_target_s,
        tokens_per_s=res.tokens_per_s,
        peak_mem_bytes=float(res.peak_mem_bytes),
        final_loss=res.final_loss,
        infer_ms_per_doc=inference_ms(model, te.inputs, 4 * cfg.batch, cfg.device),
        prefix_bound=bound,
    )


def run_long_row(msg: dict, settings: RunSettings, progress: Callable[..., None]) -> dict:
    """The worker job: a :class:`LongConfig`'s ``asdict`` in, its row out."""
    pairs = {k: tuple(map(tuple, msg[k])) for k in ("options", "params")}
    cfg = LongConfig(**{**msg, **pairs})
    t0 = time.perf_counter()
    res = run_long(cfg, progress)
    return dataclasses.replace(res, elapsed_s=round(time.perf_counter() - t0, 3)).to_row()


# -- presets --------------------------------------------------------------------------------------


def expand_long_group(
    group: dict[str, Any], defaults: dict[str, Any], variants: list[str] | None = None
) -> list[LongConfig]:
    """The configs of one preset group: each strategy through :func:`expand_group`, ``whole`` with
    each of the group's ``variants`` (``variants`` when given; default every registered variant
    but the exact one), the others with exact attention."""
    g = {**defaults, **group}
    listed = g.pop("variants", [v for v in av.list_variants() if v != exact_variant()])
    whole = variants or _as_list(listed)
    strategies = g.pop("strategies", list(STRATEGIES))
    strategies = [strategies] if isinstance(strategies, str) else list(strategies)
    bad = [s for s in strategies if s not in STRATEGIES]
    if bad:
        raise ValueError(f"unknown strategy(s) {bad}; strategies are {', '.join(STRATEGIES)}")
    segment_len = int(g.pop("segment_len", 32))
    if segment_len < 1:
        raise ValueError(f"segment_len must be a positive integer, got {segment_len}")
    g.setdefault("task", LONG_TASK)
    out = []
    for strategy in strategies:
        for cfg in expand_group({**g, "variants": whole if strategy == WHOLE else [exact_variant()]}, {}):
            fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(TaskConfig)}
            out.append(LongConfig(**fields, strategy=strategy, segment_len=segment_len))
    return out


def load_long_presets(text: str | None = None, variants: list[str] | None = None) -> dict[str, TaskPreset]:
    """Parse ``long_presets.toml`` (shipped with the package) or the given TOML text; ``variants``
    replaces the ``whole`` strategy's."""
    if text is None:
        text = (Path(__file__).resolve().parent / "long_presets.toml").read_text()
    expand = lambda g, d: expand_long_group(g, d, variants)
    return parse_presets(text, expand, order=lambda c: (c.seq_len, c.seed))  # a cut run has whole N
