"""Ahead-of-time compilation of Triton kernels for a given NVIDIA architecture, no GPU needed.

``compile_for`` lowers one kernel specialisation through Triton's own pipeline
(``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``) down to PTX, then runs
the ``ptxas`` that ships with the Triton wheel with ``-v`` on that PTX to read the register
count and the spill traffic (the compiled metadata only learns those when a GPU loads the
cubin). The tests use it to check that every shipped kernel configuration builds for sm_80
and sm_90 and that the forward kernels do not spill.

A process that imported Triton with ``TRITON_INTERPRET=1`` (the CPU test suite) cannot lower
kernels at all: the kernels and Triton's own ``tl`` helpers are interpreter objects there.
``compile_for`` then hands the work to one long-lived worker process started with the
interpreter off, which imports the kernel's module by name and compiles the function of the
same name (so the kernel must live at the top level of an importable module).

Pointer arguments get the 16-byte alignment hint that the launcher gives to every PyTorch
allocation, so the code matches what runs on a GPU; integer arguments get no hint.
"""

from __future__ import annotations

import atexit
import dataclasses
import importlib
import os
import pickle
import re
import subprocess
import sys
import tempfile
import traceback
from typing import Any


@dataclasses.dataclass(frozen=True)
class CompileStats:
    """What the compiler reports about one kernel specialisation.

    ``registers`` per thread and ``spill_bytes`` (spill stores plus spill loads) come from
    ``ptxas -v``; ``shared_mem`` is the dynamic shared memory in bytes that Triton allocates
    (from the compiled metadata); ``ptx`` is the generated PTX text.
    """

    arch: int
    registers: int
    spill_bytes: int
    shared_mem: int
    ptx: str


_WORKER: subprocess.Popen[bytes] | None = None


def _can_compile_here(fn: object) -> bool:
    """True when this process's Triton lowers kernels (it was not imported for the interpreter)."""
    from triton.language import standard
    from triton.runtime.jit import JITFunction

    helper = getattr(standard, "cdiv", None)
    return isinstance(fn, JITFunction) and (helper is None or isinstance(helper, JITFunction))


def _worker() -> subprocess.Popen[bytes]:
    global _WORKER
    if _WORKER is None or _WORKER.poll() is not None:
        env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        _WORKER = subprocess.Popen(
            [sys.executable, "-m", __name__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        atexit.register(_stop_worker)
    return _WORKER


def _stop_worker() -> None:
    global _WORKER
    if _WORKER is not None and _WORKER.poll() is None:
        assert _WORKER.stdin is not None
        _WORKER.stdin.close()
        try:
            _WORKER.wait(timeout=10)
        except subprocess.TimeoutExpired:
            _WORKER.kill()
    _WORKER = None


def _compile_in_worker(fn: object, request: dict[str, object]) -> CompileStats:
    py_fn = getattr(fn, "fn", fn)
    module, name = getattr(py_fn, "__module__", None), getattr(py_fn, "__name__", None)
    if module is None or name is None or module == "__main__":
        raise TypeError(f"compile_for needs a kernel defined at the top level of an importable module, got {fn!r}")
    proc = _worker()
    assert proc.stdin is not None and proc.stdout is not None
    pickle.dump({"module": module, "name": name, **request}, proc.stdin)
    proc.stdin.flush()
    try:
        ok, payload = pickle.load(proc.stdout)
    except EOFError:
        raise RuntimeError(f"the Triton compile worker died (exit code {proc.wait()})") from None
    if not ok:
        raise RuntimeError(f"compiling {module}.{name} failed in the compile worker:\n{payload}")
    return CompileStats(**payload)


def _serve() -> None:
    """Worker loop: read pickled requests on stdin, answer ``(ok, stats dict | traceback)`` on stdout."""
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints from the compiler must not corrupt the answers
    sys.stdout = sys.stderr
    inp = sys.stdin.buffer
    while True:
        try:
            req = pickle.load(inp)
        except EOFError:
            return
        try:
            fn = getattr(importlib.import_module(req.pop("module")), req.pop("name"))
            answer = (True, dataclasses.asdict(_compile_here(fn, **req)))
        except Exception:
            answer = (False, traceback.format_exc())
        pickle.dump(answer, out)
        out.flush()


def _ptxas_path(arch: int) -> str:
    from triton.backends.nvidia import compiler as nv

    get_ptxas = getattr(nv, "get_ptxas", None)
    if get_ptxas is not None:
        try:
            tool = get_ptxas(arch)
        except TypeError:  # older Triton: get_ptxas() takes no argument
            tool = get_ptxas()
        return tool.path if hasattr(tool, "path") else str(tool)
    import triton

    return triton.knobs.nvidia.ptxas.path


def _sm_name(arch: int) -> str:
    return f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"


def _ptxas_stats(ptx: str, arch: int) -> tuple[int, int]:
    """(registers, spill bytes) reported by ``ptxas -v`` for the PTX."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [_ptxas_path(arch), "-v", f"--gpu-name={_sm_name(arch)}", src, "-o", os.path.join(tmp, "kernel.cubin")]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed for sm_{arch} (exit {proc.returncode}):\n{log}")
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None:
        raise RuntimeError(f"could not read the register count from ptxas -v:\n{log}")
    spill_bytes = int(spills.group(1)) + int(spills.group(2)) if spills else 0
    return int(regs.group(1)), spill_bytes


def compile_for(
    fn: object,
    signature: dict[str, str],
    constexprs: dict[str, object],
    *,
    arch: int,
    num_warps: int = 4,
    num_stages: int = 2,
) -> CompileStats:
    """Compile one specialisation of ``fn`` for ``sm_<arch>`` and report its resource use.

    Args:
        fn: a ``@triton.jit`` kernel at the top level of an importable module (defined with or
            without ``TRITON_INTERPRET=1``).
        signature: type of every runtime argument by name, e.g. ``{"Q": "*fp16", "N": "i32"}``.
            Arguments named in ``constexprs`` need not be listed (they are added as ``"constexpr"``).
        constexprs: value of every ``tl.constexpr`` argument by name.
        arch: compute capability as an int (80 for A100, 90 for H100).
        num_warps, num_stages: launch options, as given to the kernel on a GPU.

    Raises ``ValueError`` for a signature that does not match the kernel's arguments, whatever
    Triton raises when the kernel does not compile (``RuntimeError`` with the worker's traceback
    when compiled in the worker), and ``RuntimeError`` when ``ptxas`` rejects the PTX.
    """
    _full_signature(fn, signature, constexprs)  # argument errors raise here, not in the worker
    request = {
        "signature": dict(signature),
        "constexprs": dict(constexprs),
        "arch": arch,
        "num_warps": num_warps,
        "num_stages": num_stages,
    }
    if _can_compile_here(fn):
        return _compile_here(fn, **request)  # type: ignore[arg-type]
    return _compile_in_worker(fn, request)


def _full_signature(fn: Any, signature: dict[str, str], constexprs: dict[str, object]) -> dict[str, str]:
    """Type of every argument of ``fn`` in order, ``"constexpr"`` for the compile-time ones."""
    arg_names = list(getattr(fn, "arg_names", ()))
    name = getattr(fn, "__name__", repr(fn))
    unknown = (set(signature) | set(constexprs)) - set(arg_names)
    if unknown:
        raise ValueError(f"not arguments of {name}: {sorted(unknown)}")
    full_sig: dict[str, str] = {}
    for arg in arg_names:
        if arg in constexprs:
            full_sig[arg] = "constexpr"
        elif arg in signature:
            full_sig[arg] = signature[arg]
        else:
            raise ValueError(f"argument {arg!r} of {name} has no type in signature or constexprs")
    return full_sig


def _compile_here(
    fn: Any,
    signature: dict[str, str],
    constexprs: dict[str, object],
    arch: int,
    num_warps: int,
    num_stages: int,
) -> CompileStats:
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    full_sig = _full_signature(fn, signature, constexprs)
    arg_names = list(full_sig)
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(arg_names) if full_sig[name].startswith("*")}
    src = ASTSource(fn=fn, signature=full_sig, constexprs=dict(constexprs), attrs=attrs)
    compiled = triton_compile(
        src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": num_stages}
    )
    ptx = compiled.asm["ptx"]
    registers, spill_bytes = _ptxas_stats(ptx, arch)
    shared = int(getattr(compiled.metadata, "shared", 0) or 0)
    return CompileStats(arch=arch, registers=registers, spill_bytes=spill_bytes, shared_mem=shared, ptx=ptx)


if __name__ == "__main__":
    _serve()
