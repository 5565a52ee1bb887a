"""The class predictions of one batch's model outputs, for counting flips (no label is read)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["NoClassOutput", "as_indices", "class_predictions", "logits_of", "num_classes"]


class NoClassOutput(ValueError):
    """The model's outputs hold no class scores (a regression head, integer outputs): nothing to count."""


def logits_of(outputs: Any) -> Tensor:
    """The logits tensor inside ``outputs``.

    Accepted: a tensor; a mapping with a ``"logits"`` entry (a dict, a Hugging Face ``ModelOutput``); any
    object with a ``.logits`` tensor attribute.

    Raises:
        TypeError: nothing in ``outputs`` is a logits tensor (the message names what was there).
    """
    if isinstance(outputs, Tensor):
        return outputs
    if isinstance(outputs, Mapping):
        if "logits" in outputs and isinstance(outputs["logits"], Tensor):
            return outputs["logits"]
        raise TypeError(
            f"observe() needs the batch's logits, but the outputs mapping has no 'logits' tensor (keys:"
            f" {sorted(map(str, outputs.keys()))}); pass the logits tensor itself, e.g. `observe(out['scores'], idx)`."
        )
    logits = getattr(outputs, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    raise TypeError(
        f"observe() needs the batch's logits: a tensor, a dict with 'logits' or an object with a .logits tensor,"
        f" but got {type(outputs).__name__}. For a tuple output, pass its logits element."
    )


def class_predictions(outputs: Any) -> Tensor:
    """Each sample's (or token's) predicted class, as an integer tensor on the outputs' device.

    * ``(N, C)`` class logits, ``C >= 2``: the argmax over the last dim, shape ``(N,)``;
    * ``(N, T, C)`` token logits: one prediction per token, shape ``(N, T)``;
    * ``(N, C, d1, ...)`` with 4 or more dims (a segmentation map): one prediction per position, the argmax
      over dim 1 (the channel axis of convolutional outputs), flattened to ``(N, d1 * ...)``.

    Computed on the detached logits: no gradient, no copy to the host.

    Raises:
        NoClassOutput: the outputs are not class scores (integer or boolean values, a single output per
            sample such as a regression head ``(N,)`` or ``(N, 1)``, a scalar).
        TypeError: see :func:`logits_of`.
    """
    logits = logits_of(outputs).detach()
    if not logits.is_floating_point():
        raise NoClassOutput(f"the outputs are {logits.dtype} values, not float class scores")
    if logits.dim() < 2 or logits.shape[-1 if logits.dim() <= 3 else 1] < 2:
        raise NoClassOutput(
            f"outputs of shape {tuple(logits.shape)} hold one value per sample (a regression head?), not class scores"
        )
    if logits.dim() <= 3:
        return logits.argmax(dim=-1)
    return logits.argmax(dim=1).flatten(1)


def _preview(values: Any) -> str:
    """The first few of ``values``, for a message."""
    try:
        items = list(values)
    except TypeError:
        return repr(values)[:60]
    head = ", ".join(repr(v) for v in items[:3])
    return f"[{head}{', ...' if len(items) > 3 else ''}]"


def num_classes(outputs: Any) -> int:
    """The number of classes of outputs that :func:`class_predictions` reads (its argmax axis's length)."""
    logits = logits_of(outputs)
    return int(logits.shape[-1 if logits.dim() <= 3 else 1])


def as_indices(indices: Any, count: int) -> Tensor:
    """``indices`` (a tensor on any device, a list, a NumPy array) as a CPU int64 tensor of ``count`` values.

    Raises:
        ValueError: the number of indices differs from the batch size, or one is negative.
        TypeError: they are not integers (``None``, floats, strings).
    """
    if indices is None:
        raise TypeError(
            "observe() got indices=None: pass the batch's dataset indices, one integer >= 0 per sample (e.g. a"
            " Dataset that returns (x, y, index), or an 'index' column), in the batch's order."
        )
    try:
        idx = torch.as_tensor(indices).detach().reshape(-1)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(
            f"observe() needs integer dataset indices (positions 0..len(dataset)-1), but got"
            f" {type(indices).__name__} {_preview(indices)} ({err}). Pass the samples' positions in the dataset,"
            " not ids or names (e.g. dataset.map(lambda row, i: {'index': i}, with_indices=True))."
        ) from None
    if idx.is_floating_point() or idx.dtype == torch.bool or idx.is_complex():
        raise TypeError(
            f"observe() needs integer dataset indices, but got a {idx.dtype} tensor {_preview(idx.tolist())};"
            " pass them as integers (e.g. indices.long())."
        )
    if idx.numel() != count:
        raise ValueError(
            f"observe() got {idx.numel()} indices for a batch of {count} outputs: pass one dataset index per"
            " sample, in the batch's order (e.g. a Dataset that returns (x, y, index))."
        )
    idx = idx.to("cpu", torch.int64)
    if idx.numel() and int(idx.min()) < 0:
        raise ValueError(f"observe() got a negative dataset index ({int(idx.min())}); indices must be >= 0.")
    return idx
