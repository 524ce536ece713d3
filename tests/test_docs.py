"""The documentation (README.md and docs/*.md) against the code: every ```python block runs, every
``attn-bench`` command parses with the real CLI (the cheap ones also run), every relative link resolves.

Python blocks of one file run in order in one namespace (a page's later blocks use the names of its
first); each block runs with its own copy of the variant registry, so a block that registers a
variant leaves nothing behind. An HTML comment on the line(s) right before a fence steers a block:

    <!-- doc-test: skip (why) -->          not run (a fragment that cannot run on its own)
    <!-- doc-test: xfail (why) -->         run; an exception marks it xfail (a known bug), not failed
    <!-- doc-test: requires MODULE -->     skipped when MODULE (an optional extra) is not installed
    <!-- doc-test: setup                   code run in the page's namespace first (the names a
    CODE                                   fragment takes as given), hidden on the rendered page
    -->

Commands: ```bash blocks are split into simple commands (``\\`` continuations, comments, ``&&``,
``||``, ``;`` and pipes); those whose program is ``attn-bench`` (``.venv/bin/attn-bench`` too) or
``python -m attn_bench.cli`` are parsed by the click command typer builds, without running them. A
``[...]`` part is optional syntax: the command is parsed with it included. ``attn-bench`` with no
words (or options only) is the root, which runs the default sweep. A command that loads the
documented plug-in (``--plugin chunked.py``) is parsed with that plug-in's options. Inline code that
starts with ``attn-bench`` is often a reference to a command or an option rather than a whole
command line (``attn-bench sweep --window``): there the command (``a|b`` for alternatives) must exist
and every ``--option`` named must be one of its options.
"""

from __future__ import annotations

import contextlib
import importlib.util
import re
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PLUGIN_MARK = '@av.register_variant("chunked")'  # the documented plug-in example (written as chunked.py)
RUN = {"list", "report"}  # commands cheap enough to run (on copies of a committed report)
REPORT = ROOT / "reports" / "decode-quick"  # the smallest committed report: DIR and OTHER_DIR of `report`


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


# --------------------------------------------------------------------------------------------- markdown


@dataclass
class Block:
    file: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    directive: str  # "", "skip", "xfail", "requires" or "setup"
    arg: str  # the reason, module or setup code


@dataclass
class Page:
    blocks: list[Block]
    prose: list[tuple[int, str]]  # (1-based line, text) outside fenced blocks


DIRECTIVE = re.compile(r"<!--\s*doc-test:\s*(skip|xfail|requires|setup)\b(.*?)-->", re.S)


def _directive(lines: list[str], fence: int) -> tuple[str, str]:
    """The ``doc-test`` comment that ends on the line before ``fence`` (0-based), if any."""
    end = fence - 1
    if end < 0 or not lines[end].rstrip().endswith("-->"):
        return "", ""
    start = end
    while start >= 0 and "<!--" not in lines[start]:
        start -= 1
    m = DIRECTIVE.search("\n".join(lines[start : end + 1]))
    if not m:
        return "", ""
    kind, arg = m.group(1), m.group(2)
    return kind, (arg.strip("\n") if kind == "setup" else arg.strip().strip("()").strip())


def parse_page(path: Path) -> Page:
    lines = path.read_text().split("\n")
    blocks, prose, i = [], [], 0
    while i < len(lines):
        m = re.match(r"^(```+|~~~+)\s*([\w+-]*)", lines[i])
        if not m:
            prose.append((i + 1, lines[i]))
            i += 1
            continue
        fence, lang, start = m.group(1), m.group(2).lower(), i
        i += 1
        body = []
        while i < len(lines) and not lines[i].startswith(fence):
            body.append(lines[i])
            i += 1
        assert i < len(lines), f"{rel(path)}:{start + 1}: unclosed code fence"
        i += 1
        blocks.append(Block(path, start + 1, lang, "\n".join(body) + "\n", *_directive(lines, start)))
    return Page(blocks, prose)


PAGES = {path: parse_page(path) for path in FILES}


def github_anchor(heading: str) -> str:
    """GitHub's heading anchor: markup dropped, lower case, punctuation removed, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, line in PAGES[path].prose if path in PAGES else parse_page(path).prose:
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = github_anchor(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
        out.update(re.findall(r"<a\s+(?:name|id)=\"([^\"]+)\"", line))
    return out


def _prose_text(page: Page) -> list[tuple[int, str]]:
    """Prose lines with inline code blanked out (a link inside backticks is not a link)."""
    return [(n, re.sub(r"`[^`]*`", lambda m: " " * len(m.group(0)), line)) for n, line in page.prose]


LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def links() -> list:
    params = []
    for path, page in PAGES.items():
        for n, line in _prose_text(page):
            for target in LINK.findall(line):
                if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                    continue
                params.append(pytest.param(path, n, target, id=f"link:{rel(path)}:{n}:{target}"))
    return params


def inline_commands() -> list:
    params = []
    for path, page in PAGES.items():
        text = "\n".join(line for _, line in page.prose)
        starts = {}  # offset of each line start -> line number, to report where a span begins
        offset = 0
        for n, line in page.prose:
            starts[offset] = n
            offset += len(line) + 1
        for m in re.finditer(r"`([^`]+)`", text):
            span = " ".join(m.group(1).split())
            if span == "attn-bench" or span.startswith("attn-bench "):
                n = starts[max(o for o in starts if o <= m.start())]
                params.append(pytest.param(path, n, span, id=f"inline:{rel(path)}:{n}:{span}"))
    return params


# --------------------------------------------------------------------------------------------- commands


OPERATORS = {"&&", "||", ";", "|", "&", "|&"}


def simple_commands(code: str) -> list[tuple[int, list[str]]]:
    """``(line offset, words)`` of each simple command in a shell block."""
    out = []
    lines = code.split("\n")
    i = 0
    while i < len(lines):
        first, logical = i, lines[i]
        while logical.endswith("\\") and i + 1 < len(lines):
            i += 1
            logical = logical[:-1] + " " + lines[i]
        i += 1
        lex = shlex.shlex(logical, posix=True, punctuation_chars=";&|")
        lex.whitespace_split = True
        lex.commenters = "#"
        words: list[str] = []
        for token in [*lex, ";"]:
            if token in OPERATORS:
                if words:
                    out.append((first, words))
                words = []
            else:
                words.append(token)
    return out


def attn_bench_args(words: list[str]) -> list[str] | None:
    """The CLI arguments of a command that runs attn-bench, or None for any other command."""
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):  # VAR=value prefixes
        words = words[1:]
    if not words:
        return None
    program = words[0].rsplit("/", 1)[-1]
    if program == "attn-bench":
        args = words[1:]
    elif re.match(r"^python[0-9.]*$", program) and words[1:3] == ["-m", "attn_bench.cli"]:
        args = words[3:]
    else:
        return None
    out = []
    for word in args:  # `[--flag value]`: optional syntax, parsed as given
        word = word.removeprefix("[").removesuffix("]")
        if word:
            out.append(word)
    return out


def commands() -> list:
    params = []
    for path, page in PAGES.items():
        for block in page.blocks:
            if block.lang not in ("bash", "sh", "shell", "console"):
                continue
            for offset, words in simple_commands(block.code):
                args = attn_bench_args(words)
                if args is not None:
                    n = block.line + 1 + offset
                    text = " ".join(["attn-bench", *args])
                    params.append(pytest.param(path, n, args, id=f"cmd:{rel(path)}:{n}:{text}"))
    return params


COMMANDS = commands()


def plugin_example() -> str:
    found = [b.code for page in PAGES.values() for b in page.blocks if b.lang == "python" and PLUGIN_MARK in b.code]
    assert len(found) == 1, "the docs must hold the chunked-attention plug-in example once"
    return found[0]


@contextlib.contextmanager
def own_registry():
    """Variants, backends and plug-ins registered inside are forgotten afterwards."""
    import attention_variants.base as base
    import attn_bench.core.plugins as plugins

    modules = set(sys.modules)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(base, "_VARIANTS", dict(base._VARIANTS))
        mp.setattr(base, "_EXTRA_BACKENDS", list(base._EXTRA_BACKENDS))
        mp.setattr(plugins, "_LOADED", dict(plugins._LOADED))
        try:
            yield
        finally:
            for name in set(sys.modules) - modules:
                if name.startswith("attn_bench_plugin_"):
                    del sys.modules[name]


@pytest.fixture(scope="module")
def plugin_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("plugin") / "chunked.py"
    path.write_text(plugin_example())
    return path


@pytest.fixture(scope="module")
def groups(plugin_file: Path) -> dict:
    """The click group of ``attn-bench`` as installed, and as ``main()`` rebuilds it after loading the
    documented plug-in (its sweep options become ``attn-bench sweep`` options)."""
    import typer.main

    from attn_bench import cli
    from attn_bench.core.plugins import load_plugin

    plain = typer.main.get_command(cli.app)
    with own_registry(), pytest.MonkeyPatch.context() as mp:
        for info in cli.app.registered_commands:
            mp.setattr(info, "callback", info.callback)
        load_plugin(str(plugin_file))
        cli._install_sweep_command()
        with_plugin = typer.main.get_command(cli.app)
        for name in ("sweep", "decode"):  # their options are built when first asked for: here, with the plug-in
            assert with_plugin.commands[name].params
    return {"plain": plain, "plugin": with_plugin}


def _group_for(args: list[str], groups: dict):
    plugins = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--plugin"]
    return groups["plugin"] if "chunked.py" in plugins else groups["plain"]


@pytest.mark.parametrize(("path", "line", "args"), COMMANDS)
def test_command_parses(path: Path, line: int, args: list[str], groups: dict) -> None:
    group = _group_for(args, groups)
    where = f"{rel(path)}:{line}: attn-bench {' '.join(args)}"
    root = not args or args[0].startswith("-")  # the root group; with no words it runs the default sweep
    if not root:
        assert args[0] in group.commands, f"{where}: no command {args[0]!r} (commands: {', '.join(group.commands)})"
    problem = None
    try:
        if root:
            group.make_context("attn-bench", list(args))
            if not args:
                group.commands["sweep"].make_context("sweep", [])
        else:
            group.commands[args[0]].make_context(args[0], list(args[1:]))
    except Exception as exc:  # click's UsageError and BadParameter (typer may ship its own click)
        problem = f"{type(exc).__name__}: {exc.format_message() if hasattr(exc, 'format_message') else exc}"
    if problem:
        pytest.fail(f"{where}: {problem}", pytrace=False)


RUNNABLE = [p for p in COMMANDS if p.values[2] and p.values[2][0] in RUN]


@pytest.mark.parametrize(("path", "line", "args"), RUNNABLE)
def test_cheap_command_runs(
    path: Path, line: int, args: list[str], plugin_file: Path, tmp_path: Path, monkeypatch
) -> None:
    """``list`` and ``report`` (on copies of a committed report, for DIR and OTHER_DIR) really run."""
    from typer.testing import CliRunner

    from attn_bench.cli import app

    shutil.copy(plugin_file, tmp_path / "chunked.py")
    for example in (ROOT / "docs" / "examples").glob("*.py"):  # the plug-in files shipped in docs/
        shutil.copy(example, tmp_path / example.name)
    for name in ("DIR", "OTHER_DIR"):
        shutil.copytree(REPORT, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    with own_registry():
        res = CliRunner().invoke(app, args)
    where = f"{rel(path)}:{line}: attn-bench {' '.join(args)}"
    assert res.exit_code == 0, f"{where}: exit {res.exit_code}\n{res.output[-3000:]}{res.exception!r}"
    if args[0] == "list":
        plugins = {"chunked.py": "chunked", "linear_attention.py": "linear_elu"}
        for name in ("full", "sliding_window", "performer", *(v for f, v in plugins.items() if f in args)):
            assert name in res.output, f"{where}: {name} not listed"
    else:
        assert "Decoding" in (tmp_path / "DIR" / "README.md").read_text(), where


@pytest.mark.parametrize(("path", "line", "span"), inline_commands())
def test_inline_command_names_exist(path: Path, line: int, span: str, groups: dict) -> None:
    words = span.split()[1:]
    group = groups["plain"]
    names = [words[0]] if words and not words[0].startswith("-") else []
    names = names[0].split("|") if names else [None]
    flags = {w.split("=", 1)[0].strip("[]") for w in words if w.lstrip("[").startswith("--")}
    for name in names:
        where = f"{rel(path)}:{line}: `{span}`"
        assert name is None or name in group.commands, f"{where}: no command {name!r}"
        command = group if name is None else group.commands[name]
        known = {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
        missing = sorted(f for f in flags if f not in known)
        assert not missing, f"{where}: {name or 'attn-bench'} has no option {', '.join(missing)}"


# --------------------------------------------------------------------------------------------- python


class PageRun:
    """Runs the python blocks of one page in order, once each, in one namespace."""

    def __init__(self, path: Path) -> None:
        self.blocks = [b for b in PAGES[path].blocks if b.lang == "python"]
        self.ns: dict = {"__name__": f"doc_{path.stem}"}
        self.outcomes: dict[int, BaseException | None] = {}

    def run(self, index: int) -> BaseException | None:
        for j in range(index + 1):
            if j not in self.outcomes:
                self.outcomes[j] = self._run(self.blocks[j])
        return self.outcomes[index]

    def _run(self, block: Block) -> BaseException | None:
        if block.directive == "skip" or (block.directive == "requires" and importlib.util.find_spec(block.arg) is None):
            return None
        name = f"{rel(block.file)}:{block.line}"
        try:
            with own_registry():
                if block.directive == "setup":
                    exec(compile(block.arg, f"{name} (setup)", "exec"), self.ns)
                exec(compile(block.code, name, "exec"), self.ns)
        except Exception as exc:
            return exc
        return None


_RUNS: dict[Path, PageRun] = {}


def python_blocks() -> list:
    params = []
    for path, page in PAGES.items():
        for index, block in enumerate(b for b in page.blocks if b.lang == "python"):
            params.append(pytest.param(path, index, id=f"python:{rel(path)}:{block.line}"))
    return params


@pytest.mark.parametrize(("path", "index"), python_blocks())
def test_python_block_runs(path: Path, index: int) -> None:
    runner = _RUNS.setdefault(path, PageRun(path))
    block = runner.blocks[index]
    if block.directive == "skip":
        pytest.skip(block.arg)
    if block.directive == "requires":
        pytest.importorskip(block.arg)
    exc = runner.run(index)
    if exc is not None and block.directive == "xfail":
        pytest.xfail(f"{block.arg}: {type(exc).__name__}: {exc}")
    if exc is not None:
        import traceback

        tb = "".join(traceback.format_exception(exc, limit=-3))
        pytest.fail(f"{rel(path)}:{block.line}: the python block raised\n{tb}", pytrace=False)


def test_plugin_example_is_found() -> None:
    assert "class ChunkedAttention" in plugin_example()


# --------------------------------------------------------------------------------------------- links


@pytest.mark.parametrize(("path", "line", "target"), links())
def test_link_resolves(path: Path, line: int, target: str) -> None:
    where = f"{rel(path)}:{line}: ({target})"
    file, _, anchor = target.partition("#")
    dest = (path.parent / file).resolve() if file else path
    assert dest.exists(), f"{where}: {file} does not exist"
    if anchor:
        assert dest.suffix == ".md" and dest.is_file(), f"{where}: an anchor into {file}, which is not a markdown file"
        assert anchor in anchors(dest), f"{where}: {rel(dest)} has no heading #{anchor}"


def test_readme_says_how_bare_commands_work_before_the_first_one() -> None:
    """The README opens with commands that name ``.venv/bin/...``; before its first bare
    ``attn-bench`` command it tells the reader to activate the virtual environment."""
    text = (ROOT / "README.md").read_text()
    activate = text.find("source .venv/bin/activate")
    first_bare = re.search(r"^attn-bench ", text, flags=re.MULTILINE)
    assert activate != -1 and first_bare is not None
    assert activate < first_bare.start()
    assert all(line.startswith("./install.sh && .venv/bin/") for line in text.split("```")[1].splitlines()[1:] if line)
