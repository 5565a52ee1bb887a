"""Which modules the velocity monitor hooks (``layers=``), and on which output dim their neurons lie.

``layers=`` is ``None`` (the default types), or one selector or a sequence of selectors, each of which is
a module type (``nn.Linear``), a name or name glob (``"head"``, ``"features.*"``, as in
``model.named_modules()``) or a predicate ``(name, module) -> bool``. A module is hooked when any
selector matches it.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

from torch import nn

#: Modules whose neurons lie on dim 1 of their output ``(N, C, ...)``.
CHANNELS_FIRST: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
)
#: Modules whose neurons lie on the last dim of their output ``(N, ..., C)``.
CHANNELS_LAST: tuple[type[nn.Module], ...] = (nn.Linear, nn.LayerNorm)
#: The layer types hooked by default.
DEFAULT_LAYER_TYPES: tuple[type[nn.Module], ...] = CHANNELS_FIRST + CHANNELS_LAST

#: One selector: a module type, a name glob, or a predicate ``(name, module) -> bool``.
LayerSelector = type[nn.Module] | str | Callable[[str, nn.Module], bool]
#: What ``layers=`` takes: ``None``, one selector, or a sequence of selectors.
LayerSelection = LayerSelector | Sequence[LayerSelector] | None

_HOW = (
    "pass a module type (nn.Linear), a name or name glob ('head', 'features.*'), a predicate"
    " (name, module) -> bool, or a sequence of these"
)


def neuron_dim(module: nn.Module) -> int:
    """The output dim that indexes neurons: last for Linear/LayerNorm, 1 for everything else."""
    return -1 if isinstance(module, CHANNELS_LAST) else 1


def _matcher(item: Any, layers: Any) -> Callable[[str, nn.Module], bool]:
    if isinstance(item, str):
        return lambda name, _m: fnmatch.fnmatchcase(name, item)
    if isinstance(item, type):
        if not issubclass(item, nn.Module):
            raise TypeError(f"layers= got the type {item.__name__}, which is not an nn.Module type; {_HOW}.")
        return lambda _n, module: isinstance(module, item)
    if callable(item):
        return lambda name, module: bool(item(name, module))
    raise TypeError(f"layers= got {item!r} in {layers!r}; {_HOW}.")


def select_layers(model: nn.Module, layers: LayerSelection = None) -> dict[str, nn.Module]:
    """The modules to hook, by name as in ``model.named_modules()``.

    ``layers`` is ``None`` (the default types: Conv/ConvTranspose 1-3d, Linear, BatchNorm 1-3d,
    LayerNorm), or one selector, or a sequence of selectors: a module type, a name glob (``"head"``,
    ``"features.*"``), a predicate ``(name, module) -> bool``. A module is selected when any selector
    matches it.

    Raises:
        TypeError: a selector is none of these.
        ValueError: the selection is empty or matches no module.
    """
    if layers is None:
        chosen = {n: m for n, m in model.named_modules() if isinstance(m, DEFAULT_LAYER_TYPES)}
        if not chosen:
            raise ValueError(
                f"{type(model).__name__} has no layer NeVe hooks by default (Conv1d/2d/3d, ConvTranspose1d/2d/3d,"
                " Linear, BatchNorm1d/2d/3d, LayerNorm). Choose the layers to measure with `layers=`: module"
                " types, name globs, or a predicate (name, module) -> bool."
            )
        return chosen
    if isinstance(layers, (str, type)) or callable(layers):
        items: list[Any] = [layers]  # one selector (a str is a glob, not a sequence of one-letter globs)
    elif isinstance(layers, Iterable):
        items = list(cast(Iterable[Any], layers))
        if not items:
            raise ValueError(f"layers= is empty: {_HOW}, or None for the default types.")
    else:
        raise TypeError(f"layers= got {layers!r}; {_HOW}.")
    matchers = [_matcher(item, layers) for item in items]
    chosen = {n: m for n, m in model.named_modules() if any(match(n, m) for match in matchers)}
    if not chosen:
        names = [n for n, _ in model.named_modules() if n][:12]
        raise ValueError(
            f"layers={layers!r} matches no module of {type(model).__name__}. Module names look like"
            f" {names}; pass types, globs or a predicate that selects at least one of them."
        )
    return chosen
