"""Parameter coverage: which share of a model's parameters sits in the modules NeVe measures.

A parameter is measured when the module holding it, or one of that module's ancestors, is hooked: an
``nn.MultiheadAttention`` hook covers ``in_proj_weight`` and ``out_proj``, whose own hook never fires (the
attention reads ``out_proj.weight`` directly). Each parameter counts once (tied weights too), by its
number of elements. A monitor warns once when the share is below :data:`COVERAGE_WARNING`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

from torch import nn

#: Below this share of measured parameters, the monitor warns (once) and names the biggest unmeasured modules.
COVERAGE_WARNING = 0.5


def _sized(params: Iterable[nn.Parameter]) -> dict[int, int]:
    return {id(p): p.numel() for p in params if not isinstance(p, nn.parameter.UninitializedParameter)}


def parameter_coverage(model: nn.Module, hooked: Iterable[nn.Module]) -> float:
    """The share (0..1) of ``model``'s parameter elements held by a hooked module or its descendants;
    1.0 for a model without parameters."""
    total = _sized(model.parameters())
    measured: set[int] = set()
    for module in hooked:
        measured.update(_sized(module.parameters()))
    size = sum(total.values())
    return 1.0 if size == 0 else sum(n for i, n in total.items() if i in measured) / size


def unmeasured_modules(model: nn.Module, hooked: Iterable[nn.Module], top: int = 5) -> list[tuple[str, str, int]]:
    """The modules holding the most unmeasured parameter elements, biggest first: ``(name, class, elements)``.

    A module's own parameters (not its children's) are what it holds; a model's top-level parameters are
    held by ``""``.
    """
    measured: set[int] = set()
    for module in hooked:
        measured.update(_sized(module.parameters()))
    seen: set[int] = set()
    held: list[tuple[str, str, int]] = []
    for name, module in model.named_modules():
        own = {i: n for i, n in _sized(module.parameters(recurse=False)).items() if i not in measured | seen}
        seen.update(own)
        if own:
            held.append((name, type(module).__name__, sum(own.values())))
    held.sort(key=lambda row: -row[2])
    return held[:top]


class CoverageWatch:
    """Warns once per monitor when its hooked modules cover less than :data:`COVERAGE_WARNING` of the
    model's parameters."""

    def __init__(self) -> None:
        self.warned = False

    def check(self, model: nn.Module, hooked: list[nn.Module], stacklevel: int = 3) -> None:
        """Warn (once) if the coverage of ``hooked`` is low, naming the biggest unmeasured modules
        (``stacklevel`` as in :func:`warnings.warn`, called here: 3 points at the caller's caller)."""
        if self.warned:
            return
        share = parameter_coverage(model, hooked)
        if share >= COVERAGE_WARNING:
            return
        self.warned = True
        rows = unmeasured_modules(model, hooked)
        names = ", ".join(f"'{n or '(top level)'}' ({cls}, {size:,} parameters)" for n, cls, size in rows)
        warnings.warn(
            f"NeVe measures only {share:.0%} of {type(model).__name__}'s parameters; the biggest unmeasured"
            f" modules: {names}. Measure them with `layers=` (module types, name globs or a predicate), and"
            " if their output is a tuple or their neurons are not on dim 1, say how to read it with"
            " `neve_tune.register_layer_rule(TheClass, output=..., dim=...)`.",
            UserWarning,
            stacklevel=stacklevel,
        )
