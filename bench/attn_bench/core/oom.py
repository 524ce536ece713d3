"""Evidence that the out-of-memory killer killed a worker: the kernel's OOM-kill counters (the
system's and the memory cgroup's), the memory limit and the worker's peak resident memory (Linux)."""

from __future__ import annotations

from pathlib import Path

# A SIGKILLed worker whose peak RSS reached this fraction of the memory limit counts as an OOM kill.
OOM_RSS_FRACTION = 0.9


def _read_counter(path: Path, name: str) -> int | None:
    """The value of ``name`` in a ``key value`` file (``/proc/vmstat``, ``memory.events``), or None."""
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == name:
                return int(value)
    except (OSError, ValueError):
        pass
    return None


def _memory_cgroups(proc: Path, cgroup_root: Path) -> list[Path]:
    """This process's memory cgroup directories (v2 and v1 mounts), falling back to the roots."""
    dirs = []
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        _, controllers, rel = [*line.split(":", 2), "", ""][:3]
        if controllers == "" and rel:
            dirs.append(cgroup_root / rel.lstrip("/"))
        elif "memory" in controllers.split(","):
            dirs.append(cgroup_root / "memory" / rel.lstrip("/"))
    return [*dirs, cgroup_root, cgroup_root / "memory"]


def oom_kill_counts(proc: Path = Path("/proc"), cgroup_root: Path = Path("/sys/fs/cgroup")) -> dict[str, int]:
    """The kernel's OOM-kill counters that can be read here (Linux): the system's
    (``/proc/vmstat``) and this process's memory cgroup's (v2 ``memory.events``, v1
    ``memory.oom_control``). A counter that grew while a worker died by SIGKILL is evidence
    that the out-of-memory killer killed it."""
    files = [proc / "vmstat"]
    for d in _memory_cgroups(proc, cgroup_root):
        files += [d / "memory.events", d / "memory.oom_control"]
    counts = {}
    for f in files:
        n = _read_counter(f, "oom_kill")
        if n is not None:
            counts.setdefault(str(f), n)
    return counts


def memory_limit_bytes(proc: Path = Path("/proc"), cgroup_root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The smallest of the machine's memory and this process's cgroup limit, or None if unknown."""
    limits = []
    try:
        for line in (proc / "meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):  # "MemTotal:       24000000 kB"
                limits.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for d in _memory_cgroups(proc, cgroup_root):
        for name in ("memory.max", "memory.limit_in_bytes"):
            try:
                text = (d / name).read_text().strip()
            except OSError:
                continue
            if text.isdigit() and int(text) < 1 << 60:  # "max" or a near-2**63 value: no limit
                limits.append(int(text))
    return min(limits) if limits else None


def peak_rss_bytes(pid: int, proc: Path = Path("/proc")) -> int | None:
    """Peak resident memory of a live process (``VmHWM``), or None."""
    try:
        for line in (proc / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def oom_evidence(before: dict[str, int], after: dict[str, int], peak_rss: int | None, limit: int | None) -> str | None:
    """Why a SIGKILL looks like the out-of-memory killer's, or None when nothing says so."""
    for name, n in after.items():
        if name in before and n > before[name]:
            return f"oom_kill in {name} went from {before[name]} to {n}"
    if peak_rss and limit and peak_rss >= OOM_RSS_FRACTION * limit:
        return f"the worker's peak RSS {peak_rss / 2**30:.2f} GiB reached the {limit / 2**30:.2f} GiB memory limit"
    return None
