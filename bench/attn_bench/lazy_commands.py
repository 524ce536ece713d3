"""Commands of ``attn-bench`` whose options come from the variant registry, built lazily.

The registry imports torch, which takes seconds; ``attn-bench --help`` and the commands that do
not need it should not pay for it. Such a command is registered with a stub that has its help
text and no options (:func:`stub`), and a click command class (:func:`lazy`) that builds the
real command the first time its options or callback are asked for, after plug-ins are loaded.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Annotated, Any

import click
import typer
import typer.main
from typer.core import TyperCommand

from attn_bench.core.config import sweep_options
from attn_bench.sweep.command import flag

KW = inspect.Parameter.KEYWORD_ONLY


class LazyCommand(TyperCommand):
    """A command whose options come from the variant registry (which imports torch): built by its
    ``factory`` the first time its options or its callback are asked for (parsing its command
    line, its own ``--help``), so that ``attn-bench --help`` and the other commands do without.
    Plug-ins are loaded before the command is built, so their options are there too."""

    factory: Callable[[], Callable[..., None]]
    _built: click.Command | None = None

    def _full(self) -> click.Command:
        if self._built is None:
            one = typer.Typer(add_completion=False)
            one.command(self.name)(type(self).factory())
            self._built = typer.main.get_command(one)
        return self._built

    # What click reads to parse, show help and run; what the stub sets here is dropped.
    params = property(lambda self: self._full().params, lambda self, value: None)  # type: ignore[assignment]
    callback = property(lambda self: self._full().callback, lambda self, value: None)  # type: ignore[assignment]


def lazy(factory: Callable[[], Callable[..., None]]) -> type[LazyCommand]:
    return type("LazyCommand", (LazyCommand,), {"factory": staticmethod(factory)})


def stub(doc: str | None) -> Callable[[], None]:
    """What typer registers for a lazy command: the help text, no options (see :class:`LazyCommand`)."""

    def command() -> None:
        raise AssertionError("the real command is built by LazyCommand")

    command.__doc__ = doc
    return command


def with_variant_options(fn: Callable[..., None]) -> Callable[..., None]:
    """``fn`` with an int option per variant sweep option it does not name (``--window``,
    ``--num-features``, a plug-in's), passed on in its ``**variant_options``; rebuilt by
    ``attn-bench``'s command installer after plug-ins declare more."""
    params = [p.replace(kind=KW) for p in inspect.signature(fn, eval_str=True).parameters.values()]
    params = [p for p in params if p.name != "variant_options"]
    extra = []
    for o in sweep_options():
        if o.name not in {p.name for p in params}:
            opt = typer.Option(flag(o.name), help=f"{o.help} (the variants that take `{o.name}`) [default: theirs]")
            extra.append(inspect.Parameter(o.name, KW, default=None, annotation=Annotated[int | None, opt]))

    def command(**kwargs: Any) -> None:
        fn(**kwargs)

    command.__signature__ = inspect.Signature(params + extra)  # type: ignore[attr-defined]
    command.__doc__, command.__name__ = fn.__doc__, fn.__name__
    return command
