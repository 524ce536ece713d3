"""``attn-bench model``: the variants inside whole Hugging Face Transformers models.

A run is a :class:`ModelConfig`: an architecture (``llama``: a Llama-style decoder,
``LlamaForCausalLM``; ``bert``: a BERT encoder with its masked-LM head, ``BertForMaskedLM``),
its sizes, random weights (no downloads), an attention implementation, N and a pass. Its row is
the config plus what one pass of the whole model costs: median time, tokens/s, peak memory, and
the numerics gate of its logits.

Attention implementations (Transformers' ``attn_implementation``):
- ``sdpa``: Transformers' own, the baseline;
- ``av_full``, ``av_sliding_window``, ``av_performer``: this project's variants, registered by
  :mod:`attention_variants.hf`;
- ``skip``: "attention skipped": returns ``q + k + v`` (heads of k and v repeated for GQA), so
  that every projection stays in the graph and the attention's own cost is nearly nothing. A
  row's share of time in attention is ``1 - t_skip / t`` against the ``skip`` row of the same
  model, N and pass (computed by the report).

Numerics gate (before timing): on the first ``gate_len`` tokens, the logits of the model with the
implementation under test are compared with the same weights run in float64 with the attention
the implementation stands for computed by :func:`attn_bench.core.numerics.softmax_by_rows` (softmax
variants: full attention for ``sdpa`` and ``av_full``, the window's mask for the sliding window)
or by the variant's float64 ``reference`` (the Performer). The bound follows FlashAttention's
rule, loosened for a whole model: ``max_err <= GATE_FACTOR * naive_err + GATE_ATOL[dtype] *
max|truth|``, where ``naive_err`` is the error of the same model with that ground-truth attention
computed in the row's dtype. A row that fails is ``wrong`` and gets no timings. ``skip_err``, the
distance of the logits with attention skipped from the truth, says how much attention moves the
logits: a bound far below it means the gate would catch an attention that computes the wrong thing.
``sdpa_diff`` is the distance of the row's logits from the same model's with Transformers' ``sdpa``
in the row's dtype: for ``av_full`` a direct agreement check, for the sliding window and the
Performer how far the model's output moves from exact full attention.

Rows at a larger N of a line that ran out of memory or time are not run (``oom`` / ``skipped``,
with the reason); rows not started within ``--budget-s`` are ``skipped``.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from attn_bench.core.config import RunSettings, result_row
from attn_bench.core.lifecycle import pool_lifecycle
from attn_bench.core.machine import now
from attn_bench.core.results import (
    METADATA,
    WORKER_LOG,
    _read_metadata,
    atomic_write,
    prepare_run_dir,
    remove_stale_temp_files,
    rows_to_csv,
    write_metadata,
)

RESULTS = "results.csv"
ARCHS = ("llama", "bert")
IMPLS = ("skip", "sdpa", "av_full", "av_sliding_window", "av_performer")
MODEL_PASSES = ("fwd", "fwd_bwd")
MODEL_DTYPES = ("float32", "float16", "bfloat16")
MODEL_STATUSES = ("ok", "oom", "timeout", "wrong", "error", "skipped")
SKIP_IMPL = "skip"
TRUTH_IMPL = "bench_truth"  # the gate's ground-truth attention (registered by this module)
GATE_FACTOR = 4.0
GATE_ATOL = {"float32": 1e-4, "float16": 2e-3, "bfloat16": 1e-2}
# The variant each project implementation computes (its options come from the config).
AV_VARIANTS = {"av_full": "full", "av_sliding_window": "sliding_window", "av_performer": "performer"}


@dataclass(frozen=True)
class ModelConfig:
    """One model, implementation, N and pass; every field is part of its identity (resume)."""

    arch: str
    impl: str
    seq_len: int
    pass_: str = "fwd"
    options: tuple[tuple[str, int], ...] = ()  # the variant's options (window, num_features)
    batch: int = 1
    layers: int = 2
    hidden: int = 256
    heads: int = 4
    kv_heads: int = 4
    intermediate: int = 0  # 0: 4 * hidden (bert), 8/3 * hidden rounded up to 64 (llama)
    vocab: int = 32000
    dtype: str = "float32"
    device: str = "cpu"
    gate_len: int = 512  # tokens of the numerics gate
    threads: int = 0  # torch intra-op threads of the worker (0: torch's default)

    def __post_init__(self) -> None:
        problems = validate_model_config(self)
        if problems:
            raise ValueError("; ".join(problems))

    def key(self) -> tuple:
        return dataclasses.astuple(self)

    def line_key(self) -> tuple:
        """Everything but N: rows of one line of the plots (a failure at N skips larger N)."""
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "seq_len")

    def ffn(self) -> int:
        if self.intermediate:
            return self.intermediate
        return 4 * self.hidden if self.arch == "bert" else -(-8 * self.hidden // 3 // 64) * 64

    def label(self) -> str:
        opt = "".join(f" {k}={v}" for k, v in self.options)
        return f"{self.arch} {self.impl}{opt} N={self.seq_len} {self.pass_}"

    def to_row(self) -> dict[str, Any]:
        row = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        row["pass"] = row.pop("pass_")
        row["options"] = json.dumps(dict(self.options), sort_keys=True)
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> ModelConfig:
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            x = row["pass" if f.name == "pass_" else f.name]
            if f.name == "options":
                d = json.loads(x) if isinstance(x, str) else dict(x)
                kwargs[f.name] = tuple(sorted((str(k), int(v)) for k, v in d.items()))
            elif f.type == "int":
                kwargs[f.name] = int(float(x))
            else:
                kwargs[f.name] = str(x)
        return cls(**kwargs)


def validate_model_config(cfg: ModelConfig) -> list[str]:
    """What is wrong with ``cfg``, one message per problem naming the field."""
    out = []
    if cfg.arch not in ARCHS:
        out.append(f"arch {cfg.arch!r} is not one of {', '.join(ARCHS)}")
    if cfg.impl not in IMPLS:
        out.append(f"impl {cfg.impl!r} is not one of {', '.join(IMPLS)}")
    if cfg.pass_ not in MODEL_PASSES:
        out.append(f"pass {cfg.pass_!r} is not one of {', '.join(MODEL_PASSES)}")
    if cfg.dtype not in MODEL_DTYPES:
        out.append(f"dtype {cfg.dtype!r} is not one of {', '.join(MODEL_DTYPES)}")
    if cfg.device not in ("cpu", "cuda") and not cfg.device.startswith("cuda:"):
        out.append(f"device {cfg.device!r} is not cpu or cuda")
    for name in ("seq_len", "batch", "layers", "hidden", "heads", "kv_heads", "vocab", "gate_len"):
        if getattr(cfg, name) < 1:
            out.append(f"{name} must be a positive integer, got {getattr(cfg, name)}")
    if cfg.heads >= 1 and cfg.kv_heads >= 1:
        if cfg.hidden % cfg.heads:
            out.append(f"hidden {cfg.hidden} is not a multiple of heads {cfg.heads}")
        if cfg.heads % cfg.kv_heads:
            out.append(f"heads {cfg.heads} is not a multiple of kv_heads {cfg.kv_heads}")
        if cfg.arch == "bert" and cfg.kv_heads != cfg.heads:
            out.append(f"bert has no grouped-query attention: kv_heads must equal heads ({cfg.heads})")
    return out


# -- attention implementations --------------------------------------------------------------------


def _repeat_kv(x: Any, groups: int) -> Any:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def skip_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, **kwargs: Any):
    """Attention skipped: ``q + k + v`` per head, ``(B, N, H, D)``; O(N), and every projection
    stays in the graph (q ``(B, H, N, D)``, k and v ``(B, Hk, N, D)``)."""
    groups = query.shape[1] // key.shape[1]
    out = query + _repeat_kv(key, groups) + _repeat_kv(value, groups)
    return out.transpose(1, 2).contiguous(), None


_TRUTH: dict[str, Any] = {}  # the variant the gate's ground-truth attention computes


def truth_attention(
    module: Any, query: Any, key: Any, value: Any, attention_mask: Any, scaling: float | None = None, **kwargs: Any
):
    """The gate's ground truth, ``(B, N, H, D)``: the variant in :data:`_TRUTH` computed in the
    inputs' dtype, independently of the implementations under test (see the module doc)."""
    from attn_bench.core.numerics import softmax_by_rows

    variant = _TRUTH["variant"]
    causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", False)))
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    if variant.softmax:
        mod = variant.mask_mod(query.shape[2], key.shape[2], causal, query.device)
        out = softmax_by_rows(query, key, value, mod, scale)
    else:
        out = variant.dense(query, key, value, causal, scale, upcast=False)
    return out.transpose(1, 2).contiguous(), None


def register_implementations() -> str | None:
    """Register ``skip`` and the gate's truth with Transformers, and the project's ``av_*``
    implementations through :mod:`attention_variants.hf`; returns why the latter failed, or None."""
    from transformers import AttentionInterface

    AttentionInterface.register(SKIP_IMPL, skip_attention)
    AttentionInterface.register(TRUTH_IMPL, truth_attention)
    try:
        from attention_variants import hf
    except ImportError as exc:
        return f"attention_variants.hf is not available ({exc})"
    hf.register()
    return None


def variant_of(cfg: ModelConfig, model_config: Any) -> Any:
    """The attention variant the row's implementation computes in every layer (``sdpa``: full
    attention), as :func:`attention_variants.hf.layer_variant` picks it for the model."""
    import attention_variants as av

    if cfg.impl not in AV_VARIANTS:
        return av.FullAttention()
    from attention_variants import hf

    return hf.layer_variant(cfg.impl, None, model_config)[0]


# -- the model ------------------------------------------------------------------------------------


def hf_config(cfg: ModelConfig, impl: str | None = None) -> Any:
    """The Transformers config of ``cfg`` (no dropout; the variant's options in ``av_options``)."""
    from transformers import BertConfig, LlamaConfig

    common = dict(
        vocab_size=cfg.vocab,
        hidden_size=cfg.hidden,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        intermediate_size=cfg.ffn(),
        max_position_embeddings=max(cfg.seq_len, cfg.gate_len),
        tie_word_embeddings=True,
    )
    if cfg.arch == "llama":
        out = LlamaConfig(num_key_value_heads=cfg.kv_heads, attention_dropout=0.0, **common)
    else:
        out = BertConfig(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **common)
    out.av_options = dict(cfg.options)  # read by attention_variants.hf
    out._attn_implementation = impl or cfg.impl
    return out


def build_model(cfg: ModelConfig, seed: int) -> Any:
    """The model with random weights (seeded), on ``cfg.device`` in ``cfg.dtype``, in eval mode."""
    import torch
    from transformers import BertForMaskedLM, LlamaForCausalLM

    torch.manual_seed(seed)
    cls = LlamaForCausalLM if cfg.arch == "llama" else BertForMaskedLM
    with torch.device(cfg.device):
        model = cls(hf_config(cfg))
    return model.to(getattr(torch, cfg.dtype)).eval()


def set_impl(model: Any, impl: str) -> None:
    """Switch every attention layer of ``model`` to ``impl`` (a registered implementation)."""
    for m in model.modules():
        if hasattr(m, "config") and hasattr(m.config, "_attn_implementation"):
            m.config._attn_implementation = impl


def gate(model: Any, cfg: ModelConfig, ids: Any, perturb: float = 0.0) -> dict[str, Any]:
    """The numerics gate of the model's logits on ``ids`` (see the module doc)."""
    import torch

    _TRUTH["variant"] = variant_of(cfg, model.config)
    with torch.no_grad():
        out = model(input_ids=ids).logits.double() + perturb
        set_impl(model, TRUTH_IMPL)
        try:
            naive = model(input_ids=ids).logits.double()
            set_impl(model, SKIP_IMPL)
            skipped = model(input_ids=ids).logits.double()
            set_impl(model, "sdpa")
            sdpa = model(input_ids=ids).logits.double()
            set_impl(model, TRUTH_IMPL)
            truth_model = copy.deepcopy(model).double()
            truth = truth_model(input_ids=ids).logits
            del truth_model
        finally:
            set_impl(model, cfg.impl)
    err = float((out - truth).abs().max())
    naive_err = float((naive - truth).abs().max())
    skip_err = float((skipped - truth).abs().max())  # what the gate could see: attention's effect
    sdpa_diff = float((out - sdpa).abs().max())  # av_full: agreement; the others: their deviation
    bound = GATE_FACTOR * naive_err + GATE_ATOL[cfg.dtype] * float(truth.abs().max())
    ok = math.isfinite(err) and err <= bound
    return {
        "max_err": err,
        "err_bound": bound,
        "naive_err": naive_err,
        "skip_err": skip_err,
        "sdpa_diff": sdpa_diff,
        "gate_n": ids.shape[1],
        "ok": ok,
    }


def time_model(cfg: ModelConfig, settings: RunSettings, progress: Callable[..., None] | None = None) -> ModelResult:
    """Build the model, gate it, then time one pass and measure its peak memory."""
    import torch

    from attn_bench.core.measure import is_oom, peak_memory, time_fn
    from attn_bench.sweep import measure

    t0 = time.perf_counter()

    def result(status: str, **kw: Any) -> ModelResult:
        return ModelResult(cfg, status, elapsed_s=round(time.perf_counter() - t0, 3), **kw)

    def tick(step: int, what: str) -> None:
        if progress is not None:
            progress(step, 3, what)

    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    dev = torch.device(cfg.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        return result("error", error="CUDA is not available on this machine")
    why = register_implementations()
    if why is not None and cfg.impl in AV_VARIANTS:
        return result("error", error=why)
    params = None
    try:
        model = build_model(cfg, settings.seed)
        params = sum(p.numel() for p in model.parameters())
        gen = torch.Generator(device="cpu").manual_seed(settings.seed)
        ids = torch.randint(cfg.vocab, (cfg.batch, cfg.seq_len), generator=gen).to(dev)
        checked: dict[str, Any] = {}
        if cfg.impl != SKIP_IMPL:
            tick(0, "numerics gate")
            perturb, measure.PERTURB = measure.PERTURB, 0.0  # fault injection for the harness's tests
            checked = gate(model, cfg, ids[:, : min(cfg.seq_len, cfg.gate_len)], perturb=perturb)
            if not checked.pop("ok"):
                msg = f"logits max_err {checked['max_err']:.3g} > bound {checked['err_bound']:.3g}"
                return result("wrong", error=msg, params=params, **checked)
        if cfg.pass_ == "fwd":

            def call():
                with torch.no_grad():
                    return model(input_ids=ids).logits
        else:
            model.train()  # no dropout in these configs; train mode as a training step has

            def call():
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                # Gradients are dropped at the end of the pass, so that each pass (and its peak
                # memory) starts from the weights alone and counts the gradients it makes.
                model.zero_grad(set_to_none=True)
                return loss.detach()

        tick(1, "timing")
        med, p10, p90, reps = time_fn(call, dev, settings)
        tick(2, "peak memory")
        peak = peak_memory(call, dev)
        tokens = cfg.batch * cfg.seq_len
        return result(
            "ok",
            time_ms=med,
            time_ms_p10=p10,
            time_ms_p90=p90,
            repeats=reps,
            tokens_per_s=tokens / (med * 1e-3) if med > 0 else None,
            peak_mem_bytes=float(peak),
            params=params,
            **checked,
        )
    except Exception as exc:
        if is_oom(exc):
            return result("oom", error=f"{type(exc).__name__}: {str(exc)[:300]}", params=params)
        return result("error", error=f"{type(exc).__name__}: {str(exc)[:500]}", params=params)


def run_model_row(msg: dict, settings: RunSettings, progress: Callable[..., None]) -> dict:
    """The worker job (``attn_bench.model.run:run_model_row``): a config's ``asdict`` in, its row out."""
    cfg = ModelConfig(**{**msg, "options": tuple(map(tuple, msg["options"]))})
    return time_model(cfg, settings, progress).to_row()


# -- results --------------------------------------------------------------------------------------

_METRICS = (
    "time_ms",
    "time_ms_p10",
    "time_ms_p90",
    "repeats",
    "tokens_per_s",
    "peak_mem_bytes",
    "params",
    "max_err",
    "err_bound",
    "naive_err",
    "skip_err",
    "sdpa_diff",
    "gate_n",
    "elapsed_s",
)


@dataclass(frozen=True)
class ModelResult:
    """A config and what it measured (timings None unless ``status == "ok"``)."""

    config: ModelConfig
    status: str
    error: str = ""
    time_ms: float | None = None
    time_ms_p10: float | None = None
    time_ms_p90: float | None = None
    repeats: float | None = None
    tokens_per_s: float | None = None
    peak_mem_bytes: float | None = None
    params: float | None = None
    max_err: float | None = None
    err_bound: float | None = None
    naive_err: float | None = None
    skip_err: float | None = None
    sdpa_diff: float | None = None
    gate_n: float | None = None
    elapsed_s: float | None = None

    def to_row(self) -> dict[str, Any]:
        return result_row(self)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> ModelResult:
        kwargs: dict[str, Any] = {}
        for name in _METRICS:
            x = row.get(name)
            kwargs[name] = None if x in (None, "") or (isinstance(x, float) and math.isnan(x)) else float(x)
        kwargs["status"] = str(row.get("status") or "")
        kwargs["error"] = str(row.get("error") or "")
        return cls(config=ModelConfig.from_row(row), **kwargs)


def result_columns() -> list[str]:
    cfg = ["pass" if f.name == "pass_" else f.name for f in dataclasses.fields(ModelConfig)]
    return [*cfg, *(f.name for f in dataclasses.fields(ModelResult) if f.name != "config")]


def read_model_results(path: Path) -> list[ModelResult]:
    """Rows of a model results.csv; a line that does not parse is skipped (and runs again on resume)."""
    if not path.exists():
        return []
    out = []
    with open(path, newline="", encoding="utf-8") as f:
        for i, row in enumerate(csv.DictReader(f), start=2):
            try:
                res = ModelResult.from_row(row)
                if res.status not in MODEL_STATUSES:
                    raise ValueError(f"status {res.status!r}")
                out.append(res)
            except (ValueError, TypeError, KeyError, json.JSONDecodeError) as exc:
                print(f"{path}:{i}: skipped, not a whole row ({type(exc).__name__}: {exc})", file=sys.stderr)
    return out


def write_model_results(path: Path, results: list[ModelResult]) -> None:
    atomic_write(path, rows_to_csv((r.to_row() for r in results), result_columns()))


# -- presets --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelPreset:
    name: str
    description: str
    groups: tuple[dict[str, Any], ...]
    settings: RunSettings = field(default_factory=RunSettings)
    budget_s: float | None = None


# Keys of a preset group that are lists (crossed); the others set ModelConfig fields.
GROUP_LISTS = ("archs", "impls", "seq_lens", "passes")
OPTION_KEYS = ("window", "num_features")
# CLI options that replace a key in every group: option name -> (group key, parse)
OVERRIDES: dict[str, tuple[str, Callable[[str], Any]]] = {
    "archs": ("archs", str),
    "impls": ("impls", str),
    "seq_lens": ("seq_lens", int),
    "passes": ("passes", str),
    "layers": ("layers", int),
    "hidden": ("hidden", int),
    "heads": ("heads", int),
    "kv_heads": ("kv_heads", int),
    "batch": ("batch", int),
    "vocab": ("vocab", int),
    "dtype": ("dtype", str),
    "device": ("device", str),
    "window": ("window", int),
    "num_features": ("num_features", int),
    "gate_len": ("gate_len", int),
    "threads": ("threads", int),
}


def _as_list(x: Any) -> list[Any]:
    return list(x) if isinstance(x, list | tuple) else [x]


def expand_model_groups(
    groups: tuple[dict[str, Any], ...], overrides: dict[str, Any] | None = None
) -> list[ModelConfig]:
    """The configs of a preset's groups, ordered by N (then pass, arch, implementation: ``skip``
    first), so a time budget cuts the longest N. ``overrides`` replace keys in every group, except
    ``archs``, which selects: a group keeps only the requested archs it has, and a group with none
    of them is dropped (so ``--archs llama`` runs the preset's Llama, not a Llama at the encoder
    group's sizes). Only when no group has a requested arch do the archs replace every group's.
    BERT rows get ``kv_heads = heads``."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)} - {"arch", "impl", "seq_len", "pass_", "options"}
    overrides = dict(overrides or {})
    wanted = overrides.pop("archs", None)
    if wanted is not None:
        wanted = _as_list(wanted)
        selected = []
        for group in groups:
            have = [a for a in _as_list(group.get("archs", ["llama"])) if a in wanted]
            if have:
                selected.append({**group, "archs": have})
        groups = tuple(selected) if selected else tuple({**group, "archs": wanted} for group in groups)
    configs: dict[tuple, ModelConfig] = {}
    for group in groups:
        g = {**group, **overrides}
        unknown = set(g) - fields - set(GROUP_LISTS) - set(OPTION_KEYS)
        if unknown:
            raise ValueError(f"unknown model preset key(s) {sorted(unknown)}")
        base = {k: g[k] for k in fields if k in g}
        for n in _as_list(g["seq_lens"]):
            for pass_ in _as_list(g.get("passes", list(MODEL_PASSES))):
                for arch in _as_list(g.get("archs", ["llama"])):
                    for impl in _as_list(g.get("impls", list(IMPLS))):
                        options: tuple[tuple[str, int], ...] = ()
                        if impl == "av_sliding_window" and "window" in g:
                            options = (("window", int(g["window"])),)
                        if impl == "av_performer" and "num_features" in g:
                            options = (("num_features", int(g["num_features"])),)
                        kw = dict(base)
                        if arch == "bert":  # no grouped-query attention: every head has its keys
                            kw["kv_heads"] = kw.get("heads", 4)
                        cfg = ModelConfig(arch=arch, impl=impl, seq_len=int(n), pass_=pass_, options=options, **kw)
                        configs.setdefault(cfg.key(), cfg)
    order = {name: i for i, name in enumerate(IMPLS)}
    return sorted(configs.values(), key=lambda c: (c.seq_len, c.pass_ != "fwd", ARCHS.index(c.arch), order[c.impl]))


def load_model_presets(text: str | None = None) -> dict[str, ModelPreset]:
    """Parse ``model_presets.toml`` (shipped with the package) or the given TOML text."""
    if text is None:
        text = (Path(__file__).resolve().parent / "model_presets.toml").read_text()
    data = tomllib.loads(text)
    presets = {}
    for name, spec in data.get("presets", {}).items():
        settings = dict(spec.get("settings", {}))
        budget = settings.pop("budget_s", None)
        defaults = spec.get("defaults", {})
        groups = tuple({**defaults, **g} for g in spec.get("groups", []))
        presets[name] = ModelPreset(name, spec.get("description", ""), groups, RunSettings(**settings), budget)
    return presets


# -- the run loop ---------------------------------------------------------------------------------


def _blocked(cfg: ModelConfig, failed: dict[tuple, tuple[int, str]]) -> ModelResult | None:
    """A row not run because its line failed at a smaller N (out of memory or time)."""
    hit = failed.get(cfg.line_key())
    if hit is None or hit[0] >= cfg.seq_len:
        return None
    n, status = hit
    if status == "oom":
        return ModelResult(cfg, "oom", error=f"not run: this line ran out of memory at N={n}")
    return ModelResult(cfg, "skipped", error=f"not run: this line's N={n} ran out of time ({status})")


def run_models(
    configs: list[ModelConfig],
    out: Path,
    settings: RunSettings,
    *,
    resume: bool = False,
    meta: dict | None = None,
    progress: bool = True,
    budget_s: float | None = None,
) -> list[ModelResult]:
    """Run ``configs`` one by one in a worker process (skipping those already in ``out/results.csv``
    when ``resume``), rewriting ``results.csv`` atomically after each. Returns all rows."""
    from attn_bench.core.lifecycle import MIN_CONFIG_S
    from attn_bench.core.worker import WorkerPool, WorkerStartError

    prepare_run_dir(out, (c.device for c in configs), resume=resume)
    remove_stale_temp_files(out, (RESULTS, METADATA))
    path = out / RESULTS
    results = read_model_results(path) if resume else []
    done = {r.config.key() for r in results}
    todo = [c for c in configs if c.key() not in done]
    failed: dict[tuple, tuple[int, str]] = {}
    for r in results:
        if r.status in ("oom", "timeout") and not r.error.startswith("not run"):
            prev = failed.get(r.config.line_key())
            if prev is None or r.config.seq_len < prev[0]:
                failed[r.config.line_key()] = (r.config.seq_len, r.status)
    meta = dict(meta or {})
    old = _read_metadata(out) if resume else {}
    meta["started"] = old.get("started", now())
    if resume:
        meta["resumes"] = [*old.get("resumes", []), {"started": now(), "previous_status": old.get("status")}]
    meta.update(settings=dataclasses.asdict(settings), configs=len(configs), status="running", kind="model")
    meta["budget_s"] = budget_s
    write_metadata(out, meta)
    bar = _ModelProgress(len(todo), enabled=progress)
    pool = WorkerPool(
        settings,
        str(out / WORKER_LOG),
        job="attn_bench.model.run:run_model_row",
        result_cls=ModelResult,
        on_progress=bar.step,
    )
    t_start = time.perf_counter()
    with pool_lifecycle(pool, out, meta, results), bar:
        for cfg in todo:
            left = None if budget_s is None else budget_s - (time.perf_counter() - t_start)
            res = _blocked(cfg, failed)
            if res is None and left is not None and left < MIN_CONFIG_S:
                res = ModelResult(cfg, "skipped", error=f"not run: the --budget-s of {budget_s:g} s was spent")
            if res is None:
                bar.start(cfg.label())
                res = pool.run(cfg, timeout_s=left)
                if res.status in ("oom", "timeout"):
                    failed.setdefault(cfg.line_key(), (cfg.seq_len, res.status))
            results.append(res)
            write_model_results(path, results)
            bar.advance(f"{cfg.label()}: {res.status} {_summary(res)}")
            if pool.gave_up:
                raise WorkerStartError(f"{res.error} ({pool.start_failures} failed starts in a row)")
    return results


def _summary(res: ModelResult) -> str:
    if res.status == "ok":
        return f"{res.time_ms:.1f} ms, {res.tokens_per_s:.0f} tokens/s"
    return res.error[:120]


class _ModelProgress:
    """Two rich bars: rows done, and the phases of the row in flight."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled = total, enabled
        self.progress = self.rows = self.phase = None

    def __enter__(self) -> _ModelProgress:
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
            )
            self.progress.__enter__()
            self.rows = self.progress.add_task("rows", total=self.total)
            self.phase = self.progress.add_task("phase", total=3)
        return self

    def start(self, label: str) -> None:
        if self.progress is not None:
            self.progress.update(self.rows, description=label)
            self.progress.reset(self.phase, total=3, description="starting")

    def step(self, step: int, steps: int, what: str) -> None:
        if self.progress is not None:
            self.progress.update(self.phase, completed=step, total=steps, description=what)

    def advance(self, message: str) -> None:
        if self.progress is not None:
            self.progress.console.print(message, markup=False, highlight=False)
            self.progress.advance(self.rows)
        else:  # a log: one line per row
            print(message, flush=True)

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)
