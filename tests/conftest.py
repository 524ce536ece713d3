"""Shared test set-up.

- Fresh allocations made through ``torch.empty*`` are poisoned with NaN, so an output a
  backend forgets to write fails loudly instead of passing by luck.
- Tests marked ``gpu`` are skipped cleanly without CUDA, and in runs that use the Triton
  interpreter: run them on their own with ``pytest -m gpu``.
- Tests marked ``ray`` start a Ray cluster on this machine: skipped unless the run selects them
  (``pytest -m ray``, with the cluster extra installed).
- Tests marked ``compile_sweep`` compile every shipped config and tuner candidate for sm_80 and
  sm_90 (a few minutes): skipped unless the run selects them (``pytest -m compile_sweep``); CI
  runs them under Triton 3.6, the GPU machines' release. The default run keeps the static gates
  (tests/test_flash_gates.py, tests/test_favor_chunk_compile.py) under the installed Triton.
- Triton kernels run under the interpreter on CPU tensors (``TRITON_INTERPRET=1``) unless the
  run selects the GPU tests (``-m gpu``); Triton reads the variable when a kernel is defined,
  so it is set here, before any kernel module is imported.
- Under the interpreter, ``tl.dot`` on float32/float16 tiles is one exact product rounded once
  to the accumulator's dtype (see :func:`_exact_interpreter_dot`).
"""

from __future__ import annotations

import os
import sys
import zlib

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    markexpr = config.getoption("markexpr", default="") or ""
    gpu_run = "gpu" in markexpr and "not gpu" not in markexpr
    if not gpu_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if os.environ.get("TRITON_INTERPRET") == "1":
        _exact_interpreter_dot()


def _exact_interpreter_dot() -> None:
    """The interpreter computes ``tl.dot`` as numpy's float32 GEMM, whose rounding is the BLAS's
    that numpy was built with: OpenBLAS 0.3.31 put one FAVOR+ gradient at 9x the error the same
    kernel has with an exact tile product (1.08x over its bound), so a numpy release moved the
    verdict. A tensor core sums one tile's products in wide precision and rounds into the float32
    accumulator, so here a float32/float16 tile product is summed in float64 and rounded once: what
    a test measures is the kernel's own error (its tiling, its float32 accumulation across tiles),
    the same under every numpy. Other operand dtypes keep the interpreter's own dot."""
    try:
        import numpy as np
        from triton.runtime import interpreter
    except ImportError:
        return
    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_dot, "_exact", False):
        return
    inner = builder.create_dot
    exact = (np.dtype(np.float32), np.dtype(np.float16))

    def create_dot(self, a, b, d, *args, **kwargs):
        acc = d.data.dtype
        if a.data.dtype not in exact or b.data.dtype not in exact or acc not in exact:
            return inner(self, a, b, d, *args, **kwargs)
        prod = np.matmul(a.data.astype(np.float64), b.data.astype(np.float64))
        return interpreter.TensorHandle((prod + d.data).astype(acc), d.dtype.scalar)

    create_dot._exact = True
    builder.create_dot = create_dot


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    markexpr = config.getoption("markexpr", default="") or ""
    opt_in = {
        "ray": "starts a Ray cluster; run the Ray tests on their own: pytest -m ray",
        "compile_sweep": "compiles every shipped config for sm_80/sm_90; run them with: pytest -m compile_sweep",
    }
    for marker, reason in opt_in.items():
        if marker in markexpr and f"not {marker}" not in markexpr:
            continue
        skip = pytest.mark.skip(reason=reason)
        for item in items:
            if item.get_closest_marker(marker) is not None:
                item.add_marker(skip)
    if not torch.cuda.is_available():
        reason = "needs a CUDA device"
    elif os.environ.get("TRITON_INTERPRET") == "1":
        reason = "this run uses the Triton interpreter; run the GPU tests on their own: pytest -m gpu"
    else:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


_empty, _empty_like, _new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty


def _poison(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point() and t.numel() and t.device.type == "cpu":
        t.fill_(float("nan"))
    return t


@pytest.fixture(autouse=True)
def poison_fresh_allocations(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    # A module that counts the ops a call issues sets POISON_FRESH_ALLOCATIONS = False: the
    # poisoning fill would be counted too.
    if not getattr(request.module, "POISON_FRESH_ALLOCATIONS", True):
        return
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: _poison(_empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: _poison(_empty_like(*a, **kw)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **kw: _poison(_new_empty(self, *a, **kw)))


@pytest.fixture(autouse=True)
def fresh_kernel_environment():
    """The kernels read ``TRITON_INTERPRET`` and the autotuning cap once per process: after each
    test (and its ``monkeypatch.setenv``/``delenv`` undone) they read them again, so a test that
    changes them sees its own value and leaves none behind."""
    yield
    kernels = sys.modules.get("attn_kernels")
    if kernels is not None:
        kernels.refresh_environment()


@pytest.fixture(autouse=True)
def fresh_seed(request: pytest.FixtureRequest) -> None:
    """Fresh random inputs per test, reproducible from the test id."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(autouse=True)
def fresh_process_after_lost_cuda_context(request: pytest.FixtureRequest):
    """After a GPU test that left the CUDA context unusable (an illegal memory access is sticky:
    every later CUDA call in the process fails), end this process instead of failing every later
    test with the same error: pytest-xdist replaces a crashed worker; a plain run stops."""
    yield
    if "gpu" not in request.keywords or not torch.cuda.is_available():
        return
    try:
        torch.cuda.synchronize()
    except Exception as exc:
        from attn_bench.core.worker import context_lost

        if not context_lost(str(exc)):
            raise
        if os.environ.get("PYTEST_XDIST_WORKER"):
            os._exit(3)
        pytest.exit(f"the CUDA context is lost ({str(exc).splitlines()[0]}); rerun the remaining GPU tests", 3)
