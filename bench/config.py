"""What one benchmark row is: a frozen config, a frozen result, the CSV columns, and presets.

A *config* names everything that decides what is computed (variant, backend, shapes, dtype,
causal flag, pass, variant options). A *result* is the config plus what was measured. Presets
are data (``presets.toml``): each is a list of groups, and each group a cross product of
config fields; a sweep runs the union of its groups.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import attention_variants as av

# Baselines live in the harness, next to the project's own backends from the registry.
BASELINES: tuple[str, ...] = ("sdpa", "flex")
PASSES: tuple[str, ...] = ("fwd", "fwd_bwd")
# ``skipped``: not reached before the sweep's time budget (``--budget-s``) ran out.
STATUSES: tuple[str, ...] = ("ok", "oom", "unsupported", "timeout", "wrong", "error", "skipped")
DTYPES: tuple[str, ...] = ("float16", "bfloat16", "float32", "float64")


def all_backends() -> list[str]:
    """The project's backends (from the registry), ``auto``, then the baselines."""
    return [*av.list_backends(), "auto", *BASELINES]


@dataclass(frozen=True)
class BenchConfig:
    """One measured configuration. ``window`` is set for ``sliding_window`` only and
    ``num_features`` for ``performer`` only (None elsewhere), so keys stay canonical."""

    variant: str
    backend: str
    seq_len: int
    device: str = "cpu"
    dtype: str = "float32"
    batch: int = 1
    heads: int = 4
    kv_heads: int = 4
    head_dim: int = 64
    causal: bool = False
    pass_: str = "fwd"
    window: int | None = None
    num_features: int | None = None

    def key(self) -> tuple:
        """Identity of the row (used by ``--resume`` and ``report --compare``)."""
        return dataclasses.astuple(self)

    def variant_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {}
        if self.window is not None:
            opts["window"] = self.window
        if self.num_features is not None:
            opts["num_features"] = self.num_features
        return opts

    def label(self) -> str:
        """Short human-readable name for progress bars and logs."""
        opt = f" w={self.window}" if self.window is not None else ""
        opt += f" m={self.num_features}" if self.num_features is not None else ""
        causal = " causal" if self.causal else ""
        return f"{self.variant}{opt}/{self.backend} N={self.seq_len} {self.dtype}{causal} {self.pass_}"

    def to_row(self) -> dict[str, Any]:
        row = dataclasses.asdict(self)
        row["pass"] = row.pop("pass_")
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> BenchConfig:
        def opt_int(x: Any) -> int | None:
            if x is None or x == "" or (isinstance(x, float) and math.isnan(x)):
                return None
            return int(x)

        causal = row["causal"]
        if isinstance(causal, str):
            causal = causal.strip().lower() in ("true", "1", "yes")
        return cls(
            variant=str(row["variant"]),
            backend=str(row["backend"]),
            seq_len=int(row["seq_len"]),
            device=str(row["device"]),
            dtype=str(row["dtype"]),
            batch=int(row["batch"]),
            heads=int(row["heads"]),
            kv_heads=int(row["kv_heads"]),
            head_dim=int(row["head_dim"]),
            causal=bool(causal),
            pass_=str(row["pass"]),
            window=opt_int(row.get("window")),
            num_features=opt_int(row.get("num_features")),
        )


@dataclass(frozen=True)
class BenchResult:
    """A config and what was measured. A failure is a row with a status and a reason;
    speed figures are None unless ``status == "ok"``."""

    config: BenchConfig
    status: str
    backend_used: str = ""
    time_ms: float | None = None
    time_ms_p10: float | None = None
    time_ms_p90: float | None = None
    repeats: int | None = None
    compile_s: float | None = None
    peak_mem_bytes: int | None = None
    flops: int | None = None
    tflops: float | None = None
    max_err: float | None = None
    grad_err: float | None = None
    err_bound: float | None = None
    approx_err: float | None = None
    checked_rows: int | None = None
    error: str = ""
    note: str = ""
    elapsed_s: float | None = None

    def to_row(self) -> dict[str, Any]:
        row = self.config.to_row()
        for f in dataclasses.fields(self):
            if f.name != "config":
                row[f.name] = getattr(self, f.name)
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> BenchResult:
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name == "config" or f.name not in row:
                continue
            x = row[f.name]
            if (isinstance(x, float) and math.isnan(x)) or x == "":
                x = None
            if f.name in ("error", "note", "backend_used", "status"):
                x = "" if x is None else str(x)
            elif x is not None and f.name in ("repeats", "peak_mem_bytes", "flops", "checked_rows"):
                x = int(x) if isinstance(x, int) or str(x).lstrip("-").isdigit() else int(float(x))
            elif x is not None:
                x = float(x)
            kwargs[f.name] = x
        return cls(config=BenchConfig.from_row(row), **kwargs)


# CSV column order: the required columns first, then the extras.
CONFIG_COLUMNS = [
    "variant",
    "backend",
    "device",
    "dtype",
    "batch",
    "heads",
    "kv_heads",
    "seq_len",
    "head_dim",
    "causal",
    "pass",
    "window",
    "num_features",
]
COLUMNS = [
    *CONFIG_COLUMNS,
    "status",
    "time_ms",
    "time_ms_p10",
    "time_ms_p90",
    "peak_mem_bytes",
    "flops",
    "tflops",
    "max_err",
    "error",
    "backend_used",
    "approx_err",
    "grad_err",
    "err_bound",
    "checked_rows",
    "compile_s",
    "repeats",
    "note",
    "elapsed_s",
]


@dataclass(frozen=True)
class RunSettings:
    """How to measure (not part of a row's identity)."""

    min_run_time: float = 0.2  # seconds per torch.utils.benchmark blocked_autorange
    min_repeats: int = 3  # at least this many timed calls, for the spread
    max_timed_s: float = 10.0  # long calls: stop adding repeats (beyond 2) once this much is timed
    timeout_s: float = 300.0  # per config, including compilation and the numerics gate
    mem_limit_gb: float = 4.0  # dense N x N work predicted above this is recorded as oom, not run
    check_elems: int = 1 << 26  # float64 reference elements per check (B*H*rows*Nk); rows are cut to fit
    seed: int = 0
    autotune_max: int = 0  # >0: the Triton autotuners try at most this many configs per kernel


@dataclass(frozen=True)
class AccuracyStudy:
    """Performer approximation error against exact softmax attention (not timed)."""

    seq_len: int = 1024
    head_dim: int = 64
    heads: int = 4
    num_features: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024)
    features_sharpness: float = 0.25  # logit standard deviation of the error-vs-features study
    sharpness: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0)
    sharpness_features: int = 256
    seeds: int = 4
    causal: tuple[bool, ...] = (False,)


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    groups: tuple[dict[str, Any], ...]
    settings: RunSettings = field(default_factory=RunSettings)
    accuracy: AccuracyStudy | None = None


GROUP_KEYS = {
    "variants",
    "backends",
    "seq_lens",
    "dtypes",
    "causal",
    "passes",
    "batch",
    "heads",
    "kv_heads",
    "head_dim",
    "window",
    "num_features",
    "device",
    "max_seq_len",
}


def _as_list(x: Any) -> list[Any]:
    return list(x) if isinstance(x, list | tuple) else [x]


def load_presets(text: str | None = None) -> dict[str, Preset]:
    """Parse ``presets.toml`` (shipped with the package) or the given TOML text."""
    if text is None:
        text = (Path(__file__).resolve().parent / "presets.toml").read_text()
    data = tomllib.loads(text)
    presets = {}
    for name, spec in data.get("presets", {}).items():
        groups = tuple(spec.get("groups", []))
        for g in groups:
            unknown = set(g) - GROUP_KEYS
            if unknown:
                known = ", ".join(sorted(GROUP_KEYS))
                raise ValueError(f"preset {name!r}: unknown group key(s) {sorted(unknown)}; known: {known}")
        settings = RunSettings(**spec.get("settings", {}))
        acc = spec.get("accuracy")
        accuracy = None
        if acc is not None:
            accuracy = AccuracyStudy(
                **{k: tuple(v) if isinstance(v, list) else v for k, v in acc.items()},
            )
        presets[name] = Preset(name, spec.get("description", ""), groups, settings, accuracy)
    return presets


def expand(groups: Iterable[dict[str, Any]], overrides: dict[str, Any] | None = None) -> list[BenchConfig]:
    """Cross product of each group (with ``overrides`` replacing group fields), deduplicated, in order.

    ``max_seq_len`` (a table backend -> N) caps the lengths of expensive backends, e.g. the
    dense ``reference`` builds the N x N matrix. Window only applies to ``sliding_window`` and
    the number of features only to ``performer``.
    """
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    seen: set[tuple] = set()
    out: list[BenchConfig] = []
    for group in groups:
        g = {**group, **overrides}
        caps = g.get("max_seq_len", {})
        # Backends vary fastest: the lines compared at one point are measured one after another, so a
        # sweep cut short by its time budget still holds whole comparisons.
        for variant, n, dtype, causal, pass_, batch, heads, head_dim, backend in itertools.product(
            _as_list(g.get("variants", av.list_variants())),
            _as_list(g.get("seq_lens", [1024])),
            _as_list(g.get("dtypes", ["float32"])),
            _as_list(g.get("causal", [False])),
            _as_list(g.get("passes", ["fwd"])),
            _as_list(g.get("batch", [1])),
            _as_list(g.get("heads", [4])),
            _as_list(g.get("head_dim", [64])),
            _as_list(g.get("backends", ["torch"])),
        ):
            if backend in caps and n > caps[backend]:
                continue
            windows = _as_list(g.get("window", [128])) if variant == "sliding_window" else [None]
            features = _as_list(g.get("num_features", [128])) if variant == "performer" else [None]
            kv_heads_list = _as_list(g.get("kv_heads", [None]))
            for window, m, kv in itertools.product(windows, features, kv_heads_list):
                cfg = BenchConfig(
                    variant=variant,
                    backend=backend,
                    seq_len=int(n),
                    device=str(g.get("device", "cpu")),
                    dtype=str(dtype),
                    batch=int(batch),
                    heads=int(heads),
                    kv_heads=int(heads if kv is None else kv),
                    head_dim=int(head_dim),
                    causal=bool(causal),
                    pass_=str(pass_),
                    window=None if window is None else int(window),
                    num_features=None if m is None else int(m),
                )
                if cfg.key() not in seen:
                    seen.add(cfg.key())
                    out.append(cfg)
    return out


def validate_names(variants: Sequence[str], backends: Sequence[str], passes: Sequence[str], dtypes: Sequence[str]):
    """ValueError naming the bad value and what exists, for CLI arguments."""
    for name in variants:
        av.variant_class(name)  # raises with the list of variants
    known = all_backends()
    for b in backends:
        if b not in known:
            raise ValueError(f"unknown backend {b!r}; backends are {', '.join(known)}")
    for p in passes:
        if p not in PASSES:
            raise ValueError(f"unknown pass {p!r}; passes are {', '.join(PASSES)}")
    for d in dtypes:
        if d not in DTYPES:
            raise ValueError(f"unknown dtype {d!r}; dtypes are {', '.join(DTYPES)}")
