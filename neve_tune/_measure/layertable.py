"""The layer table: per module class, which part of its output holds the responses and on which dim the
neurons lie, and whether the class is measured by default.

=========================================================  ============  ====================
module class                                               output read   neuron dim
=========================================================  ============  ====================
Conv1d/2d/3d, ConvTranspose1d/2d/3d, BatchNorm1d/2d/3d     the tensor    1 (``(N, C, ...)``)
Linear, LayerNorm, RMSNorm, Embedding, HF ``Conv1D``       the tensor    last
RNN, LSTM, GRU                                             ``output[0]``  last (hidden x directions)
MultiheadAttention                                         ``output[0]``  last (embed_dim)
=========================================================  ============  ====================

HF ``Conv1D`` (GPT-2's projections) is recognised by its class name and package (``transformers...``), so
transformers is never imported here. Recurrent and attention layers with ``batch_first=False`` return
``(T, N, C)``: the neuron dim is still the last one; only the order of each neuron's responses differs,
and it is the same at every measurement.

A module class is looked up along its MRO (a subclass of ``nn.Linear`` is read like ``nn.Linear``); rules
added with :func:`register_layer_rule` come before the built-in ones. A module with no rule (selected with
``layers=``) is read as a tensor with neurons on dim 1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class LayerRule:
    """How to read one module class's neurons.

    Attributes:
        output: index into a tuple/list output (``0`` for an LSTM's ``(output, (h, c))``), or ``None`` when
            the module returns the tensor itself.
        dim: the dim of that tensor that indexes neurons (negative counts from the end).
        default: whether modules of this class are hooked when ``layers=None``.
    """

    output: int | None = None
    dim: int = -1
    default: bool = True


_Match = Callable[[type], bool]

_FIRST = (
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
_LAST: tuple[type[nn.Module], ...] = (nn.Linear, nn.LayerNorm, nn.Embedding) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
)
_SEQUENCE_FIRST = (nn.RNN, nn.LSTM, nn.GRU, nn.MultiheadAttention)


def _is(cls: type) -> _Match:
    return lambda c: c is cls


def _named(name: str) -> _Match:
    """A class called ``name`` (bare, or qualified ``package.module.Class``)."""
    if "." in name:
        return lambda c: f"{c.__module__}.{c.__qualname__}" == name
    return lambda c: c.__name__ == name


def _hf_conv1d(c: type) -> bool:
    return c.__name__ == "Conv1D" and c.__module__.split(".")[0] == "transformers"


_BUILTIN: list[tuple[_Match, LayerRule]] = [
    *((_is(t), LayerRule(dim=1)) for t in _FIRST),
    *((_is(t), LayerRule(dim=-1)) for t in _LAST),
    *((_is(t), LayerRule(output=0, dim=-1)) for t in _SEQUENCE_FIRST),
    (_hf_conv1d, LayerRule(dim=-1)),
]
_USER: list[tuple[_Match, LayerRule]] = []
#: The rule of a module class with none: the tensor, neurons on dim 1, not hooked by default.
FALLBACK = LayerRule(output=None, dim=1, default=False)

#: The built-in classes whose neurons lie on dim 1 / on the last dim / on the last dim of ``output[0]``.
CHANNELS_FIRST: tuple[type[nn.Module], ...] = _FIRST
CHANNELS_LAST: tuple[type[nn.Module], ...] = _LAST
SEQUENCE_OUTPUT: tuple[type[nn.Module], ...] = _SEQUENCE_FIRST


def register_layer_rule(
    layer: type[nn.Module] | str, *, output: int | None = None, dim: int = -1, default: bool = True
) -> None:
    """Tell NeVe how to read a module class's neurons, and whether to measure it by default.

    Args:
        layer: an ``nn.Module`` subclass (its subclasses follow it), or a class name, bare (``"Conv1D"``)
            or qualified (``"mypkg.layers.MyAttention"``), for classes of packages you would rather not
            import.
        output: index into the module's tuple/list output that holds the responses, or ``None`` when it
            returns the tensor.
        dim: the dim of that tensor indexing neurons (``-1``: the last, ``1``: channels of ``(N, C, ...)``).
        default: measure modules of this class when ``layers=None`` (``False``: only read them this way
            when ``layers=`` selects them).

    A later rule for the same class replaces an earlier one. It applies to monitors built afterwards.

    Raises:
        TypeError: ``layer`` is neither an ``nn.Module`` subclass nor a string, or ``output``/``dim`` is
            not an integer.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import neve_tune
        >>> class Pair(nn.Module):
        ...     def forward(self, x):
        ...         return x * 2, x
        >>> neve_tune.register_layer_rule(Pair, output=0, dim=-1)
    """
    if isinstance(layer, str):
        match = _named(layer)
    elif isinstance(layer, type) and issubclass(layer, nn.Module):
        match = _is(layer)
    else:
        raise TypeError(f"register_layer_rule takes an nn.Module subclass or a class name, but got {layer!r}.")
    if output is not None and (isinstance(output, bool) or not isinstance(output, int)):
        raise TypeError(f"output must be an integer index or None, but got {output=}.")
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an integer, but got {dim=}.")
    _USER.insert(0, (match, LayerRule(output=output, dim=dim, default=bool(default))))


def layer_rule(module: nn.Module) -> LayerRule:
    """The rule for ``module``: the first class of its MRO with a user rule, else with a built-in one."""
    for cls in type(module).__mro__:
        for match, rule in _USER:
            if match(cls):
                return rule
        for match, rule in _BUILTIN:
            if match(cls):
                return rule
    return FALLBACK
