"""Per-card tables of tuned launch configurations, read at launch (plain Python and JSON).

``attn-bench tune`` times the candidate configs of each kernel on a GPU and writes one JSON file
per card name (``tuned/<card>.json`` in this package, e.g. ``nvidia-h100-80gb-hbm3.json``)::

    {"format": 1, "card": "NVIDIA H100 80GB HBM3", "capability": "9.0", "versions": {...},
     "entries": {"flash_fwd": {"16bit/d128/full/wnone/n4096": {
         "config": {"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 3},
         "ratio": 0.81, "ms": ..., "default": "M128-N32-w8-s2", "default_ms": ...,
         "source_hash": "...", ...}}}}

A key names the launch shape the config serves (:func:`shape_key`): element size (``16bit``,
``float32``), padded head dim, causal or not, then the band bucket and the N bucket (softmax
kernels) or the padded feature count (FAVOR+ kernels, whose launches do not depend on N). Buckets
are powers of two, clamped. ``ratio`` is the chosen config's time over the heuristic default's,
measured in the same run; ``source_hash`` hashes the kernel module of the family, so an entry
made for other kernel code is ignored.

:func:`lookup` is what the config selectors call: once per (kernel, launch shape, device), it
returns the table's config, or None (the caller's heuristic) for a card without a table, a key
without an entry or a stale entry. It returns None on CPU, under ``TRITON_INTERPRET=1`` and when
``ATTN_TUNED_TABLES=0`` (or :func:`set_enabled`) turns the tables off for an A/B comparison.
``ATTN_TUNED_DIR`` names a folder searched before the package's own ``tuned/``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .env import interpreter_enabled
from .launch import KernelConfig, LaunchShape, pad_pow2

FORMAT = 1
TABLES_ENV = "ATTN_TUNED_TABLES"  # "0", "off", "no", "false": heuristics only
DIR_ENV = "ATTN_TUNED_DIR"  # a folder of tables searched before PACKAGE_DIR
PACKAGE_DIR = Path(__file__).resolve().parent / "tuned"
N_BUCKETS = (64, 65536)  # the N bucket: next power of two, clamped to this range
WINDOW_MAX = 8192  # band buckets above this one are merged into it

# The kernels a table holds, and the family (kernel module) each belongs to.
KERNEL_FAMILY = {
    "flash_fwd": "flash",
    "flash_bwd": "flash",  # one config serves both backward kernels (dq, dk/dv)
    "favor_key_max": "favor",
    "favor_state": "favor",
    "favor_fwd": "favor",
    "favor_bwd_dq": "favor",
    "favor_bwd_dkv": "favor",
    "favor_chunk_features": "favor_chunk",
    "favor_chunk_state": "favor_chunk",
    "favor_chunk_fwd": "favor_chunk",
    "favor_chunk_dq": "favor_chunk",
    "favor_chunk_dk": "favor_chunk",
    "favor_chunk_dv": "favor_chunk",
    "favor_chunk_state_bwd": "favor_chunk",
    "favor_impl": "favor_impl",  # which FAVOR+ implementation runs: an ImplChoice, not tiles
}
FAMILY_SOURCES = {
    "flash": ("flash_kernels.py",),
    "favor": ("favor_kernels.py",),
    "favor_chunk": ("favor_chunk_kernels.py",),
    "favor_impl": ("favor_kernels.py", "favor_chunk_kernels.py"),
}


def card_slug(name: str) -> str:
    """The file stem of a card's table: ``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"card name must be a non-empty string, got {name!r}")
    slug = re.sub(r"[^a-z0-9]+", "-", name.strip().lower()).strip("-")
    if not slug:
        raise ValueError(f"card name {name!r} has no letters or digits")
    return slug


def n_bucket(n: int) -> int:
    """The N bucket of a sequence length: the next power of two, clamped to :data:`N_BUCKETS`."""
    lo, hi = N_BUCKETS
    return min(hi, max(lo, 1 << max(0, n - 1).bit_length()))


def shape_key(kernel: str, shape: LaunchShape) -> str:
    """The table key of ``shape`` for ``kernel`` (see the module docstring)."""
    family = KERNEL_FAMILY.get(kernel)
    if family is None:
        raise ValueError(f"kernel must be one of {', '.join(KERNEL_FAMILY)}, got {kernel!r}")
    width = "float32" if shape.fp32 else "16bit"
    head = f"{width}/d{pad_pow2(shape.head_dim)}/{'causal' if shape.causal else 'full'}"
    if family.startswith("favor"):
        return f"{head}/m{shape.m_pad}"
    band = "none" if shape.window is None else str(min(WINDOW_MAX, pad_pow2(shape.window)))
    return f"{head}/w{band}/n{n_bucket(shape.n)}"


def source_hash(family: str) -> str:
    """A hash of the kernel module(s) of ``family`` (a key of :data:`FAMILY_SOURCES`): 16 hex digits."""
    if family not in FAMILY_SOURCES:
        raise ValueError(f"family must be one of {', '.join(FAMILY_SOURCES)}, got {family!r}")
    h = hashlib.sha256()
    for name in FAMILY_SOURCES[family]:
        h.update(name.encode())
        h.update((Path(__file__).resolve().parent / name).read_bytes())
    return h.hexdigest()[:16]


_TILE_FIELDS = ("block_m", "block_n", "num_warps", "num_stages")


@dataclass(frozen=True)
class ImplChoice:
    """What a switch between implementations of a kernel family picks (``favor_impl``: ``"chunk"``
    or ``"legacy"``): the tuner times each and a table entry's config is ``{"impl": name}``."""

    impl: str

    @property
    def name(self) -> str:
        return self.impl

    def __str__(self) -> str:
        return self.impl


def config_dict(cfg: KernelConfig | ImplChoice) -> dict[str, object]:
    """The JSON form of a config: an implementation choice's name, or the tiles and launch options,
    then any field the config's class adds (e.g. how the softmax kernels load their tiles)."""
    if isinstance(cfg, ImplChoice):
        return {"impl": cfg.impl}
    out: dict[str, object] = {name: getattr(cfg, name) for name in _TILE_FIELDS}
    out.update((f.name, getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.name not in _TILE_FIELDS)
    return out


def config_from_dict(
    data: Mapping[str, object], cls: type[KernelConfig] | type[ImplChoice] = KernelConfig
) -> KernelConfig | ImplChoice:
    """A config of class ``cls`` from its JSON form; ValueError names a missing or bad field. A
    field that ``cls`` adds to the tiles may be missing (its default then), never of another type."""
    if cls is ImplChoice:
        name = data.get("impl")
        if not isinstance(name, str) or not name:
            raise ValueError(f"config field 'impl' must be a non-empty string, got {name!r}")
        return ImplChoice(name)
    values: dict[str, object] = {}
    for name in _TILE_FIELDS:
        x = data.get(name)
        if not isinstance(x, int) or isinstance(x, bool) or x < 1:
            raise ValueError(f"config field {name!r} must be a positive int, got {x!r}")
        values[name] = x
    for name in ("block_m", "block_n", "num_warps"):
        if values[name] & (values[name] - 1):  # type: ignore[operator]
            raise ValueError(f"config field {name!r} must be a power of two, got {values[name]}")
    for f in dataclasses.fields(cls):
        if f.name in _TILE_FIELDS or f.name not in data:
            continue
        x = data[f.name]
        if type(x) is not type(f.default):
            raise ValueError(f"config field {f.name!r} must be a {type(f.default).__name__}, got {x!r}")
        values[f.name] = x
    return cls(**values)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


@dataclass
class Table:
    """One card's table: ``entries[kernel][key]`` is a dict with at least ``config`` and
    ``source_hash``; ``meta`` holds the rest of the file (card, capability, versions, ...)."""

    card: str
    entries: dict[str, dict[str, dict]] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    malformed: list[str] = field(default_factory=list)
    """``kernel/key`` of the file's entries that were not objects with a ``config`` object: left
    out when read (their shapes get the heuristic), and counted as stale, so a tuner redoes them."""

    @property
    def slug(self) -> str:
        return card_slug(self.card)

    def entry(self, kernel: str, key: str) -> dict | None:
        return self.entries.get(kernel, {}).get(key)

    def put(self, kernel: str, key: str, entry: dict) -> None:
        if kernel not in KERNEL_FAMILY:
            raise ValueError(f"kernel must be one of {', '.join(KERNEL_FAMILY)}, got {kernel!r}")
        if "config" not in entry or "source_hash" not in entry:
            raise ValueError("a table entry needs 'config' and 'source_hash'")
        self.entries.setdefault(kernel, {})[key] = dict(entry)

    def stale(self, hashes: Mapping[str, str] | None = None) -> list[tuple[str, str]]:
        """``(kernel, key)`` of the entries made for other kernel sources than today's."""
        hashes = hashes or {f: source_hash(f) for f in FAMILY_SOURCES}
        stale = [
            (kernel, key)
            for kernel, keys in self.entries.items()
            for key, e in keys.items()
            if e.get("source_hash") != hashes.get(KERNEL_FAMILY.get(kernel, ""))
        ]
        return stale + [tuple(name.split("/", 1)) for name in self.malformed]

    def to_json(self) -> dict:
        return {"format": FORMAT, "card": self.card, **self.meta, "entries": self.entries}

    @classmethod
    def from_json(cls, data: object) -> Table:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            got = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"not a tuning table of format {FORMAT} (format: {got!r})")
        entries = data.get("entries")
        if not isinstance(entries, dict) or not all(isinstance(v, dict) for v in entries.values()):
            raise ValueError("a tuning table needs an 'entries' object of kernel -> key -> entry")
        meta = {k: v for k, v in data.items() if k not in ("format", "card", "entries")}
        kept: dict[str, dict[str, dict]] = {}
        malformed = []
        for kernel, keys in entries.items():
            for key, entry in keys.items():
                if isinstance(entry, dict) and isinstance(entry.get("config"), dict):
                    kept.setdefault(kernel, {})[key] = dict(entry)
                else:
                    malformed.append(f"{kernel}/{key}")
        return cls(str(data.get("card", "")), kept, meta, malformed)

    def write(self, folder: Path) -> Path:
        """Write ``folder/<card slug>.json`` (through a temporary file, so a reader never sees half
        a table); returns the path."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{self.slug}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def read(cls, path: Path) -> Table:
        """The table in ``path``; ValueError (or OSError) when it cannot be used as a table."""
        try:
            data = json.loads(Path(path).read_text())
        except RecursionError:
            raise ValueError("JSON nested too deeply to be a tuning table") from None
        return cls.from_json(data)


def table_dirs() -> list[Path]:
    """Where tables are looked for, first match wins: ``$ATTN_TUNED_DIR``, then the package's."""
    extra = os.environ.get(DIR_ENV, "").strip()
    return [Path(extra), PACKAGE_DIR] if extra else [PACKAGE_DIR]


def find_table(card: str, dirs: list[Path] | None = None) -> Path | None:
    """The path of ``card``'s table, or None."""
    for d in dirs or table_dirs():
        path = Path(d) / f"{card_slug(card)}.json"
        if path.is_file():
            return path
    return None


def table_status(card: str, dirs: list[Path] | None = None) -> tuple[str, Path | None]:
    """``("missing" | "unreadable" | "stale" | "fresh", path)`` of ``card``'s table: stale when an
    entry was made for other kernel sources than today's."""
    path = find_table(card, dirs)
    if path is None:
        return "missing", None
    try:
        table = Table.read(path)
    except (OSError, ValueError):
        return "unreadable", path
    return ("stale" if table.stale() else "fresh"), path


# ---------------------------------------------------------------------------------------------
# Lookup (what the config selectors call)
# ---------------------------------------------------------------------------------------------

_FORCED: dict[str, KernelConfig | ImplChoice] = {}
_SEEN: set[tuple[str, LaunchShape]] = set()
_CACHE: dict[tuple, KernelConfig | ImplChoice | None] = {}
_TABLES: dict[str, Table | None] = {}
_CARDS: dict[int, str | None] = {}
_ENABLED: list[bool | None] = [None]  # set_enabled's word; None: follow TABLES_ENV
_ENV_ENABLED: list[bool | None] = [None]  # TABLES_ENV as read at the first lookup
_GENERATION = [0]  # bumped whenever the config a launch shape gets may change


def generation() -> int:
    """A number that changes whenever :func:`forced`, :func:`set_enabled` or :func:`reset` may
    change the config a launch shape gets: callers that cache configs key their cache by it."""
    return _GENERATION[0]


def forced_config(kernel: str, shape: LaunchShape) -> KernelConfig | ImplChoice | None:
    """The config :func:`forced` sets for ``kernel`` (any device, the interpreter included), or None."""
    if not _FORCED:
        return None
    cfg = _FORCED.get(kernel)
    if cfg is not None:
        _SEEN.add((kernel, shape))
    return cfg


@contextlib.contextmanager
def forced(configs: Mapping[str, KernelConfig | ImplChoice]) -> Iterator[list[tuple[str, LaunchShape]]]:
    """Within the block, launch ``configs[kernel]`` for every shape (the tuner's way to run one
    candidate). Yields a list that, once the block ends, holds each distinct ``(kernel, launch
    shape)`` that took a forced config."""
    unknown = sorted(set(configs) - set(KERNEL_FAMILY))
    if unknown:
        raise ValueError(f"unknown kernel(s) {', '.join(unknown)}; kernels are {', '.join(KERNEL_FAMILY)}")
    saved, saved_seen = dict(_FORCED), set(_SEEN)
    seen: list[tuple[str, LaunchShape]] = []
    _FORCED.clear()
    _FORCED.update(configs)
    _SEEN.clear()
    _GENERATION[0] += 1
    try:
        yield seen
    finally:
        seen.extend(sorted(_SEEN, key=repr))
        _SEEN.clear()
        _SEEN.update(saved_seen)
        _FORCED.clear()
        _FORCED.update(saved)
        _GENERATION[0] += 1


def set_enabled(enabled: bool | None) -> None:
    """Turn the tables on or off in this process (None: follow ``ATTN_TUNED_TABLES`` again)."""
    _ENABLED[0] = enabled
    _CACHE.clear()
    _GENERATION[0] += 1


def tables_enabled() -> bool:
    """Whether :func:`lookup` reads tables: :func:`set_enabled`'s word, else ``ATTN_TUNED_TABLES``
    as it was at the first lookup since the last :func:`reset`."""
    if _ENABLED[0] is not None:
        return bool(_ENABLED[0])
    if _ENV_ENABLED[0] is None:
        _ENV_ENABLED[0] = os.environ.get(TABLES_ENV, "1").strip().lower() not in ("0", "off", "no", "false")
    return _ENV_ENABLED[0]


def reset() -> None:
    """Forget the cached cards, tables, lookups and ``ATTN_TUNED_TABLES`` (after a table was
    written, or the environment changed)."""
    _CACHE.clear()
    _TABLES.clear()
    _CARDS.clear()
    _ENV_ENABLED[0] = None
    _GENERATION[0] += 1


def _current_card() -> tuple[int, str | None]:
    """``(device index, card name)`` of the current CUDA device; ``(-1, None)`` without CUDA."""
    import torch

    if -1 not in _CARDS:  # whether CUDA is there at all, asked once
        _CARDS[-1] = "" if torch.cuda.is_available() else None
    if _CARDS[-1] is None:
        return -1, None
    index = torch.cuda.current_device()
    if index not in _CARDS:
        _CARDS[index] = torch.cuda.get_device_name(index)
    return index, _CARDS[index]


def _table_for(card: str) -> Table | None:
    slug = card_slug(card)
    if slug not in _TABLES:
        path = find_table(card)
        table = None
        if path is not None:
            try:
                table = Table.read(path)
            except (OSError, ValueError) as exc:
                table = None  # an unreadable table is no table: the heuristics run
                warnings.warn(f"tuning table {path} is unreadable ({exc}); the heuristic configs run", stacklevel=3)
            if table is not None and table.malformed:
                bad = ", ".join(table.malformed[:3]) + (" ..." if len(table.malformed) > 3 else "")
                warnings.warn(
                    f"tuning table {path}: {len(table.malformed)} malformed entries ({bad}) ignored; "
                    "their shapes run the heuristic configs",
                    stacklevel=3,
                )
        _TABLES[slug] = table
    return _TABLES[slug]


def table_config(
    table: Table, kernel: str, shape: LaunchShape, cls: type[KernelConfig] | type[ImplChoice] = KernelConfig
) -> KernelConfig | ImplChoice | None:
    """The config ``table`` holds for ``kernel`` at ``shape``, or None (no entry, stale, malformed)."""
    entry = table.entry(kernel, shape_key(kernel, shape))
    if entry is None or entry.get("source_hash") != source_hash(KERNEL_FAMILY[kernel]):
        return None
    try:
        return config_from_dict(entry["config"], cls)
    except (ValueError, TypeError, AttributeError):
        return None


def lookup(
    kernel: str,
    shape: LaunchShape,
    cls: type[KernelConfig] | type[ImplChoice] = KernelConfig,
    allowed: Callable[[KernelConfig], bool] | None = None,
) -> KernelConfig | ImplChoice | None:
    """The tuned config of ``kernel`` for ``shape`` on the current CUDA device, or None: then the
    caller's heuristic runs. ``allowed`` (the caller's candidate list) must accept the table's
    config, so a hand-edited or foreign table cannot launch a config the project does not ship.
    Cached per (kernel, shape, device); never consulted on CPU, under the interpreter or with
    the tables turned off."""
    if interpreter_enabled() or not tables_enabled():
        return None
    index, card = _current_card()
    if card is None:
        return None
    ck = (kernel, shape, index, cls)
    try:
        return _CACHE[ck]
    except KeyError:
        pass
    table = _table_for(card)
    cfg = None if table is None else table_config(table, kernel, shape, cls)
    if cfg is not None and allowed is not None and not allowed(cfg):
        cfg = None
    _CACHE[ck] = cfg
    return cfg


__all__ = [
    "DIR_ENV",
    "FORMAT",
    "KERNEL_FAMILY",
    "ImplChoice",
    "PACKAGE_DIR",
    "TABLES_ENV",
    "Table",
    "card_slug",
    "config_dict",
    "config_from_dict",
    "find_table",
    "forced",
    "forced_config",
    "lookup",
    "n_bucket",
    "reset",
    "set_enabled",
    "shape_key",
    "source_hash",
    "table_config",
    "table_dirs",
    "table_status",
    "tables_enabled",
]
