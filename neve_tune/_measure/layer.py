"""What the velocity monitor keeps per hooked module, and the error an abandoned measurement raises.

:class:`Layer` is one plain record per hooked module. The monitor's hooks read it; each mechanism owns
its own fields and is the only one that writes them:

* the monitor (``monitor.py``): ``name``, ``module``, ``dim``, ``output``, ``segment``, ``calls``;
* the snapshot (``snapshot.py``): ``layout``, ``snapshots``;
* BatchNorm fusion (``bnfuse.py``): ``fed_by``, ``feeds``, ``affine``, ``expect``;
* the accumulators (``accumulate.py``): ``views``, ``scale``, ``first_stale``;
* position subsampling (``subsample.py``): ``sample_index``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

#: One recorded output slice: shape, dtype, device and memory order (outermost dim first; the snapshot
#: slice is laid out like the output, so channels_last outputs keep channels_last snapshots).
Slot = tuple[torch.Size, torch.dtype, torch.device, tuple[int, ...]]
#: What identifies a tensor's contents: data pointer, shape, strides and in-place version.
Signature = tuple[int, tuple[int, ...], tuple[int, ...], int]
#: The fields that are views of the monitor's flat buffers (or transient): a copy rebuilds them.
REBUILT_ON_COPY = ("snapshots", "views", "affine", "expect")


class MeasurementError(RuntimeError):
    """The model did not run the same way on the aux set as before; the measurement was abandoned."""


def signature(t: Tensor) -> Signature:
    """Identifies a tensor's contents: where it lives, its shape, strides and in-place version."""
    return (t.data_ptr(), tuple(t.shape), t.stride(), t._version)


class Layer:
    """Hook-side state of one hooked module: where its neurons sit, its snapshot slices, its pairing."""

    __slots__ = (
        "affine",
        "calls",
        "dim",
        "expect",
        "fed_by",
        "feeds",
        "first_stale",
        "layout",
        "module",
        "name",
        "output",
        "sample_index",
        "scale",
        "segment",
        "snapshots",
        "views",
    )

    def __init__(self, name: str, module: nn.Module, dim: int, output: int | None = None) -> None:
        self.name = name
        self.module = module
        self.dim = dim  # the output dim that indexes neurons (may be negative)
        self.output = output  # index into a tuple/list output holding the responses; None: the tensor itself
        self.segment: slice | None = None  # slice of the flat per-neuron buffers; None until the first output
        self.calls = 0  # invocations so far on the current aux batch
        # layout[call][batch]: (shape, dtype, device, memory order) of that slice, recorded by the
        # baseline's first pass; snapshots[call][batch]: the previous output of the call-th invocation on
        # that aux batch (None for a slice that keeps no snapshot).
        self.layout: list[list[Slot | None]] = []
        self.snapshots: list[list[Tensor | None]] = []
        # Eval-mode BatchNorm fed directly by another hooked module (the "source"): per call, the source and
        # its call (fed_by, on the BatchNorm) and the BatchNorm and its call (feeds, on the source). Such a
        # BatchNorm keeps no snapshot: its sums come from the source's pass, through affine = (alpha, beta
        # now; alpha, beta at the previous measurement), 4 x neurons in float64.
        self.fed_by: list[tuple[Layer, int] | None] = []
        self.feeds: list[tuple[Layer, int] | None] = []
        self.affine: Tensor | None = None
        self.expect: Signature | None = None  # the input a fed BatchNorm must get on this aux batch
        # (cur_sq, diff_sq, scale, first_sq): this layer's views of the flat per-neuron buffers.
        self.views: tuple[Tensor, Tensor, Tensor, Tensor] | None = None
        self.scale: Tensor | None = None  # s, in the compute dtype, shaped to broadcast over the output
        self.first_stale = False  # first_sq is out of date (the kernel path, which uses s = 1, ran last)
        self.sample_index: list[Tensor | None] = []  # per call, bounded-memory position subsample

    def __getstate__(self) -> dict[str, Any]:
        """Every field but the views of the monitor's flat buffers, which the monitor rebuilds on the copy."""
        return {k: getattr(self, k) for k in self.__slots__ if k not in REBUILT_ON_COPY}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.snapshots, self.views, self.affine, self.expect = [], None, None, None
        for key, value in state.items():
            setattr(self, key, value)
