"""Runs of ``attn-bench swap``: a :class:`SwapConfig` per (model, mode, variant, seed), trained and
measured through :func:`attn_bench.task.run.run_tasks` (worker pool, atomic ``results.csv``, resume).

Modes, for a seed and a model (``task`` or ``hf``, see :mod:`.models`):

- ``pretrain``: the model with exact attention (the registry's exact variant) trained from
  scratch for ``pretrain_steps``. Its final held-out loss is the *reference loss* of the seed.
- ``swap``: the pretrained model (same weights) with its attention replaced by ``variant`` (any
  registered variant that computes causal attention; ``--variants`` picks them), then fine-tuned
  for ``steps``. The exact variant is the control: the same fine-tuning, no swap.
- ``scratch``: ``variant`` trained from scratch with the pretraining's steps and learning rate.

Each row records the held-out loss at step 0 (for ``swap``: right after the swap), the curve of
held-out loss against steps, and the first evaluated step whose loss is within 5% of the reference
loss. A ``swap`` or ``scratch`` row needs its seed's pretrained model: the worker keeps the last
ones in memory, and pretrains again (deterministically, from the same seed) when it has not.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import attention_variants as av
from attn_bench.core.config import RunSettings
from attn_bench.core.variants import exact_variant
from attn_bench.swap.models import MODELS
from attn_bench.task.run import (
    CURVE_POINTS,
    TaskConfig,
    TaskPreset,
    TaskResult,
    _variant_options,
    parse_presets,
    train_config,
)

SWAP_TASK = "stdlib_bytes"
MODES = ("pretrain", "swap", "scratch")
RECOVER_FRAC = 0.05  # "recovered": held-out loss within 5% of the reference loss
JOB = "attn_bench.swap.run:run_swap_row"


@dataclass(frozen=True)
class SwapConfig(TaskConfig):
    """A task run plus the mode, the model and the pretraining that ``swap`` and ``scratch`` rows
    compare with. ``steps``, ``lr`` and ``eval_every`` are this row's own training."""

    mode: str = "pretrain"
    model: str = "task"
    pretrain_steps: int = 600
    pretrain_lr: float = 3e-3
    pretrain_eval_every: int = 50

    def label(self) -> str:
        opt = "".join(f" {k}={v}" for k, v in self.options)
        return f"{self.model} {self.mode} {self.variant}{opt} seed={self.seed}"

    def needs(self) -> list[tuple[str, str]]:
        """A causal language model (through Transformers: the variant's ``av_<name>``)."""
        return [(self.variant, "causal")]

    def pretraining(self) -> SwapConfig:
        """The config of the seed's ``pretrain`` row."""
        return dataclasses.replace(
            self, variant=exact_variant(), options=(), mode="pretrain", steps=self.pretrain_steps,
            lr=self.pretrain_lr, eval_every=self.pretrain_eval_every,
        )  # fmt: skip


@dataclass(frozen=True)
class SwapResult(TaskResult):
    """A task result plus held-out losses: the seed's reference, at step 0, at the end; the first
    step within 5% of the reference; the held-out loss curve; the corpus digest."""

    config: SwapConfig
    ref_loss: float | None = None
    start_loss: float | None = None
    eval_loss: float | None = None
    steps_to_recover: float | None = None  # None: not within 5% in this row's steps
    eval_loss_curve: str = ""  # JSON [[step, held-out loss], ...], step 0 first
    corpus_sha256: str = ""

    config_cls: ClassVar[type] = SwapConfig


def steps_to_within(curve: list[tuple[int, float]], ref: float, frac: float = RECOVER_FRAC) -> int | None:
    """The first step of ``curve`` (``(step, loss)`` in step order) with ``loss <= (1 + frac) * ref``."""
    for step, loss in curve:
        if loss <= (1 + frac) * ref:
            return step
    return None


def check_config(cfg: SwapConfig) -> None:
    """ValueError naming the field when ``cfg`` is not a run this study can do."""
    if cfg.mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {cfg.mode!r}")
    if cfg.model not in MODELS:
        raise ValueError(f"model must be one of {', '.join(MODELS)}, got {cfg.model!r}")
    if cfg.variant not in av.list_variants():
        raise ValueError(f"unknown variant {cfg.variant!r}; variants are {', '.join(av.list_variants())}")
    if cfg.model == "hf" and cfg.mode == "scratch":
        raise ValueError("the hf model has no scratch mode (its swap is the point); use model = 'task'")
    if cfg.mode == "pretrain" and cfg != cfg.pretraining():
        raise ValueError("a pretrain row is exact attention with pretrain_steps, pretrain_lr and pretrain_eval_every")
    for name in ("steps", "pretrain_steps", "eval_every", "pretrain_eval_every", "batch", "seq_len"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be a positive integer, got {getattr(cfg, name)}")


# -- one run, in the worker -----------------------------------------------------------------------

_PRETRAINED: dict[SwapConfig, tuple[dict, Any]] = {}


def _data(cfg: SwapConfig) -> tuple[Any, Any, Any]:
    from attn_bench.swap.corpus import lm_data, load_corpus

    corpus = load_corpus()
    tr, te = lm_data(corpus, cfg.seq_len, cfg.train_size, cfg.test_size, 1000 + cfg.seed)
    return corpus, tr, te


def _new_model(cfg: SwapConfig, variant: str, options: dict[str, Any]) -> Any:
    from attn_bench.swap.models import hf_config, hf_lm, task_lm

    if cfg.model == "hf":
        return hf_lm(hf_config(cfg.seq_len, cfg.d_model, cfg.heads, cfg.layers), "sdpa")
    return task_lm(variant, options, cfg.seq_len, cfg.d_model, cfg.heads, cfg.layers, cfg.conv)


def _pretrained(cfg: SwapConfig, progress: Callable[..., None] | None = None) -> tuple[dict, Any, float]:
    """The trained weights of ``cfg``'s pretrain row, its :class:`~attn_bench.task.train.TrainResult` and
    its held-out loss at step 0; trained here unless the worker holds them."""
    import torch

    from attn_bench.task.train import evaluate_metrics

    key = cfg.pretraining()
    if key not in _PRETRAINED:
        torch.manual_seed(key.seed)
        _, tr, te = _data(key)
        model = _new_model(key, exact_variant(), {}).to(key.device)
        start = evaluate_metrics(model, te, 4 * key.batch, torch.device(key.device))[1]
        res = train_config(key, model, tr, te, progress)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        while len(_PRETRAINED) >= 2:
            _PRETRAINED.pop(next(iter(_PRETRAINED)))
        _PRETRAINED[key] = (state, res, start)
    return _PRETRAINED[key]


def run_swap(cfg: SwapConfig, progress: Callable[..., None] | None = None) -> SwapResult:
    """Train (or fetch) the seed's pretrained model and do ``cfg``'s row; see the module."""
    import torch

    from attn_bench.swap.models import hf_reload, swap_attention
    from attn_bench.task.run import attention_error
    from attn_bench.task.train import evaluate_metrics

    check_config(cfg)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    corpus, tr, te = _data(cfg)
    device = torch.device(cfg.device)
    options = _variant_options(cfg)
    err = None
    if cfg.mode == "pretrain":
        _, res, start = _pretrained(cfg, progress)
        ref = res.eval_loss_curve[-1][1]
    else:
        state, pre, _ = _pretrained(cfg)
        ref = pre.eval_loss_curve[-1][1]
        torch.manual_seed(cfg.seed)
        if cfg.mode == "swap":
            model = _new_model(cfg, exact_variant(), {})
            model.load_state_dict(state)
            if cfg.model == "hf":
                model = hf_reload(model, cfg.variant, {**options, "backend": "auto"})
            else:
                swap_attention(model, cfg.variant, options)
        else:
            model = _new_model(cfg, cfg.variant, options)
        model.to(device)
        start = evaluate_metrics(model, te, 4 * cfg.batch, device)[1]
        if cfg.model == "task" and cfg.mode == "swap":
            err = attention_error(model.eval(), te.inputs[: cfg.batch].to(device))
        res = train_config(cfg, model, tr, te, progress)
    curve = [(0, start), *res.eval_loss_curve]
    reached = steps_to_within(curve, ref)
    labels = te.labels.flatten()
    stride = max(1, len(res.loss_curve) // CURVE_POINTS)
    return SwapResult(
        cfg,
        "ok",
        final_acc=res.final_acc,
        best_acc=res.best_acc,
        chance_acc=float(torch.bincount(labels).max()) / labels.numel(),
        train_s=res.train_s,
        tokens_per_s=res.tokens_per_s,
        peak_mem_bytes=float(res.peak_mem_bytes),
        final_loss=res.final_loss,
        approx_err=err,
        loss_curve=json.dumps([(s, round(v, 5)) for s, v in res.loss_curve[stride - 1 :: stride]]),
        eval_curve=json.dumps([(s, round(t, 4), a) for s, t, a in res.eval_curve]),
        ref_loss=ref,
        start_loss=start,
        eval_loss=curve[-1][1],
        steps_to_recover=None if reached is None else float(reached),
        eval_loss_curve=json.dumps([(s, round(v, 5)) for s, v in curve]),
        corpus_sha256=corpus.sha256,
    )


def run_swap_row(msg: dict, settings: RunSettings, progress: Callable[..., None]) -> dict:
    """The worker job: a :class:`SwapConfig`'s ``asdict`` in, its row out."""
    pairs = {k: tuple(map(tuple, msg[k])) for k in ("options", "params")}
    cfg = SwapConfig(**{**msg, **pairs})
    t0 = time.perf_counter()
    res = run_swap(cfg, progress)
    return dataclasses.replace(res, elapsed_s=round(time.perf_counter() - t0, 3)).to_row()


# -- presets --------------------------------------------------------------------------------------

_STUDY_KEYS = {"variants", "seeds", "models", "scratch", "finetune_steps", "finetune_lr", "finetune_eval_every"}
_FIXED = {"task", "variant", "seq_len", "seed", "options", "params", "steps", "lr", "eval_every", "mode", "model"}


def expand_swap_group(
    group: dict[str, Any], defaults: dict[str, Any], variants: list[str] | None = None
) -> list[SwapConfig]:
    """The rows of one preset group, seed by seed and model by model: the pretrain row, a swap row
    per variant (the exact variant first, the control), then a scratch row per variant (``task``
    model only, when ``scratch``). ``variants`` replaces the group's. Keys: ``variants``, ``seeds``,
    ``models``, ``scratch``, ``seq_len``, ``pretrain_steps``, ``pretrain_lr``, ``pretrain_eval_every``,
    ``finetune_steps``, ``finetune_lr``, ``finetune_eval_every``, the variants' options, other
    :class:`TaskConfig` fields."""
    g = {**defaults, **group}
    fields = {f.name for f in dataclasses.fields(SwapConfig)} - _FIXED
    option_names = {o.name for v in av.list_variants() for o in av.variant_class(v).sweep_options}
    unknown = set(g) - fields - _STUDY_KEYS - option_names - {"seq_len"}
    if unknown:
        raise ValueError(f"unknown swap preset key(s) {sorted(unknown)}")
    exact = exact_variant()
    listed = variants or g.get("variants", [v for v in av.list_variants() if v != exact])
    swapped = [v for v in listed if v != exact]
    models = list(g.get("models", MODELS))
    base = {k: g[k] for k in fields if k in g}
    base.setdefault("pretrain_steps", 600)
    base.setdefault("pretrain_lr", 3e-3)
    base.setdefault("pretrain_eval_every", 50)
    pre = {"steps": base["pretrain_steps"], "lr": base["pretrain_lr"], "eval_every": base["pretrain_eval_every"]}
    fine = {
        "steps": g.get("finetune_steps", 300),
        "lr": g.get("finetune_lr", base["pretrain_lr"]),
        "eval_every": g.get("finetune_eval_every", 25),
    }
    out = []
    for seed in g.get("seeds", [0, 1, 2]):
        for model in models:
            rows = [("pretrain", exact, pre), *(("swap", v, fine) for v in [exact, *swapped])]
            if g.get("scratch", True) and model == "task":
                rows += [("scratch", v, pre) for v in swapped]
            for mode, variant, train in rows:
                declared = av.variant_class(variant).sweep_options
                options = tuple((o.name, int(g.get(o.name, o.default))) for o in declared)
                cfg = SwapConfig(
                    task=SWAP_TASK, variant=variant, seq_len=int(g.get("seq_len", 128)), seed=int(seed),
                    options=options, mode=mode, model=model, **train, **base,
                )  # fmt: skip
                check_config(cfg)
                out.append(cfg)
    return out


def load_swap_presets(text: str | None = None, variants: list[str] | None = None) -> dict[str, TaskPreset]:
    """Parse ``swap_presets.toml`` (shipped with the package) or the given TOML text; ``variants``
    replaces the variants swapped in."""
    if text is None:
        text = (Path(__file__).resolve().parent / "swap_presets.toml").read_text()
    return parse_presets(text, lambda g, d: expand_swap_group(g, d, variants))


def loss_curve_of(curve_json: str) -> list[tuple[int, float]]:
    """A row's ``eval_loss_curve`` back as ``(step, loss)`` pairs (empty when absent)."""
    if not curve_json:
        return []
    return [(int(s), float(v)) for s, v in json.loads(curve_json) if not math.isnan(float(v))]
