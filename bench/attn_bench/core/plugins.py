"""Plug-ins: a user's module or ``.py`` file that registers variants or backends.

``attn-bench sweep|verify|list --plugin SPEC`` imports ``SPEC`` before anything else runs (and
each benchmark worker imports it again). A plug-in registers with the public API:
:func:`attention_variants.register_variant` (a new variant: at least ``dense`` or, for a masked
softmax, ``mask_mod``, and a ``torch`` backend) or :func:`attention_variants.register_backend` (a
backend of an existing variant). From then on it is listed, verified, swept and reported like the
project's own.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

_LOADED: dict[str, str] = {}


class PluginError(ValueError):
    """A plug-in could not be imported (the message says which and why)."""


def load_plugin(spec: str) -> str:
    """Import ``spec``: a ``.py`` file path or an importable module name. Importing the same spec
    twice is a no-op. Returns the spec as another process should import it (files: absolute)."""
    path = Path(spec)
    is_file = spec.endswith(".py") or path.is_file()
    key = str(path.resolve()) if is_file else spec
    if key in _LOADED:
        return key
    try:
        if is_file:
            if not path.is_file():
                raise PluginError(f"plug-in file {spec} does not exist")
            name = f"attn_bench_plugin_{path.stem}"
            module_spec = importlib.util.spec_from_file_location(name, path)
            if module_spec is None or module_spec.loader is None:
                raise PluginError(f"cannot import {spec} as a Python file")
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            module_spec.loader.exec_module(module)
        else:
            importlib.import_module(spec)
    except PluginError:
        raise
    except Exception as exc:
        raise PluginError(f"importing plug-in {spec} failed: {type(exc).__name__}: {exc}") from exc
    _LOADED[key] = spec
    return key


def load_plugins(specs: tuple[str, ...] | list[str]) -> None:
    for spec in specs:
        load_plugin(spec)
