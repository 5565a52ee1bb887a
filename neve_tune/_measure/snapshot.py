"""The snapshot: every hooked output of the previous measurement, in one flat buffer per (device, dtype).

The baseline's first pass records each output slice's :data:`~neve_tune._measure.layer.Slot` (shape, dtype,
device, memory order) in ``layer.layout``; :meth:`Snapshot.allocate` then sizes one flat buffer per
(device, dtype) and gives every slice a view of it, laid out like the output (a channels_last output gets a
channels_last view), so the copy into it and the kernel's pass over it walk memory linearly. Nothing is
allocated or concatenated per measurement, and a re-baseline with the same sizes reuses the buffers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from . import kernel as _kernel
from .layer import Layer, Slot

#: Per layer, per call, per aux batch: the slot that gets a snapshot view, or None for none.
StoredLayout = list[list[Slot | None]]


def memory_order(t: Tensor) -> tuple[int, ...]:
    """The memory order a snapshot slice for ``t`` gets: ``t``'s own if dense, else plain contiguous."""
    return _kernel.memory_order(t) or tuple(range(t.ndim))


def slot(t: Tensor, device: torch.device | None = None) -> Slot:
    """The slot a snapshot slice for ``t`` needs (on ``device``, default ``t``'s own)."""
    return (t.shape, t.dtype, t.device if device is None else device, memory_order(t))


class Snapshot:
    """One flat buffer per (device, dtype), and every stored slice a view of it (in ``layer.snapshots``)."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def allocate(self, layers: Sequence[Layer], stored: Sequence[StoredLayout]) -> None:
        """Give every slot of ``stored`` (one layout per layer) a view; reuse buffers of the same sizes."""
        sizes: dict[tuple[torch.device, torch.dtype], int] = {}
        for layout in stored:
            for per_call in layout:
                for entry in per_call:
                    if entry is not None:
                        shape, dtype, device, _ = entry
                        sizes[(device, dtype)] = sizes.get((device, dtype), 0) + shape.numel()
        current = {key: t.numel() for key, t in self.buffers.items()}
        if current != sizes:
            self.release(layers)  # let go of the old snapshot before allocating the new one
            self.buffers = {
                (device, dtype): torch.empty(n, dtype=dtype, device=device) for (device, dtype), n in sizes.items()
            }
        offsets = dict.fromkeys(sizes, 0)
        for layer, layout in zip(layers, stored, strict=True):
            layer.snapshots = []
            for per_call in layout:
                views: list[Tensor | None] = []
                for entry in per_call:
                    if entry is None:
                        views.append(None)
                        continue
                    shape, dtype, device, order = entry
                    start = offsets[(device, dtype)]
                    offsets[(device, dtype)] = start + shape.numel()
                    piece = self.buffers[(device, dtype)][start : start + shape.numel()]
                    # laid out like the output: the copy into it and the kernel's pass are then linear
                    view = piece.view([shape[d] for d in order]).permute([order.index(d) for d in range(len(order))])
                    views.append(view)
                layer.snapshots.append(views)

    def load(
        self,
        layers: Sequence[Layer],
        saved: Sequence[Sequence[Sequence[Tensor | None]]],
        replace: Mapping[tuple[str, int, int], Tensor],
    ) -> None:
        """Copy saved slices (per layer, call, batch) into the views; ``replace`` overrides some of them,
        keyed by (layer name, call, batch)."""
        for layer, per_layer in zip(layers, saved, strict=True):
            for call, (views, values) in enumerate(zip(layer.snapshots, per_layer, strict=True)):
                for batch, (view, value) in enumerate(zip(views, values, strict=True)):
                    if view is not None:
                        value = replace.get((layer.name, call, batch), value)
                        assert value is not None, f"no saved snapshot for a slice of '{layer.name}'"
                        view.copy_(value)

    @staticmethod
    def nbytes(layers: Sequence[Layer]) -> int:
        """Bytes held by the layers' snapshot views."""
        views = [t for layer in layers for per_call in layer.snapshots for t in per_call if t is not None]
        return sum(t.numel() * t.element_size() for t in views)

    def release(self, layers: Sequence[Layer]) -> None:
        """Drop every view and buffer."""
        for layer in layers:
            layer.snapshots = []
        self.buffers = {}
