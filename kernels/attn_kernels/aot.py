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

**The launcher's specialisation.** At a launch, Triton specialises every integer argument on its
value: 1 becomes a compile-time constant, a multiple of 16 gets ``tt.divisibility=16``, and the
type is ``i32``, ``i64`` or ``u64`` by range (:func:`specialize_int`, Triton's
``native_specialize_impl``). Pointers get the 16-byte alignment hint of every PyTorch allocation.
``compile_for`` applies the same rules to the integer values of a concrete launch given in the
signature, so the code it reports is the code a GPU runs for that launch; an integer given only by
its type (``"i32"``) gets no hint, as an argument the launcher does not specialise.

Registers and spills come from Triton's own ``ptxas`` step (``make_cubin`` of the NVIDIA backend,
same tool and options, with its ``-v`` log captured), so they describe the cubin the launcher
would load; :func:`disassemble` turns that cubin into SASS with the wheel's ``cuobjdump``.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import importlib
import io
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

    ``registers`` per thread and ``spill_bytes`` (spill stores plus spill loads) come from the
    ``ptxas -v`` log of the step that built ``cubin``; ``shared_mem`` is the dynamic shared memory
    in bytes that Triton allocates (from the compiled metadata); ``ptx`` is the generated PTX text.
    ``signature`` is the type of every argument after the launcher's specialisation
    (``"constexpr"`` for the compile-time ones, integers equal to 1 included) and ``divisible``
    names the arguments that carry ``tt.divisibility=16``; ``ptxas_version`` is that of the tool.
    """

    arch: int
    registers: int
    spill_bytes: int
    shared_mem: int
    ptx: str
    cubin: bytes = b""
    signature: dict[str, str] = dataclasses.field(default_factory=dict)
    divisible: tuple[str, ...] = ()
    ptxas_version: str = ""


class ToolMissing(RuntimeError):
    """An NVIDIA tool that ships with Triton (``ptxas``, ``cuobjdump``) is not installed here."""


def specialize_int(value: int) -> tuple[str, int | None]:
    """How Triton's launcher specialises an integer argument of ``value``.

    Returns ``("constexpr", 1)`` for 1 (compiled in as a constant), else ``(type, divisibility)``:
    type ``"i32"``, ``"i64"`` or ``"u64"``, the narrowest that holds the value, and divisibility 16
    for a multiple of 16 (0 included), None otherwise. Raises TypeError for a non-int (bools
    included) and ValueError for a value no 64-bit type holds.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"value must be an int, got {value!r}")
    if value == 1:
        return "constexpr", 1
    if -(2**31) <= value < 2**31:
        kind = "i32"
    elif -(2**63) <= value < 2**63:
        kind = "i64"
    elif 0 <= value < 2**64:
        kind = "u64"
    else:
        raise ValueError(f"integer argument {value} does not fit 64 bits")
    return kind, 16 if value % 16 == 0 else None


def tool(name: str, arch: int = 90) -> tuple[str, str]:
    """``(path, version)`` of an NVIDIA tool shipped with Triton: ``"ptxas"`` (the one Triton runs
    for ``sm_<arch>``) or ``"cuobjdump"``. Raises :class:`ToolMissing` with what to do when absent."""
    if name not in ("ptxas", "cuobjdump"):
        raise ValueError(f"name must be 'ptxas' or 'cuobjdump', got {name!r}")
    try:
        from triton import knobs
        from triton.backends.nvidia import compiler as nv
    except ImportError as exc:
        raise ToolMissing(f"{name}: Triton with its NVIDIA backend is not installed ({exc})") from None
    try:
        found = nv.get_ptxas(arch) if name == "ptxas" else knobs.nvidia.cuobjdump
    except RuntimeError as exc:
        raise ToolMissing(
            f"{name} not found ({exc}); it ships with the Triton wheel in triton/backends/nvidia/bin: "
            "reinstall Triton, or point TRITON_PTXAS_PATH / TRITON_PTXAS_BLACKWELL_PATH / TRITON_CUOBJDUMP_PATH at one"
        ) from None
    return found.path, found.version


def disassemble(cubin: bytes) -> str:
    """The SASS listing of ``cubin`` (``cuobjdump -sass``); ToolMissing without ``cuobjdump``."""
    path, _ = tool("cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.cubin")
        with open(src, "wb") as f:
            f.write(cubin)
        proc = subprocess.run([path, "-sass", src], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"cuobjdump -sass failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return proc.stdout


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


def _ptxas_figures(log: str) -> tuple[int, int]:
    """(registers, spill bytes) from a ``ptxas -v`` log."""
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None:
        raise RuntimeError(f"could not read the register count from ptxas -v:\n{log}")
    spill_bytes = int(spills.group(1)) + int(spills.group(2)) if spills else 0
    return int(regs.group(1)), spill_bytes


def compile_for(
    fn: object,
    signature: dict[str, str | int],
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
        signature: every runtime argument by name: its type (``"*bf16"``, ``"i32"``, ``"fp32"``)
            or, for an integer, its value in the launch to reproduce (``{"NQ": 4096}``), which is
            specialised as the launcher does (:func:`specialize_int`). Arguments named in
            ``constexprs`` need not be listed (they are added as ``"constexpr"``).
        constexprs: value of every ``tl.constexpr`` argument by name.
        arch: compute capability as an int (80 for A100, 90 for H100).
        num_warps, num_stages: launch options, as given to the kernel on a GPU.

    Raises ``ValueError`` for a signature that does not match the kernel's arguments,
    ``TypeError`` for a value that is not an int, whatever Triton raises when the kernel does not
    compile (``RuntimeError`` with the worker's traceback when compiled in the worker), and
    ``RuntimeError`` when ``ptxas`` rejects the PTX.
    """
    _resolve(fn, signature, constexprs)  # argument errors raise here, not in the worker
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


def _resolve(
    fn: Any, signature: dict[str, str | int], constexprs: dict[str, object]
) -> tuple[dict[str, str], dict[str, object], tuple[str, ...]]:
    """``(full signature, constexprs, divisible)``: the type of every argument of ``fn`` in order
    (``"constexpr"`` for the compile-time ones), the constexprs with the integers the launcher
    turns into constants, and the arguments that get ``tt.divisibility=16``."""
    arg_names = list(getattr(fn, "arg_names", ()))
    name = getattr(fn, "__name__", repr(fn))
    unknown = (set(signature) | set(constexprs)) - set(arg_names)
    if unknown:
        raise ValueError(f"not arguments of {name}: {sorted(unknown)}")
    full_sig: dict[str, str] = {}
    consts = dict(constexprs)
    divisible = []
    for arg in arg_names:
        if arg in constexprs:
            full_sig[arg] = "constexpr"
            continue
        if arg not in signature:
            raise ValueError(f"argument {arg!r} of {name} has no type in signature or constexprs")
        kind = signature[arg]
        if isinstance(kind, str):
            full_sig[arg] = kind
            if kind.startswith("*"):  # a PyTorch allocation: 16-byte aligned
                divisible.append(arg)
            continue
        try:
            kind, div = specialize_int(kind)
        except TypeError:
            raise TypeError(f"signature[{arg!r}] of {name} must be a type string or an int, got {kind!r}") from None
        full_sig[arg] = kind
        if kind == "constexpr":
            consts[arg] = div
        elif div:
            divisible.append(arg)
    return full_sig, consts, tuple(divisible)


def _assemble(ptx: str, target: Any, options: dict[str, int]) -> tuple[bytes, str]:
    """``(cubin, ptxas -v log)`` from Triton's own ptxas step, with the tool and options the
    launcher's compile uses (the compile's cached cubin comes without its log)."""
    from triton.backends.nvidia.compiler import CUDABackend

    backend = CUDABackend(target)
    opts = backend.parse_options(dict(options))
    log = io.StringIO()
    saved = os.environ.get("TRITON_DUMP_PTXAS_LOG")
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # make_cubin prints the log
    try:
        with contextlib.redirect_stdout(log):
            cubin = backend.make_cubin(ptx, {}, opts, target.arch)
    finally:
        if saved is None:
            os.environ.pop("TRITON_DUMP_PTXAS_LOG", None)
        else:
            os.environ["TRITON_DUMP_PTXAS_LOG"] = saved
    return cubin, log.getvalue()


def _compile_here(
    fn: Any,
    signature: dict[str, str | int],
    constexprs: dict[str, object],
    arch: int,
    num_warps: int,
    num_stages: int,
) -> CompileStats:
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    full_sig, consts, divisible = _resolve(fn, signature, constexprs)
    arg_names = list(full_sig)
    attrs = {(arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible}
    src = ASTSource(fn=fn, signature=full_sig, constexprs=consts, attrs=attrs)
    target = GPUTarget("cuda", arch, 32)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    compiled = triton_compile(src, target=target, options=options)
    ptx = compiled.asm["ptx"]
    cubin, log = _assemble(ptx, target, options)
    registers, spill_bytes = _ptxas_figures(log)
    return CompileStats(
        arch=arch,
        registers=registers,
        spill_bytes=spill_bytes,
        shared_mem=int(getattr(compiled.metadata, "shared", 0) or 0),
        ptx=ptx,
        cubin=cubin,
        signature=full_sig,
        divisible=divisible,
        ptxas_version=tool("ptxas", arch)[1],
    )


if __name__ == "__main__":
    _serve()
