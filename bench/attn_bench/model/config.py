"""The whole-model benchmark's rows: :class:`ModelConfig` and its checks, :class:`ModelResult` and
its CSV, and the presets (``model_presets.toml``) expanded into rows."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attn_bench.core.config import RunSettings, result_row
from attn_bench.core.results import (
    atomic_write,
    read_job_rows,
    rows_to_csv,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

RESULTS = "results.csv"

ARCHS = ("llama", "bert")

BASE_IMPLS = ("skip", "sdpa")

MODEL_PASSES = ("fwd", "fwd_bwd")

MODEL_DTYPES = ("float32", "float16", "bfloat16")

MODEL_STATUSES = ("ok", "oom", "timeout", "wrong", "error", "skipped", "unsupported")

SKIP_IMPL = "skip"

ARCH_NEEDS = {"llama": "causal", "bert": "non_causal"}
"""What an architecture asks of the variant of an ``av_*`` implementation."""


def impls() -> tuple[str, ...]:
    """The implementations a row may name: ``skip``, ``sdpa`` and ``av_<name>`` for every
    registered variant (:mod:`attention_variants.hf`), in the registry's order."""
    from attention_variants import hf

    return (*BASE_IMPLS, *hf.implementations())


def impl_variant(impl: str) -> str | None:
    """The registered variant an ``av_<name>`` implementation computes (its options come from the
    row), or None for ``skip`` and ``sdpa``."""
    import attention_variants as av
    from attention_variants import hf

    name = impl.removeprefix(hf.PREFIX)
    return name if impl.startswith(hf.PREFIX) and name in av.list_variants() else None


def unsupported_reason(cfg: ModelConfig) -> str | None:
    """Why the variant of ``cfg``'s implementation cannot run its architecture, or None."""
    from attn_bench.core.variants import unsupported

    variant = impl_variant(cfg.impl)
    return None if variant is None else unsupported(variant, dict(cfg.options), [ARCH_NEEDS[cfg.arch]])


def option_keys() -> set[str]:
    """The variants' sweep options (``window``, ``num_features``, a plug-in's): preset keys and options."""
    import attention_variants as av

    return {o.name for v in av.list_variants() for o in av.variant_class(v).sweep_options}


@dataclass(frozen=True)
class ModelConfig:
    """One model, implementation, N and pass; every field is part of its identity (resume)."""

    arch: str
    impl: str
    seq_len: int
    pass_: str = "fwd"
    options: tuple[tuple[str, int], ...] = ()  # the variant's sweep options
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
    if cfg.impl not in impls():
        out.append(f"impl {cfg.impl!r} is not one of {', '.join(impls())}")
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
    return read_job_rows(path, ModelResult.from_row, MODEL_STATUSES)


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
    import attention_variants as av

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
        unknown = set(g) - fields - set(GROUP_LISTS) - option_keys()
        if unknown:
            raise ValueError(f"unknown model preset key(s) {sorted(unknown)}")
        base = {k: g[k] for k in fields if k in g}
        for n in _as_list(g["seq_lens"]):
            for pass_ in _as_list(g.get("passes", list(MODEL_PASSES))):
                for arch in _as_list(g.get("archs", ["llama"])):
                    for impl in _as_list(g.get("impls", list(impls()))):
                        variant = impl_variant(impl)
                        declared = [] if variant is None else av.variant_class(variant).sweep_options
                        options = tuple((o.name, int(g[o.name])) for o in declared if o.name in g)
                        kw = dict(base)
                        if arch == "bert":  # no grouped-query attention: every head has its keys
                            kw["kv_heads"] = kw.get("heads", 4)
                        cfg = ModelConfig(arch=arch, impl=impl, seq_len=int(n), pass_=pass_, options=options, **kw)
                        configs.setdefault(cfg.key(), cfg)
    order = {name: i for i, name in enumerate(impls())}
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
