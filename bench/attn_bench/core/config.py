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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from attn_bench.core.parse import cell_text, parse_bool, parse_count, parse_device, parse_name, parse_option

if TYPE_CHECKING:
    import attention_variants as av


def _registry() -> Any:
    """``attention_variants``, imported when first used: it imports torch, which `attn-bench --help` does without."""
    import attention_variants

    return attention_variants


# ``decode``: per-token cost of generation from the variant's incremental state (bench/attn_bench/decode/run.py).
PASSES: tuple[str, ...] = ("fwd", "fwd_bwd", "decode")
# ``skipped``: not reached before the sweep's time budget (``--budget-s``) ran out.
STATUSES: tuple[str, ...] = ("ok", "oom", "unsupported", "timeout", "wrong", "error", "skipped")
DTYPES: tuple[str, ...] = ("float16", "bfloat16", "float32", "float64")


def all_backends() -> list[str]:
    """The project's backends (from the registry), ``auto``, then the baselines and peers."""
    from attn_bench.baselines.registry import baseline_names

    return [*_registry().list_backends(), "auto", *baseline_names()]


class ConfigError(ValueError):
    """A config whose fields do not make a runnable row; ``key`` is the preset key (and, as
    ``--key``, the ``attn-bench sweep`` option) at fault."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def _field(
    group: str,
    default: list,
    parse: Callable[[Any], Any],
    help: str,
    value: Any = MISSING,
    column: str | None = None,
    alias: str | None = None,
) -> Any:
    """A config field's declaration: its preset key (``group``, a list), the list a sweep uses when
    a preset gives none, its parser, help text, the dataclass default ``value`` and its CSV column
    (default: the field name); ``alias``: a second command-line spelling of the group key."""
    meta = {"group": group, "default": default, "parse": parse, "help": help, "column": column, "alias": alias}
    return field(default=value, metadata=meta)


@dataclass(frozen=True)
class BenchConfig:
    """One measured configuration. Each field is declared once, here: the CSV columns, the preset
    keys, the ``attn-bench sweep`` options and the parsing of rows are derived from these
    declarations. ``options`` holds the variant's own sweep options (e.g. ``(("window", 128),)``,
    declared by the variant as :class:`attention_variants.SweepOption`), each its own column."""

    variant: str = _field("variants", [], parse_name, "comma list of variants [default: all]")
    backend: str = _field("backends", ["torch"], parse_name, "comma list of backends (`attn-bench list`)")
    seq_len: int = _field("seq_lens", [1024], parse_count, "comma list of sequence lengths, e.g. 256,1024,4096")
    device: str = _field("device", ["cpu"], parse_device, "cpu or cuda", "cpu")
    dtype: str = _field(
        "dtypes", ["float32"], parse_name, "comma list of float32,float16,bfloat16,float64", "float32", alias="dtype"
    )
    batch: int = _field("batch", [1], parse_count, "comma list of batch sizes B", 1)
    heads: int = _field("heads", [4], parse_count, "comma list of query head counts H", 4)
    # None (the default) becomes ``heads``: one key/value head per query head.
    kv_heads: int = _field("kv_heads", [None], parse_count, "comma list of key/value head counts [default: H]", None)
    head_dim: int = _field("head_dim", [64], parse_count, "comma list of head dims", 64)
    causal: bool = _field("causal", [False], parse_bool, "comma list of true,false", False)
    pass_: str = _field("passes", ["fwd"], parse_name, "comma list of fwd,fwd_bwd,decode", "fwd", column="pass")
    options: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        if self.kv_heads is None:
            object.__setattr__(self, "kv_heads", self.heads)
        problem = config_problem(self)
        if problem is not None:
            raise ConfigError(*problem)

    def key(self) -> tuple:
        """Identity of the row (used by ``--resume`` and ``report --compare``)."""
        return dataclasses.astuple(self)

    def variant_options(self) -> dict[str, Any]:
        return dict(self.options)

    def option(self, name: str) -> int | None:
        return dict(self.options).get(name)

    def label(self) -> str:
        """Short human-readable name for progress bars and logs."""
        labels = {o.name: o.label for o in sweep_options()}
        opt = "".join(f" {labels.get(k, k)}={v}" for k, v in self.options)
        causal = " causal" if self.causal else ""
        return f"{self.variant}{opt}/{self.backend} N={self.seq_len} {self.dtype}{causal} {self.pass_}"

    def to_row(self) -> dict[str, Any]:
        row = {column(f): getattr(self, f.name) for f in config_fields()}
        row.update(dict.fromkeys(option_columns()))  # every option column, empty where it does not apply
        row.update(self.options)
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> BenchConfig:
        """Parse a CSV row (or a dict of strings); ValueError naming the column on a bad value."""
        kwargs: dict[str, Any] = {}
        for f in config_fields():
            col = column(f)
            if col not in row:
                raise ValueError(f"missing column {col!r}")
            try:
                kwargs[f.name] = f.metadata["parse"](row[col])
            except ValueError as exc:
                raise ValueError(f"column {col!r}: {exc}") from None
        options = []
        for o in _variant_sweep_options(kwargs["variant"]):
            x = row.get(o.name)
            if x is None or cell_text(x) in ("", "-1"):
                continue
            try:
                options.append((o.name, parse_option(x)))
            except ValueError as exc:
                raise ValueError(f"column {o.name!r}: {exc}") from None
        return cls(**kwargs, options=tuple(options))


MAX_ELEMENTS = 2**63 - 1
"""The most elements a PyTorch tensor can index (int64 sizes and strides)."""


def config_problem(cfg: BenchConfig) -> tuple[str, str] | None:
    """``(key, message)`` of what makes ``cfg`` not runnable, or None: ``heads`` not a multiple of
    ``kv_heads``, or variant options the variant's constructor refuses (e.g. ``num_features=0``).
    A variant that is not registered here (a plug-in's, in a results file) is not checked."""
    if cfg.heads % cfg.kv_heads:
        return "kv_heads", f"heads {cfg.heads} is not a multiple of kv_heads {cfg.kv_heads}"
    sizes = {"seq_lens": cfg.seq_len, "batch": cfg.batch, "heads": cfg.heads, "head_dim": cfg.head_dim}
    elements = math.prod(sizes.values())
    if elements > MAX_ELEMENTS:
        key = max(sizes, key=lambda k: sizes[k])
        return key, (
            f"{key} {sizes[key]} makes q hold B*H*N*D = {elements:.3g} elements, more than a tensor "
            f"can index ({MAX_ELEMENTS:.3g})"
        )
    try:
        cls = _registry().variant_class(cfg.variant)
    except ValueError:
        return None
    try:
        _registry().get_variant(cfg.variant, **{**cls.sweep_defaults(), **dict(cfg.options)})
    except (ValueError, TypeError) as exc:
        names = [k for k, _ in cfg.options if k in str(exc)] or [k for k, _ in cfg.options] or ["variants"]
        return names[0], f"{cfg.variant}: {exc}"
    return None


def config_fields() -> list[dataclasses.Field]:
    """The declared fields of :class:`BenchConfig` (all but ``options``), in column order."""
    return [f for f in dataclasses.fields(BenchConfig) if f.name != "options"]


def column(f: dataclasses.Field) -> str:
    return f.metadata["column"] or f.name


def sweep_options() -> list[av.SweepOption]:
    """Every registered variant's sweep options, one per name, in registration order."""
    seen: dict[str, av.SweepOption] = {}
    for name in _registry().list_variants():
        for o in _registry().variant_class(name).sweep_options:
            seen.setdefault(o.name, o)
    return list(seen.values())


def _variant_sweep_options(variant: str) -> tuple[av.SweepOption, ...]:
    try:
        return _registry().variant_class(variant).sweep_options
    except ValueError:
        return ()


def option_columns() -> list[str]:
    """CSV columns of the variants' sweep options (``window``, ``num_features``, plug-ins' own)."""
    return [o.name for o in sweep_options()]


def result_row(result: Any) -> dict[str, Any]:
    """One CSV row of a result dataclass: its ``config``'s row, then its other fields in order
    (sweep, task and model results alike)."""
    row = result.config.to_row()
    for f in dataclasses.fields(result):
        if f.name != "config":
            row[f.name] = getattr(result, f.name)
    return row


_TEXT_RESULT_FIELDS = ("error", "note", "backend_used", "status", "node", "device_name", "device_uuid", "driver")
_INT_RESULT_FIELDS = ("repeats", "peak_mem_bytes", "flops", "checked_rows", "remeasured", "gpu_others")


@dataclass(frozen=True)
class BenchResult:
    """A config and what was measured. A failure is a row with a status and a reason;
    speed figures are None unless ``status == "ok"``."""

    config: BenchConfig
    status: str
    time_ms: float | None = None
    time_ms_p10: float | None = None
    time_ms_p90: float | None = None
    peak_mem_bytes: int | None = None
    flops: int | None = None
    tflops: float | None = None
    max_err: float | None = None
    error: str = ""
    backend_used: str = ""
    approx_err: float | None = None
    semantic_dev: float | None = None  # a peer's own float64 math against ours (its documented deviation)
    grad_err: float | None = None
    err_bound: float | None = None
    checked_rows: int | None = None
    compile_s: float | None = None
    repeats: int | None = None
    note: str = ""
    elapsed_s: float | None = None
    prefill_ms: float | None = None  # decode rows: filling the state with the seq_len-token prompt
    tokens_per_s: float | None = None  # decode rows: batch / per-token time
    spread: float | None = None  # noise (core/measure.py): (p90 - p10) / median, then the load while timed
    noisy: bool | None = None  # still disturbed after re-measuring: left out of fits
    remeasured: int | None = None  # times measured again because the spread or the load was over
    other_cpu: float | None = None  # other processes' share of the CPUs this row ran on (0..1)
    load_avg: float | None = None  # 1-minute load average
    gpu_clock_mhz: float | None = None  # SM clock right after timing (CUDA)
    gpu_others: int | None = None  # other processes on the GPU (CUDA)
    # Where the row ran (core/machine.py, device_identity): a run over several cards is a set of per-card results
    node: str = ""
    device_name: str = ""  # the GPU's name, or the CPU's model
    device_uuid: str = ""
    driver: str = ""

    def to_row(self) -> dict[str, Any]:
        return result_row(self)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> BenchResult:
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name == "config" or f.name not in row:
                continue
            x = row[f.name]
            if (isinstance(x, float) and math.isnan(x)) or x == "":
                x = None
            if f.name in _TEXT_RESULT_FIELDS:
                x = "" if x is None else str(x)
            elif x is not None and f.name == "noisy":
                x = parse_bool(x)
            elif x is not None and f.name in _INT_RESULT_FIELDS:
                x = int(x) if isinstance(x, int) or str(x).lstrip("-").isdigit() else int(float(x))
            elif x is not None:
                x = float(x)
            kwargs[f.name] = x
        return cls(config=BenchConfig.from_row(row), **kwargs)


def config_columns() -> list[str]:
    """CSV columns of a config: the declared fields, then the registered variants' sweep options."""
    return [*(column(f) for f in config_fields()), *option_columns()]


def result_columns() -> list[str]:
    """All CSV columns of ``results.csv``, in order: the config's, then :class:`BenchResult`'s fields."""
    return [*config_columns(), *(f.name for f in dataclasses.fields(BenchResult) if f.name != "config")]


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
    plugins: tuple[str, ...] = ()  # modules or .py files the worker imports (user variants / backends)
    # Re-measure a row up to ``remeasure`` times, then mark it noisy, while its spread or load is over (measure.py)
    remeasure: int = 2
    noisy_spread: float = 0.25
    busy_share: float = 0.25

    def __post_init__(self) -> None:
        for name, ok in (("remeasure", type(self.remeasure) is int and self.remeasure >= 0),
                         ("noisy_spread", self.noisy_spread > 0), ("busy_share", self.busy_share > 0)):  # fmt: skip
            if not ok:
                raise ValueError(f"settings: {name} must be {'an int >= 0' if name == 'remeasure' else '> 0'}")


def approximating_variant() -> str:
    """The first registered variant that approximates another (the accuracy study's default)."""
    av = _registry()
    return next((v for v in av.list_variants() if av.variant_class(v).approximates), "")


@dataclass(frozen=True)
class AccuracyStudy:
    """A random-feature variant's approximation error against the exact attention it approximates,
    against its feature count and the sharpness of the attention (not timed). ``variant`` takes
    ``num_features``, ``ortho`` and ``seed`` (the Performer's options)."""

    variant: str = field(default_factory=approximating_variant)
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


def group_keys() -> set[str]:
    """Keys a preset group may hold: the declared fields' keys, the variants' sweep options, and
    ``max_seq_len`` (a table backend -> largest N)."""
    return {*(f.metadata["group"] for f in config_fields()), *option_columns(), "max_seq_len"}


def _as_list(x: Any) -> list[Any]:
    return list(x) if isinstance(x, list | tuple) else [x]


def load_presets(text: str | None = None) -> dict[str, Preset]:
    """Parse ``presets.toml`` (shipped with the package) or the given TOML text."""
    if text is None:
        text = (Path(__file__).resolve().parents[1] / "sweep" / "presets.toml").read_text()
    data = tomllib.loads(text)
    presets = {}
    for name, spec in data.get("presets", {}).items():
        groups = tuple(spec.get("groups", []))
        for g in groups:
            unknown = set(g) - group_keys()
            if unknown:
                known = ", ".join(sorted(group_keys()))
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

    Fields vary in their declared order, with the backend fastest: the lines compared at one point
    are measured one after another, so a sweep cut short by its time budget still holds whole
    comparisons. A variant's sweep options apply to that variant only (default: the option's
    declared default). ``kv_heads`` defaults to H. ``max_seq_len`` (a table backend -> N) caps the
    lengths of expensive backends, e.g. the dense ``reference`` builds the N x N matrix.
    """
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    fields = [f for f in config_fields() if f.name != "backend"]
    seen: set[tuple] = set()
    out: list[BenchConfig] = []
    for group in groups:
        g = {**group, **overrides}
        caps = g.get("max_seq_len", {})
        every = _registry().list_variants()
        lists = [_as_list(g.get(f.metadata["group"], f.metadata["default"] or every)) for f in fields]
        for values in itertools.product(*lists):
            base = {f.name: None if x is None else f.metadata["parse"](x) for f, x in zip(fields, values, strict=True)}
            if base["kv_heads"] is None:  # the default: one key/value head per query head
                base["kv_heads"] = base["heads"]
            declared = _variant_sweep_options(base["variant"])
            option_lists = [[(o.name, parse_option(x)) for x in _as_list(g.get(o.name, o.default))] for o in declared]
            for options in itertools.product(*option_lists):
                for backend in _as_list(g.get("backends", ["torch"])):
                    if backend in caps and base["seq_len"] > caps[backend]:
                        continue
                    cfg = BenchConfig(**base, backend=str(backend), options=tuple(options))
                    if cfg.key() not in seen:
                        seen.add(cfg.key())
                        out.append(cfg)
    return out


def name_problems(
    variants: Sequence[str], backends: Sequence[str], passes: Sequence[str], dtypes: Sequence[str]
) -> list[tuple[str, str]]:
    """``(key, message)`` for each unknown name, the message naming it and what exists."""
    problems = []
    for name in variants:
        try:
            _registry().variant_class(name)
        except ValueError as exc:
            problems.append(("variants", str(exc)))
    known = all_backends()
    problems += [
        ("backends", f"unknown backend {b!r}; backends are {', '.join(known)}") for b in backends if b not in known
    ]
    problems += [("passes", f"unknown pass {p!r}; passes are {', '.join(PASSES)}") for p in passes if p not in PASSES]
    problems += [("dtypes", f"unknown dtype {d!r}; dtypes are {', '.join(DTYPES)}") for d in dtypes if d not in DTYPES]
    return problems


def validate_names(variants: Sequence[str], backends: Sequence[str], passes: Sequence[str], dtypes: Sequence[str]):
    """ValueError naming the first unknown name and what exists, for CLI arguments."""
    for _, message in name_problems(variants, backends, passes, dtypes):
        raise ValueError(message)
