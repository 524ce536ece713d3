"""What device-check records about the machine before anything runs: CUDA, the driver, the
SDPA backends that work, the card's matmul and bandwidth ceilings, and the GPU test workers."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

from attn_kernels import AUTOTUNE_ENV

# Configs per autotuned Triton kernel during the check (each tried config is one compilation).
AUTOTUNE_MAX = 2
ROOT = Path(__file__).resolve().parents[3]  # the checkout: bench/attn_bench/device/ -> .

TEST_GIB_PER_WORKER = 32.0


def gpu_test_workers(cpus: int, gpu_memory_gib: float | None) -> int:
    """Parallel pytest workers for the GPU tests: compilation is CPU-bound, but the largest tests
    hold up to ~30 GiB of GPU memory each (8 workers ran an H200 out of memory), so one worker
    per TEST_GIB_PER_WORKER GiB, at most half the cores and 8."""
    by_memory = int((gpu_memory_gib or 0) // TEST_GIB_PER_WORKER)
    return max(1, min(8, cpus // 2, by_memory))


def child_env() -> dict[str, str]:
    """The steps' environment: this source tree importable, unbuffered output, capped autotuning."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault(AUTOTUNE_ENV, str(AUTOTUNE_MAX))
    env.pop("TRITON_INTERPRET", None)
    return env


def cuda_status() -> tuple[bool, str]:
    """``(available, reason if not)``."""
    import torch

    if torch.cuda.is_available():
        return True, ""
    built = torch.version.cuda
    why = "this PyTorch has no CUDA support" if built is None else f"no CUDA device visible (PyTorch built for {built})"
    return False, f"CUDA is not available: {why} (torch {torch.__version__})"


def cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


# ---------------------------------------------------------------------------------------------
# Step 1: the environment and the two ceilings
# ---------------------------------------------------------------------------------------------


def probe_environment() -> dict:
    """Machine, versions, SDPA backends and the measured copy bandwidth and bf16 matmul rate."""
    import torch

    from attn_bench.core.machine import cpu_model, git_commit

    env: dict = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda_build": torch.version.cuda,
        "git_commit": git_commit(ROOT),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception as exc:
        env["triton"] = f"not importable: {type(exc).__name__}: {exc}"
    ok, why = cuda_status()
    env["cuda_available"] = ok
    if not ok:
        env["cuda_reason"] = why
        return env
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    env.update(
        gpu=props.name,
        capability=f"{props.major}.{props.minor}",
        sm_count=props.multi_processor_count,
        memory_gib=round(props.total_memory / 2**30, 1),
        l2_mib=round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
        driver=_driver_version(),
    )
    env["sdpa_backends"] = _sdpa_backends(dev)
    env.update(_ceilings(dev))
    return env


def _driver_version() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"
    except Exception as exc:
        return f"unknown ({type(exc).__name__})"


def _sdpa_backends(dev) -> dict[str, str]:
    """Each SDPA backend tried alone on a bf16 (1, 16, 1024, 128) problem, causal, with grads."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(1, 16, 1024, 128, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    out: dict[str, str] = {}
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        backend = getattr(SDPBackend, name, None)
        if backend is None:
            out[name.lower()] = "not in this PyTorch"
            continue
        try:
            with sdpa_kernel([backend]):
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                o.sum().backward()
            torch.cuda.synchronize(dev)
            out[name.lower()] = "runs"
        except Exception as exc:
            out[name.lower()] = f"no: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    return out


def _ceilings(dev) -> dict:
    """Copy bandwidth (bytes read + written) and the bf16 matmul rate, on random data."""
    import torch
    from triton.testing import do_bench

    res: dict = {}
    n = 1 << 28  # 1 GiB of float32 each way
    src = torch.randn(n, device=dev)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    res["copy_gb_s"] = round(2 * n * 4 / (ms * 1e-3) / 1e9, 1)
    src = dst = None  # free before the matmul's operands
    s = 8192
    a = torch.randn(s, s, device=dev, dtype=torch.bfloat16)
    b = torch.randn(s, s, device=dev, dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b, warmup=100, rep=500, return_mode="median")
    res["matmul_bf16_tflops"] = round(2 * s**3 / (ms * 1e-3) / 1e12, 1)
    res["ceilings_method"] = (
        "triton.testing.do_bench medians on random data: a 1 GiB float32 device-to-device copy "
        "(bytes read + written) and an 8192^3 bfloat16 matmul (torch.matmul)"
    )
    return res
