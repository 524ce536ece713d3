"""The machine record of a run: CPU, GPU, versions, git commit and the memory method."""

from __future__ import annotations

import os
import platform
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
