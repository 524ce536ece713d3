"""What every job asks of the variant registry, so that no job names a variant.

- the order and colour of a variant's lines in every report (registration order: the project's
  variants, then plug-ins');
- a variant's options in a job: the sweep options it declares, at their defaults unless given;
- whether a variant can run a row (:func:`unsupported`: the reason, from what it declares);
- the pre-flight gate (:func:`preflight`): before a job writes anything, each variant it will run
  computes a tiny problem on the job's device, checked by the numerics gate against the float64
  ground truth, so that a broken plug-in (a missing backend, a wrong shape or dtype, wrong
  numbers) stops the job with a :class:`~attn_bench.core.results.RunSetupError` (exit 2).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import attention_variants as av
from attn_bench.core.results import RunSetupError

# Colour says the variant, in registration order (full blue, sliding window green, Performer red,
# then plug-ins).
PALETTE = ["tab:blue", "tab:green", "tab:red", "tab:purple", "tab:orange", "tab:brown", "tab:pink", "tab:olive"]

PREFLIGHT_N = 24  # tokens of the pre-flight problem (not a multiple of a tile)


def exact_variant() -> str:
    """The registry's exact softmax attention: the control line of the studies."""
    return av.EXACT_VARIANT


def order(variant: str) -> int:
    """A variant's place in the reports: its registration index; unknown names come last."""
    names = av.list_variants()
    return names.index(variant) if variant in names else len(names)


def color(variant: str) -> str | None:
    """The colour of a variant's lines in every plot (None: matplotlib's next)."""
    names = av.list_variants()
    return PALETTE[names.index(variant) % len(PALETTE)] if variant in names else None


def declared_options(variant: str, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The sweep options ``variant`` declares, each from ``given`` or at its declared default."""
    given = given or {}
    return {o.name: given.get(o.name, o.default) for o in av.variant_class(variant).sweep_options}


def check_names(names: Iterable[str], option: str = "--variants") -> list[str]:
    """``names`` if each is a registered variant, else RunSetupError naming ``option``."""
    names = list(names)
    unknown = [n for n in names if n not in av.list_variants()]
    if unknown:
        raise RunSetupError(
            option, f"unknown variant(s) {', '.join(unknown)}; variants are {', '.join(av.list_variants())}"
        )
    return names


def unsupported(variant: str, options: Mapping[str, Any], needs: Iterable[str]) -> str | None:
    """Why ``variant`` with ``options`` cannot run a row that needs ``needs`` (see
    :data:`attention_variants.NEEDS`), or None."""
    try:
        var = av.get_variant(variant, **options)
    except (TypeError, ValueError) as exc:
        return f"{variant} {dict(options)}: {exc}"
    for need in needs:
        reason = var.lacks(need)
        if reason is not None:
            return reason
    return None


def kernel_variant(family: str, options: Mapping[str, Any]) -> av.AttentionVariant:
    """The variant that drives a family of tuned kernels (``attn-bench tune``): the first registered
    variant that declares ``kernel_family == family`` and is built from ``options`` alone (a window,
    a feature count, none for full attention). ValueError when no registered variant does."""
    for name in av.list_variants():
        cls = av.variant_class(name)
        if cls.kernel_family == family and set(options) <= set(cls.option_names()):
            try:
                return av.get_variant(name, **options)
            except (TypeError, ValueError):  # it needs more options than these
                continue
    raise ValueError(f"no registered variant declares kernel_family={family!r} and takes {dict(options)}")


def blame(variant: str) -> str:
    """The option a refusal of ``variant`` names: ``--plugin`` for a plug-in's, else ``--variants``."""
    module = av.variant_class(variant).__module__
    return "--variants" if module.split(".")[0] == "attention_variants" else "--plugin"


def preflight(
    variant: str,
    options: Mapping[str, Any],
    causal: Iterable[bool],
    *,
    device: str = "cpu",
    grads: bool = True,
    option: str | None = None,
) -> None:
    """Run ``variant`` with ``options`` (backend ``auto``) on a tiny float32 problem on ``device``
    for each value of ``causal``, through the numerics gate; RunSetupError naming ``option``
    (default: :func:`blame`) when it cannot run, raises, or fails the gate."""
    import torch

    from attn_bench.core.numerics import check

    option = option or blame(variant)
    what = f"variant {variant!r} {dict(options) or ''}".rstrip()
    try:
        var = av.get_variant(variant, **options)
    except (TypeError, ValueError) as exc:
        raise RunSetupError(option, f"{what}: {exc}") from None
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, PREFLIGHT_N, 16, generator=gen).to(device) for _ in range(3))
    for c in causal:
        try:
            res = check(lambda a, b, d, c=c: var(a, b, d, causal=c, backend="auto"), var, q, k, v, c, grads=grads)
        except Exception as exc:  # a plug-in may raise anything: the job must not start
            raise RunSetupError(option, f"{what} (causal={c}) failed on a {PREFLIGHT_N}-token problem: "
                                f"{type(exc).__name__}: {exc}") from None  # fmt: skip
        if not res.ok:
            raise RunSetupError(option, f"{what} (causal={c}) fails the numerics gate: {res.message}")


def preflight_plugin_rows(rows: Iterable[Any]) -> None:
    """:func:`preflight` of every plug-in variant among a sweep's rows (``variant``, ``options``
    pairs, ``causal``, ``device``), with the causal settings its rows ask for. The project's own
    variants are checked by their tests; a sweep records a wrong backend as a ``wrong`` row."""
    todo: dict[tuple, set[bool]] = {}
    for r in rows:
        plugin = r.variant in av.list_variants() and blame(r.variant) == "--plugin"
        if plugin and bool(r.causal) in av.variant_class(r.variant).causal_modes:  # other rows: unsupported
            todo.setdefault((r.variant, tuple(r.options), r.device), set()).add(bool(r.causal))
    for (variant, options, device), causal in todo.items():
        preflight(variant, dict(options), sorted(causal), device=device)
