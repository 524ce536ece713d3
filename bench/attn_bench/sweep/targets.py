"""The CPU performance targets of the ``torch`` backend, as ratios against baselines in the same run.

B=1, H=4, D=64, float32, ``torch.utils.benchmark`` timing, peak memory as in the sweep
(:func:`attn_bench.core.measure.peak_memory`):

- ``full``: within 5% of calling SDPA directly (N=4096, causal and not).
- ``sliding_window``, window 128: time and peak memory at N=16384 at most 4.4x those at
  N=4096; at least 5x faster than SDPA with a dense band mask at N=16384; faster than compiled
  FlexAttention with the same block mask in steady state (its compile time is reported).
- ``performer``, 128 features, causal and not: time at N=16384 at most 4.4x that at N=4096;
  at least 10x faster than full SDPA (same causal flag) at N=16384.
- Against the peer libraries, where installed (``pip install .[peers]``): the sliding window at
  least as fast as local-attention, and the non-causal Performer at least as fast as
  performer-pytorch, at N=16384.

Run with ``python -m attn_bench.sweep.targets`` or ``attn-bench targets``; exit status 1 if a target fails.
Each time is the smallest of ``rounds`` medians taken in alternation with its baseline, which
keeps a ratio honest on a machine with other load. A time whose every round stayed noisy (its
spread or the machine's load over the thresholds after re-measuring, see
:func:`attn_bench.core.measure.measure_time`) makes its targets ``noisy``: shown, not judged.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import attention_variants as av
from attn_bench.baselines.torch_builtin import flex_fn, sdpa_fn
from attn_bench.core.config import RunSettings
from attn_bench.core.measure import measure_time, peak_memory

B, H, D = 1, 4, 64
CPU = torch.device("cpu")


@dataclass(frozen=True)
class Target:
    name: str
    value: float
    op: str  # "<=" or ">=" or "<"
    threshold: float
    detail: str
    noisy: bool = False  # a time it is made of stayed noisy: not judged

    @property
    def ok(self) -> bool:
        if self.op == "<=":
            return self.value <= self.threshold
        if self.op == "<":
            return self.value < self.threshold
        return self.value >= self.threshold


def _qkv(n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, n, D, generator=gen) for _ in range(3))


class Times(dict):
    """Median ms per function name; ``noisy``: the names whose every round stayed noisy."""

    noisy: set[str]

    def any_noisy(self, *names: str) -> bool:
        return bool(self.noisy & set(names))


def _timed(fns: dict[str, Callable[[], object]], settings: RunSettings, rounds: int) -> Times:
    """Median ms of each function, the best of ``rounds`` rounds run in alternation (of the quiet
    rounds, when any round was quiet)."""
    quiet: dict[str, float] = {}
    noisy: dict[str, float] = {}
    for fn in fns.values():  # warm-up
        fn()
    for _ in range(rounds):
        for k, fn in fns.items():
            t = measure_time(fn, CPU, settings)
            pool = noisy if t.noisy else quiet
            pool[k] = min(pool.get(k, math.inf), t.median_ms)
    best = Times({k: quiet.get(k, noisy.get(k, math.inf)) for k in fns})
    best.noisy = {k for k in fns if k not in quiet}
    return best


@contextlib.contextmanager
def _without_profiler_chatter() -> Iterator[None]:
    """Hold back the ``USDT: ... profiler_start/stop`` lines Kineto writes to file descriptor 2 on
    every profiled call (:func:`attn_bench.core.measure.peak_memory`); anything else on stderr is passed on."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode(errors="replace")
            sys.stderr.write("".join(ln for ln in text.splitlines(keepends=True) if not ln.startswith("USDT:")))


def _sdpa(q, k, v, causal: bool):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def _nograd(fn: Callable, *args) -> Callable[[], object]:
    def call():
        with torch.no_grad():
            return fn(*args)

    return call


def run_targets(quick: bool = False, flex: bool = True, log=print) -> list[Target]:
    settings = RunSettings(min_run_time=0.1 if quick else 0.4, min_repeats=3)
    rounds = 1 if quick else 3
    out: list[Target] = []
    full = av.FullAttention()

    # full via the torch backend against direct SDPA.
    q, k, v = _qkv(4096)
    for causal in (False, True):
        t = _timed(
            {
                "ours": _nograd(lambda a, b, c, cz=causal: full(a, b, c, causal=cz, backend="torch"), q, k, v),
                "sdpa": _nograd(
                    lambda a, b, c, cz=causal: F.scaled_dot_product_attention(a, b, c, is_causal=cz), q, k, v
                ),
            },
            settings,
            rounds,
        )
        tag = "causal" if causal else "non-causal"
        out.append(
            Target(
                f"full/torch vs SDPA, N=4096 {tag}",
                t["ours"] / t["sdpa"],
                "<=",
                1.05,
                f"{t['ours']:.1f} ms vs {t['sdpa']:.1f} ms",
                noisy=t.any_noisy("ours", "sdpa"),
            )
        )
        log(out[-1])

    # Sliding window 128.
    n_before = len(out)
    sw = av.SlidingWindowAttention(window=128)
    q4, k4, v4 = _qkv(4096)
    q16, k16, v16 = _qkv(16384)
    ours4 = _nograd(lambda a, b, c: sw(a, b, c, backend="torch"), q4, k4, v4)
    ours16 = _nograd(lambda a, b, c: sw(a, b, c, backend="torch"), q16, k16, v16)
    band = _nograd(sdpa_fn(sw, q16, k16, False)[0], q16, k16, v16)
    fns = {"ours4": ours4, "ours16": ours16, "band": band}
    local = _peer("local_attention", sw, q16, k16, v16, False)
    if local is not None:
        fns["local"] = local
    compile_s = None
    if flex:
        flex16 = _nograd(flex_fn(sw, q16, k16, False), q16, k16, v16)
        tc = time.perf_counter()
        flex16()
        compile_s = time.perf_counter() - tc
        fns["flex"] = flex16
    t = _timed(fns, settings, rounds)
    with _without_profiler_chatter():
        m4, m16 = peak_memory(ours4, CPU), peak_memory(ours16, CPU)
    out.append(
        Target(
            "sliding_window w=128 time N=16384 / N=4096",
            t["ours16"] / t["ours4"],
            "<=",
            4.4,
            f"{t['ours16']:.1f} ms vs {t['ours4']:.1f} ms",
            noisy=t.any_noisy("ours16", "ours4"),
        )
    )
    out.append(
        Target(
            "sliding_window w=128 peak memory N=16384 / N=4096",
            m16 / m4,
            "<=",
            4.4,
            f"{m16 / 2**20:.1f} MiB vs {m4 / 2**20:.1f} MiB",
        )
    )
    out.append(
        Target(
            "sliding_window w=128 speed-up over band-mask SDPA, N=16384",
            t["band"] / t["ours16"],
            ">=",
            5.0,
            f"{t['band']:.1f} ms vs {t['ours16']:.1f} ms",
            noisy=t.any_noisy("band", "ours16"),
        )
    )
    if flex:
        out.append(
            Target(
                "sliding_window w=128 time / compiled FlexAttention, N=16384",
                t["ours16"] / t["flex"],
                "<",
                1.0,
                f"{t['ours16']:.1f} ms vs {t['flex']:.1f} ms steady; flex compile {compile_s:.1f} s",
                noisy=t.any_noisy("ours16", "flex"),
            )
        )
    if local is not None:
        out.append(
            Target(
                "sliding_window w=128 speed-up over local-attention (peer), N=16384",
                t["local"] / t["ours16"],
                ">=",
                1.0,
                f"{t['local']:.1f} ms vs {t['ours16']:.1f} ms",
                noisy=t.any_noisy("local", "ours16"),
            )
        )
    for target in out[n_before:]:
        log(target)

    # Performer, 128 features.
    perf = av.PerformerAttention(num_features=128)
    for causal in (False, True):
        tag = "causal" if causal else "non-causal"
        fns = {
            "p4": _nograd(lambda a, b, c, cz=causal: perf(a, b, c, causal=cz, backend="torch"), q4, k4, v4),
            "p16": _nograd(lambda a, b, c, cz=causal: perf(a, b, c, causal=cz, backend="torch"), q16, k16, v16),
            "sdpa": _nograd(lambda a, b, c, cz=causal: _sdpa(a, b, c, cz), q16, k16, v16),
        }
        # performer-pytorch's causal form takes about 20x ours: compared non-causal only.
        peer = None if causal else _peer("performer_pytorch", perf, q16, k16, v16, causal)
        if peer is not None:
            fns["peer"] = peer
        t = _timed(fns, settings, 1 if quick else 2)
        out.append(
            Target(
                f"performer m=128 {tag} time N=16384 / N=4096",
                t["p16"] / t["p4"],
                "<=",
                4.4,
                f"{t['p16']:.1f} ms vs {t['p4']:.1f} ms",
                noisy=t.any_noisy("p16", "p4"),
            )
        )
        out.append(
            Target(
                f"performer m=128 {tag} speed-up over full SDPA, N=16384",
                t["sdpa"] / t["p16"],
                ">=",
                10.0,
                f"{t['sdpa']:.1f} ms vs {t['p16']:.1f} ms",
                noisy=t.any_noisy("sdpa", "p16"),
            )
        )
        log(out[-2])
        log(out[-1])
        if peer is not None:
            out.append(
                Target(
                    f"performer m=128 {tag} speed-up over performer-pytorch (peer), N=16384",
                    t["peer"] / t["p16"],
                    ">=",
                    1.0,
                    f"{t['peer']:.1f} ms vs {t['p16']:.1f} ms",
                    noisy=t.any_noisy("peer", "p16"),
                )
            )
            log(out[-1])
    return out


def _peer(name: str, variant: av.AttentionVariant, q, k, v, causal: bool) -> Callable[[], object] | None:
    """A peer library's call on these inputs, or None (with a note) when it is not installed."""
    from attn_bench.baselines.registry import get_baseline

    baseline = get_baseline(name)
    assert baseline is not None
    reason = baseline.check(variant, q.device, q.dtype, q.shape[-1], False)
    if reason is not None:
        print(f"{name}: not compared ({reason})", file=sys.stderr)
        return None
    return _nograd(baseline.make(variant, q, k, v, causal).fn, q, k, v)


def main(quick: bool = False, flex: bool = True) -> bool:
    from rich.console import Console
    from rich.table import Table

    from attn_bench.core.machine import cpu_model

    console = Console()
    if not console.is_terminal:
        console.width = 160
    console.print(
        f"CPU performance targets on {cpu_model()}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}; B={B} H={H} D={D} float32"
    )
    # Progress on a terminal only, and transient: the table below is where the results are.
    with console.status("measuring the targets ...") as status:
        results = run_targets(quick=quick, flex=flex, log=lambda t: status.update(f"measured: {t.name}"))
    table = Table(title="CPU performance targets (ratios measured in this run)")
    for col in ("target", "ratio", "goal", "result", "measured"):
        table.add_column(col, overflow="fold")
    for t in results:
        verdict = "[yellow]noisy[/]" if t.noisy else "[green]pass[/]" if t.ok else "[red]FAIL[/]"
        table.add_row(t.name, f"{t.value:.3g}", f"{t.op} {t.threshold:g}", verdict, t.detail)
    console.print(table)
    noisy = [t for t in results if t.noisy]
    if noisy:
        console.print(
            f"[yellow]{len(noisy)} target(s) not judged: their times stayed noisy (spread or other processes' "
            "load over the thresholds after re-measuring); run again on a quiet machine."
        )
    return all(t.ok for t in results if not t.noisy)


if __name__ == "__main__":
    sys.exit(0 if main(quick="--quick" in sys.argv, flex="--no-flex" not in sys.argv) else 1)
