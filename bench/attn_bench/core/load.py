"""The machine's load while a row is timed: other processes' share of the CPUs this process may
run on (``/proc/stat`` against this process's own CPU time), the load average, and on CUDA the
card's SM clock and the other processes on it (``nvidia-smi``)."""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CpuSample:
    """What :func:`other_cpu_share` compares: wall time, the busy seconds of the CPUs this process
    may run on (``/proc/stat``; None off Linux), this process's own CPU seconds, and those CPUs' count."""

    wall_s: float
    busy_s: float | None
    own_s: float
    cpus: int


def _allowed_cpus() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return set(range(os.cpu_count() or 1))


def cpu_sample(stat: Path = Path("/proc/stat")) -> CpuSample:
    """Now: wall clock, busy time of this process's CPUs, this process's CPU time."""
    cpus = _allowed_cpus()
    busy: float | None = None
    try:
        tick = os.sysconf("SC_CLK_TCK")
        total = 0
        for line in stat.read_text().splitlines():
            name, _, rest = line.partition(" ")
            if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                v = [int(x) for x in rest.split()]
                # user nice system idle iowait irq softirq steal: all but idle and iowait are busy
                total += v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
        busy = total / tick
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    return CpuSample(time.perf_counter(), busy, time.process_time(), len(cpus))


def other_cpu_share(before: CpuSample, after: CpuSample) -> float | None:
    """Share (0..1) of this process's CPUs that other processes kept busy between two samples:
    the CPUs' busy time less this process's own, over wall time x CPUs; None when unknown."""
    wall = after.wall_s - before.wall_s
    if before.busy_s is None or after.busy_s is None or wall <= 0:
        return None
    other = (after.busy_s - before.busy_s) - (after.own_s - before.own_s)
    return min(1.0, max(0.0, other / (wall * before.cpus)))


def load_average() -> float | None:
    """The 1-minute load average (runnable processes, this one's threads included), or None."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def parse_gpu_state(gpus: str, apps: str, uuid: str | None) -> tuple[float | None, int | None]:
    """``(SM clock in MHz, other processes)`` of the card ``uuid`` from the CSV of ``nvidia-smi
    --query-gpu=uuid,clocks.sm`` and ``--query-compute-apps=gpu_uuid,pid`` (``noheader,nounits``).
    This process is one of the card's processes: the others are the rest. (None, None) when the
    card is not found; None others when nvidia-smi lists no process at all (it cannot see them)."""
    cards = [[x.strip() for x in ln.split(",")] for ln in gpus.strip().splitlines() if ln.strip()]
    card = [c for c in cards if uuid and c[0].endswith(uuid)] or (cards if len(cards) == 1 else [])
    if not card:
        return None, None
    try:
        clock = float(card[0][1])
    except (IndexError, ValueError):
        clock = None
    procs = [ln.split(",")[0].strip() for ln in apps.strip().splitlines() if ln.strip()]
    mine = [p for p in procs if p == card[0][0]]
    return clock, (max(0, len(mine) - 1) if mine else None)


def gpu_state(device: object) -> tuple[float | None, int | None]:
    """``(SM clock in MHz, other processes on the card)`` of a CUDA ``device`` now, through
    nvidia-smi; (None, None) when it cannot tell."""
    import torch

    try:
        uuid = str(torch.cuda.get_device_properties(device).uuid)
        query = ["nvidia-smi", "--format=csv,noheader,nounits"]
        gpus = subprocess.run([*query, "--query-gpu=uuid,clocks.sm"], capture_output=True, text=True, timeout=10)
        apps = subprocess.run([*query, "--query-compute-apps=gpu_uuid,pid"], capture_output=True, text=True, timeout=10)
        return parse_gpu_state(gpus.stdout, apps.stdout, uuid)
    except Exception:
        return None, None
