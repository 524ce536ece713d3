"""The machine record of a run: CPU, GPU, versions, git commit and the memory method."""

from __future__ import annotations

import functools
import os
import platform
import re
import socket
import subprocess
from datetime import datetime, timezone
from pathlib import Path


def git_commit(cwd: Path | None = None) -> str:
    """``<sha>`` (``-dirty`` when the work tree has changes) of the checkout the package lives in."""
    root = cwd or Path(__file__).resolve().parents[3]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            # Committed reports are outputs, not code: a sweep writing into reports/ is not "dirty".
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)reports"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except Exception:
        return "unknown"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The columns of a row that say where it ran (core/config.py: BenchResult).
IDENTITY_FIELDS = ("node", "device_name", "device_uuid", "driver")


def nvidia_driver() -> str:
    """The NVIDIA driver's version (``550.54.15``), or "" where there is none."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
        found = re.search(r"Kernel Module\s+(?:for \S+\s+)?(\d[\w.-]*)", text)
        if found:
            return found.group(1)
    except OSError:
        pass
    return _nvidia_smi("driver_version", None)


def _nvidia_smi(fields: str, gpu: str | None) -> str:
    """``nvidia-smi --query-gpu=FIELDS`` of one GPU (an index or a UUID; None: the first), or ""."""
    cmd = ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits"]
    try:
        run = subprocess.run([*cmd, *(["-i", gpu] if gpu else [])], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return ""
    lines = run.stdout.strip().splitlines()
    return lines[0].strip() if run.returncode == 0 and lines else ""


@functools.lru_cache(maxsize=16)
def device_identity(device: str, visible: str | None = None, probe: bool = True) -> dict[str, str]:
    """Where a row on ``device`` runs in this process: ``node`` (the host name), ``device_name``
    (the GPU's name, or the CPU's model), ``device_uuid`` and ``driver`` (CUDA only).

    ``visible``: the ``CUDA_VISIBLE_DEVICES`` the row's process has (default: this one's), which
    maps ``cuda:N`` to a physical GPU. ``probe``: ask CUDA through torch (in the process that
    runs the row); otherwise, and where torch cannot tell, ``nvidia-smi`` is asked."""
    ident = {"node": socket.gethostname(), "device_name": "", "device_uuid": "", "driver": ""}
    if not device.startswith("cuda"):
        ident["device_name"] = cpu_model()
        return ident
    index = int(device.partition(":")[2] or 0)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
    entries = [x.strip() for x in visible.split(",") if x.strip()] if visible else []
    physical = entries[index] if index < len(entries) else str(index)
    ident["driver"] = nvidia_driver()
    if probe:
        import torch

        if torch.cuda.is_available() and index < torch.cuda.device_count():
            props = torch.cuda.get_device_properties(index)
            uuid = str(getattr(props, "uuid", "") or "")
            if uuid and not uuid.startswith(("GPU-", "MIG-")):
                uuid = f"GPU-{uuid}"  # as nvidia-smi writes it
            ident.update(device_name=props.name, device_uuid=uuid)
            return ident
    name, _, uuid = _nvidia_smi("name,uuid", physical).partition(",")
    ident.update(device_name=name.strip(), device_uuid=uuid.strip())
    return ident


def machine_metadata(device: str = "cpu") -> dict:
    import numpy
    import torch

    import attention_variants

    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    gpu = None
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
    from attn_bench.core.measure import CPU_MEMORY_METHOD, CUDA_MEMORY_METHOD

    return {
        "device": device,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "numpy": numpy.__version__,
        "attention_variants": attention_variants.__version__,
        "platform": platform.platform(),
        "git_commit": git_commit(),
        "memory_method": CUDA_MEMORY_METHOD if device.startswith("cuda") else CPU_MEMORY_METHOD,
    }


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
