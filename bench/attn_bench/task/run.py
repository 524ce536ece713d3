"""``attn-bench task``: train small models with each variant on synthetic tasks, through the sweep's
machinery (a :class:`~attn_bench.core.worker.WorkerPool` with its timeout, rows rewritten atomically to
``results.csv`` after each run, ``metadata.json``, resume that skips finished runs).

A run is a :class:`TaskConfig` (task, variant and its options, N, seed, model and training
sizes); its row is the config plus what :func:`attn_bench.task.train.train` measured. Presets live in
``task_presets.toml``: each is a list of groups, each group a cross product of variants (with the
sweep options they declare, so plug-in variants train the same way), lengths and seeds;
``--variants`` replaces every group's variants. A variant that lacks what a run needs (see
:meth:`TaskConfig.needs`) gets an ``unsupported`` row with the reason.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import attention_variants as av
from attn_bench.core.config import RunSettings, result_row
from attn_bench.core.lifecycle import pool_lifecycle
from attn_bench.core.machine import now
from attn_bench.core.results import (
    METADATA,
    WORKER_LOG,
    _read_metadata,
    atomic_write,
    prepare_run_dir,
    read_job_rows,
    remove_stale_temp_files,
    rows_to_csv,
    write_metadata,
)

RESULTS = "results.csv"
TASK_STATUSES = ("ok", "timeout", "oom", "error", "skipped", "unsupported")
CURVE_POINTS = 60  # loss-curve points kept per run


@dataclass(frozen=True)
class TaskConfig:
    """One training run; every field is part of its identity (resume skips a finished one)."""

    task: str
    variant: str
    seq_len: int
    seed: int
    options: tuple[tuple[str, int], ...] = ()
    params: tuple[tuple[str, int], ...] = ()  # the task generator's parameters
    steps: int = 300
    batch: int = 16
    d_model: int = 32
    heads: int = 2
    layers: int = 2
    conv: int = 3
    lr: float = 3e-3
    train_size: int = 2000
    test_size: int = 256
    eval_every: int = 50
    target_acc: float = 0.5
    device: str = "cpu"
    threads: int = 0  # torch intra-op threads of the worker (0: torch's default)

    def key(self) -> tuple:
        return dataclasses.astuple(self)

    def label(self) -> str:
        opt = "".join(f" {k}={v}" for k, v in self.options)
        return f"{self.task} {self.variant}{opt} N={self.seq_len} seed={self.seed}"

    def needs(self) -> list[tuple[str, str]]:
        """``(variant, need)`` pairs this run asks of the registry (:data:`attention_variants.NEEDS`):
        the task's model is a causal decoder or an encoder."""
        from attn_bench.task.tasks import CAUSAL

        return [(self.variant, "causal" if CAUSAL[self.task] else "non_causal")]

    def unsupported(self) -> str | None:
        """Why this run cannot be done with its variant (from what the variant declares), or None."""
        from attn_bench.core.variants import unsupported

        for variant, need in self.needs():
            opts = _variant_options(self) if variant == self.variant else {}
            reason = unsupported(variant, opts, [need])
            if reason is not None:
                return reason
        return None

    def to_row(self) -> dict[str, Any]:
        row = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        row["options"] = json.dumps(dict(self.options), sort_keys=True)
        row["params"] = json.dumps(dict(self.params), sort_keys=True)
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> TaskConfig:
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            x = row[f.name]
            if f.name in ("options", "params"):
                d = json.loads(x) if isinstance(x, str) else dict(x)
                kwargs[f.name] = tuple(sorted((str(k), int(v)) for k, v in d.items()))
            elif f.type in ("int",):
                kwargs[f.name] = int(float(x))
            elif f.type in ("float",):
                kwargs[f.name] = float(x)
            else:
                kwargs[f.name] = str(x)
        return cls(**kwargs)


@dataclass(frozen=True)
class TaskResult:
    """A run's config and what it measured (metrics None unless ``status == "ok"``)."""

    config: TaskConfig
    status: str
    error: str = ""
    elapsed_s: float | None = None
    final_acc: float | None = None
    best_acc: float | None = None
    chance_acc: float | None = None
    train_s: float | None = None
    time_to_target_s: float | None = None
    tokens_per_s: float | None = None
    peak_mem_bytes: float | None = None
    final_loss: float | None = None
    approx_err: float | None = None
    loss_curve: str = ""  # JSON [[step, loss], ...]
    eval_curve: str = ""  # JSON [[step, train_s, acc], ...]

    config_cls: ClassVar[type] = TaskConfig  # a subclass with a wider config names its own

    def to_row(self) -> dict[str, Any]:
        return result_row(self)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> TaskResult:
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name == "config":
                continue
            x = row.get(f.name)
            if f.type == "float | None":
                kwargs[f.name] = None if x in (None, "") or (isinstance(x, float) and math.isnan(x)) else float(x)
            else:
                kwargs[f.name] = str(x or "")
        return cls(config=cls.config_cls.from_row(row), **kwargs)


def result_columns(result_cls: type[TaskResult] = TaskResult) -> list[str]:
    cfg = [f.name for f in dataclasses.fields(result_cls.config_cls)]
    return [*cfg, *(f.name for f in dataclasses.fields(result_cls) if f.name != "config")]


# -- one run, in the worker -----------------------------------------------------------------------


def _variant_options(cfg: TaskConfig) -> dict[str, Any]:
    opts: dict[str, Any] = dict(cfg.options)
    for o in av.variant_class(cfg.variant).sweep_options:  # the declared defaults (as a sweep does)
        opts.setdefault(o.name, o.default)
    if "seed" in av.variant_class(cfg.variant).option_names():  # random features: drawn from the run's seed
        opts.setdefault("seed", cfg.seed)
    return opts


def attention_error(model: Any, ids: Any) -> float:
    """Mean over layers of ``|attn(q,k,v) - softmax(q,k,v)| / |softmax(q,k,v)|`` (Frobenius), on the
    trained model's own queries, keys and values: how far the variant is from exact attention."""
    import torch
    import torch.nn.functional as F

    errs = []
    with torch.no_grad():
        x = model.embed(ids) + model.pos[: ids.shape[1]]
        for block in model.blocks:
            if block.conv is not None:
                x = x + block.conv(x.transpose(1, 2))[..., : x.shape[1]].transpose(1, 2)
            layer = block.attn
            h = block.norm1(x)
            b, n, _ = h.shape
            q, k, v = (
                p(h).view(b, n, -1, layer.head_dim).transpose(1, 2) for p in (layer.q_proj, layer.k_proj, layer.v_proj)
            )
            got = layer.attn(q, k, v, causal=layer.causal, backend=layer.backend)
            exact = F.scaled_dot_product_attention(q, k, v, is_causal=layer.causal)
            errs.append(float((got - exact).norm() / exact.norm()))
            x = x + layer.out_proj(got.transpose(1, 2).reshape(b, n, -1))
            x = x + block.mlp(block.norm2(x))
    return sum(errs) / len(errs)


@functools.lru_cache(maxsize=4)
def _task_data(task: str, count: int, seq_len: int, seed: int, params: tuple[tuple[str, int], ...]) -> Any:
    """The task's examples, shared by the variants of one seed (the generators are deterministic)."""
    from attn_bench.task.tasks import make_task

    return make_task(task, count, seq_len, seed, **dict(params))


def train_config(cfg: TaskConfig, model: Any, tr: Any, te: Any, progress: Callable[..., None] | None) -> Any:
    """:func:`attn_bench.task.train.train` with ``cfg``'s training fields, reporting about 50 progress ticks."""
    from attn_bench.task.train import train

    every = max(1, cfg.steps // 50)

    def tick(step: int, steps: int, loss: float) -> None:
        if progress is not None and (step % every == 0 or step == steps):
            progress(step, steps, loss)

    return train(
        model, tr, te, steps=cfg.steps, batch=cfg.batch, lr=cfg.lr, eval_every=cfg.eval_every,
        target_acc=cfg.target_acc, seed=cfg.seed, device=cfg.device, progress=tick,
    )  # fmt: skip


def run_task(cfg: TaskConfig, progress: Callable[..., None] | None = None) -> TaskResult:
    """Generate the task's data from ``cfg.seed``, train, and measure."""
    import torch

    from attn_bench.task.tasks import IGNORE
    from attn_bench.task.train import TaskModel

    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    data = _task_data(cfg.task, cfg.train_size + cfg.test_size, cfg.seq_len, 1000 + cfg.seed, cfg.params)
    split = cfg.train_size
    tr = dataclasses.replace(data, inputs=data.inputs[:split], labels=data.labels[:split])
    te = dataclasses.replace(data, inputs=data.inputs[split:], labels=data.labels[split:])
    labelled = te.labels[te.labels != IGNORE]
    chance = float(torch.bincount(labelled).max()) / max(1, labelled.numel())
    model = TaskModel(
        data.vocab_size,
        data.num_classes,
        cfg.seq_len,
        variant=cfg.variant,
        options=_variant_options(cfg),
        d_model=cfg.d_model,
        heads=cfg.heads,
        layers=cfg.layers,
        causal=data.causal,
        conv=cfg.conv,
    )
    res = train_config(cfg, model, tr, te, progress)
    err = attention_error(model.eval(), te.inputs[: cfg.batch].to(cfg.device))
    stride = max(1, len(res.loss_curve) // CURVE_POINTS)
    curve = [(s, round(v, 5)) for s, v in res.loss_curve[stride - 1 :: stride]]
    return TaskResult(
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
        approx_err=err,
        loss_curve=json.dumps(curve),
        eval_curve=json.dumps([(s, round(t, 4), a) for s, t, a in res.eval_curve]),
    )


def run_task_row(msg: dict, settings: RunSettings, progress: Callable[..., None]) -> dict:
    """The worker job (``attn_bench.task.run:run_task_row``): a config's ``asdict`` in, its row out."""
    pairs = {k: tuple(map(tuple, msg[k])) for k in ("options", "params")}
    cfg = TaskConfig(**{**msg, **pairs})
    t0 = time.perf_counter()
    res = run_task(cfg, progress)
    return dataclasses.replace(res, elapsed_s=round(time.perf_counter() - t0, 3)).to_row()


# -- presets --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskPreset:
    name: str
    description: str
    configs: tuple[TaskConfig, ...]
    settings: RunSettings = field(default_factory=RunSettings)


_GROUP_LISTS = {"variants", "seq_lens", "seeds"}


def _as_list(x: Any) -> list[Any]:
    return list(x) if isinstance(x, list | tuple) else [x]


def expand_group(
    group: dict[str, Any], defaults: dict[str, Any], variants: list[str] | None = None
) -> list[TaskConfig]:
    """Cross product of a group's variants (``variants`` when given; each with the sweep options it
    declares), lengths and seeds; other keys set :class:`TaskConfig` fields (``params``: the generator's)."""
    import itertools

    g = {**defaults, **group}
    fields = {f.name for f in dataclasses.fields(TaskConfig)} - {"variant", "seq_len", "seed", "options", "params"}
    option_names = {o.name for v in av.list_variants() for o in av.variant_class(v).sweep_options}
    unknown = set(g) - fields - _GROUP_LISTS - option_names - {"params"}
    if unknown:
        raise ValueError(f"unknown task preset key(s) {sorted(unknown)}")
    base = {k: g[k] for k in fields if k in g}
    params = tuple(sorted((str(k), int(v)) for k, v in g.get("params", {}).items()))
    out = []
    for n in _as_list(g["seq_lens"]):  # the variants of one length and seed share its data
        for seed in _as_list(g.get("seeds", [0, 1, 2])):
            for variant in variants or _as_list(g.get("variants", av.list_variants())):
                declared = av.variant_class(variant).sweep_options
                lists = [[(o.name, int(x)) for x in _as_list(g.get(o.name, o.default))] for o in declared]
                for options in itertools.product(*lists):
                    cfg = TaskConfig(
                        variant=variant, seq_len=int(n), seed=int(seed), options=options, params=params, **base
                    )
                    out.append(cfg)
    return out


def parse_presets(
    text: str, expand: Callable[[dict, dict], Iterable[Any]], order: Callable[[Any], Any] | None = None
) -> dict[str, TaskPreset]:
    """The presets of a task-family TOML (task, long, swap): per preset, every group expanded by
    ``expand(group, defaults)``, each config once (first seen first, or sorted by ``order``)."""
    presets = {}
    for name, spec in tomllib.loads(text).get("presets", {}).items():
        configs: dict[tuple, Any] = {}
        for group in spec.get("groups", []):
            for cfg in expand(group, spec.get("defaults", {})):
                configs.setdefault(cfg.key(), cfg)
        ordered = sorted(configs.values(), key=order) if order else list(configs.values())
        settings = RunSettings(**spec.get("settings", {}))
        presets[name] = TaskPreset(name, spec.get("description", ""), tuple(ordered), settings)
    return presets


def load_task_presets(text: str | None = None, variants: list[str] | None = None) -> dict[str, TaskPreset]:
    """Parse ``task_presets.toml`` (shipped with the package) or the given TOML text; ``variants``
    replaces every group's."""
    if text is None:
        text = (Path(__file__).resolve().parent / "task_presets.toml").read_text()
    return parse_presets(text, lambda g, d: expand_group(g, d, variants))


# -- the run loop ---------------------------------------------------------------------------------


def read_task_results(path: Path, result_cls: type[TaskResult] = TaskResult) -> list[TaskResult]:
    """Rows of a task results.csv; a line that does not parse is skipped (and runs again on resume)."""
    return read_job_rows(path, result_cls.from_row, TASK_STATUSES)


def write_task_results(path: Path, results: list[TaskResult], result_cls: type[TaskResult] = TaskResult) -> None:
    atomic_write(path, rows_to_csv((r.to_row() for r in results), result_columns(result_cls)))


def run_tasks(
    configs: list[TaskConfig],
    out: Path,
    settings: RunSettings,
    *,
    resume: bool = False,
    meta: dict | None = None,
    progress: bool = True,
    on_result: Callable[[TaskResult], None] | None = None,
    job: str = "attn_bench.task.run:run_task_row",
    result_cls: type[TaskResult] = TaskResult,
    kind: str = "task",
) -> list[TaskResult]:
    """Run ``configs`` one by one in a worker process (skipping those already in ``out/results.csv``
    when ``resume``), rewriting ``results.csv`` atomically after each. Returns all rows.

    ``job`` (``module:function``) and ``result_cls`` (a :class:`TaskResult` subclass) let another
    study with a wider config run through the same loop; ``kind`` goes to ``metadata.json``."""
    from attn_bench.core.worker import WorkerPool, WorkerStartError

    prepare_run_dir(out, (c.device for c in configs), resume=resume)
    remove_stale_temp_files(out, (RESULTS, METADATA))
    path = out / RESULTS
    results = read_task_results(path, result_cls) if resume else []
    done = {r.config.key() for r in results}
    todo = [c for c in configs if c.key() not in done]
    meta = dict(meta or {})
    old = _read_metadata(out) if resume else {}
    meta["started"] = old.get("started", now())
    if resume:
        meta["resumes"] = [*old.get("resumes", []), {"started": now(), "previous_status": old.get("status")}]
    meta.update(settings=dataclasses.asdict(settings), configs=len(configs), status="running", kind=kind)
    write_metadata(out, meta)
    bar = _TaskProgress(len(todo), enabled=progress)
    pool = WorkerPool(
        settings,
        str(out / WORKER_LOG),
        job=job,
        result_cls=result_cls,
        on_progress=bar.step,
    )
    with pool_lifecycle(pool, out, meta, results), bar:
        for cfg in todo:
            bar.start(cfg.label(), cfg.steps)
            reason = cfg.unsupported()
            res = result_cls(cfg, "unsupported", error=reason) if reason else pool.run(cfg)
            results.append(res)
            write_task_results(path, results, result_cls)
            if on_result is not None:
                on_result(res)
            acc = f" acc {res.final_acc:.3f} in {res.train_s:.1f} s" if res.status == "ok" else f" {res.error}"
            bar.advance(f"{cfg.label()}: {res.status}{acc}")
            if pool.gave_up:
                raise WorkerStartError(f"{res.error} ({pool.start_failures} failed starts in a row)")
    return results


class _TaskProgress:
    """Two rich bars: runs done, and the steps of the run in flight."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled = total, enabled
        self.progress = self.runs = self.steps = None

    def __enter__(self) -> _TaskProgress:
        if self.enabled:
            from attn_bench.core.progress import progress_bar

            self.progress = progress_bar()  # the label last: a narrow terminal cuts it, not the count
            self.progress.__enter__()
            self.runs = self.progress.add_task("runs", total=self.total)
            self.steps = self.progress.add_task("steps", total=1)
        return self

    def start(self, label: str, steps: int) -> None:
        if self.progress is not None:
            self.progress.update(self.runs, description=label)
            self.progress.reset(self.steps, total=steps, description="steps")

    def step(self, step: int, steps: int, loss: float) -> None:
        if self.progress is not None:
            self.progress.update(self.steps, completed=step, description=f"steps (loss {loss:.3f})")

    def advance(self, message: str) -> None:
        if self.progress is not None:
            self.progress.console.print(message)
            self.progress.advance(self.runs)

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)
