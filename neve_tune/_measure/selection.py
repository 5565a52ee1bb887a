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

from .layertable import CHANNELS_FIRST, CHANNELS_LAST, SEQUENCE_OUTPUT, layer_rule

#: The module types hooked by default (the built-in rows of the layer table, ``layertable.py``); classes
#: registered with :func:`register_layer_rule` and HF ``Conv1D`` (matched by name) are added to them.
DEFAULT_LAYER_TYPES: tuple[type[nn.Module], ...] = CHANNELS_FIRST + CHANNELS_LAST + SEQUENCE_OUTPUT

#: One selector: a module type, a name glob, or a predicate ``(name, module) -> bool``.
LayerSelector = type[nn.Module] | str | Callable[[str, nn.Module], bool]
#: What ``layers=`` takes: ``None``, one selector, or a sequence of selectors.
LayerSelection = LayerSelector | Sequence[LayerSelector] | None

_HOW = (
    "pass a module type (nn.Linear), a name or name glob ('head', 'features.*'), a predicate"
    " (name, module) -> bool, or a sequence of these"
)


def neuron_dim(module: nn.Module) -> int:
    """The output dim that indexes neurons, from the layer table (1 for a class it does not know)."""
    return layer_rule(module).dim


def is_default_layer(module: nn.Module) -> bool:
    """Whether ``layers=None`` hooks this module (its class has a default rule in the layer table)."""
    return layer_rule(module).default


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

    ``layers`` is ``None`` (the default rows of the layer table: Conv/ConvTranspose 1-3d, BatchNorm 1-3d,
    Linear, LayerNorm, RMSNorm, Embedding, HF Conv1D, RNN/LSTM/GRU, MultiheadAttention, and the classes
    registered with ``register_layer_rule``), or one selector, or a sequence of selectors: a module type,
    a name glob (``"head"``, ``"features.*"``), a predicate ``(name, module) -> bool``. A module is
    selected when any selector matches it.

    Raises:
        TypeError: a selector is none of these.
        ValueError: the selection is empty or matches no module.
    """
    if layers is None:
        chosen = {n: m for n, m in model.named_modules() if is_default_layer(m)}
        if not chosen:
            raise ValueError(
                f"{type(model).__name__} has no layer NeVe hooks by default (Conv1d/2d/3d, ConvTranspose1d/2d/3d,"
                " BatchNorm1d/2d/3d, Linear, LayerNorm, Embedding, HF Conv1D, RNN/LSTM/GRU, MultiheadAttention)."
                " Choose the layers to measure with `layers=`: module types, name globs, or a predicate"
                " (name, module) -> bool; say how to read a new type with `neve_tune.register_layer_rule`."
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
