"""The shape of the code: no import circle (lazy imports inside functions included), no module over
~500 lines, and a command line whose commands only parse options and call their job.

A circle of lazy imports runs, but it means two modules cannot be read, tested or moved one
without the other; the walk below reads every ``import`` of the three packages and fails on a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import attention_variants
import attn_bench
import attn_kernels

PACKAGES = (attention_variants, attn_kernels, attn_bench)
MAX_LINES = 500


def modules_of(package_dir: Path, name: str) -> dict[str, Path]:
    """``{dotted name: file}`` of every module under ``package_dir`` (a package named ``name``)."""
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join([name, *parts])] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST):
    """Every Import/ImportFrom node, skipping ``if TYPE_CHECKING:`` bodies."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            yield from (n for child in node.orelse for n in _imports(ast.Module(body=[child], type_ignores=[])))
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        yield from _imports(node)


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """``{module: modules it imports}`` among ``modules``. Importing ``a.b.c`` also imports the
    packages ``a`` and ``a.b``, except those the importer sits in (they are initialised first)."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        inside = {".".join(mod.split(".")[:i]) for i in range(1, mod.count(".") + 1)}
        for node in _imports(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, *([node.module] if node.module else [])])
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else base)
            for target in targets:
                parts = target.split(".")
                for i in range(1, len(parts) + 1):
                    dep = ".".join(parts[:i])
                    explicit = i == len(parts)
                    if dep in modules and dep != mod and (explicit or dep not in inside):
                        graph[mod].add(dep)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return [*path[path.index(dep) :], dep]
            if dep not in state and (found := visit(dep)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def all_modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        out.update(modules_of(Path(package.__file__).parent, package.__name__))
    return out


def test_no_import_cycle():
    cycle = find_cycle(import_graph(all_modules()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_sees_lazy_and_relative_imports(tmp_path):
    """The walker must find a circle closed by a lazy relative import, and ignore TYPE_CHECKING."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import g\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\n")
    graph = import_graph(modules_of(pkg, "pkg"))
    assert find_cycle(graph) is None
    (pkg / "c.py").write_text("def g():\n    from .a import x\n")
    assert find_cycle(import_graph(modules_of(pkg, "pkg"))) == ["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]


def test_modules_stay_short():
    """A module over ~500 lines is two modules: split it where its parts stop sharing names.
    The Triton kernel files (attn_kernels) are left out: a kernel stays in one file with its
    tile constants and the autograd function that launches it."""
    long = {
        m: n
        for m, p in all_modules().items()
        if not m.startswith("attn_kernels") and (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_cli_commands_are_thin():
    """Each ``attn-bench`` command is at most 40 lines, options included: the checks live with the
    job (its ``*_command`` function), so the API and the CLI refuse the same values the same way."""
    path = Path(attn_bench.__file__).parent / "cli.py"
    tree = ast.parse(path.read_text())
    commands = [
        node
        for node in tree.body
        if isinstance(node, ast.FunctionDef)
        and any("command" in ast.unparse(d) or "callback" in ast.unparse(d) for d in node.decorator_list)
    ]
    assert len(commands) >= 10, [c.name for c in commands]
    long = {c.name: c.end_lineno - c.lineno + 1 for c in commands if c.end_lineno - c.lineno + 1 > 40}
    assert not long, f"commands over 40 lines: {long}"
