"""Per-neuron sums, and the one interface every hooked output goes through: :class:`Accumulator`.

For each output slice ``a`` and its stored previous slice ``b``, an accumulator adds per neuron
``||a||^2`` to ``cur_sq`` and ``||a - s*b||^2`` to ``diff_sq``, then overwrites ``b`` with ``a``:

* :class:`KernelSums` (CPU, float32/64, dense): the compiled kernel reads ``a`` and ``b`` once and sums in
  double, so ``s = 1``. It also computes the sums of an eval BatchNorm fed by this output (``bnfuse.py``).
* :class:`TorchSums` (GPU, AMP dtypes, no C compiler, or a slice the kernel does not take): PyTorch ops,
  with ``s = |a|/|b|`` measured on the first slice (call 0, aux batch 0) so that the finalisation stays
  well conditioned in float32.
* :class:`CopyOnly`: the baseline's second pass only fills the snapshot.

Hand-off between the two compute paths (per layer, decided on its first slice of a measurement): the
kernel path keeps no first-slice norms and uses ``s = 1``, so when it takes over it resets ``s`` and marks
``first_sq`` stale (``layer.first_stale``); when PyTorch ops take over they re-take the first-slice norms
from the snapshot before measuring ``s``. The per-layer fields this module owns are ``views``, ``scale``
and ``first_stale`` (see ``layer.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from . import kernel as _kernel
from .layer import Layer, MeasurementError

#: A slice that keeps no snapshot, computed: (layer, call, aux batch, dtype) -> tensor, None if not such.
FusedOutput = Callable[[Layer, int, int, torch.dtype], Tensor | None]


def sum_squares(x: Tensor, dim: int) -> Tensor:
    """Per-neuron sum of squares of ``x`` over every dim but ``dim``, in float32 or wider.

    Laid out so that PyTorch reduces contiguous rows (fast) instead of strided multi-dim reductions.
    """
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    size = x.shape[dim]
    if dim == x.ndim - 1 or x.stride(dim) == 1:  # neurons innermost: column sums of (rest, C)
        flat = x.movedim(dim, -1).reshape(-1, size)
        return (flat * flat).sum(0)
    rows = x.reshape(math.prod(x.shape[:dim]), size, -1)  # (batch-like, C, positions)
    norms = torch.linalg.vector_norm(rows, 2, 2)
    return (norms * norms).sum(0)


class NeuronSums:
    """The flat per-neuron state on the model's device (float64; float32 on MPS), one segment per layer.

    ``v`` (velocities), ``prev_sq`` (``||b||^2`` of the previous responses, carried between measurements),
    ``cur_sq``/``diff_sq`` (this measurement's sums), ``scale`` (``s``) and ``first_sq`` (``||b||^2`` of each
    neuron's first slice). ``layer_of`` maps each neuron to its layer's index and ``layer_counts`` holds the
    neurons per layer, ``d_weight`` each neuron's weight in D; every layer gets its views in ``layer.views``.
    """

    def __init__(self, v: Tensor, prev_sq: Tensor, first_sq: Tensor, layers: Sequence[Layer]) -> None:
        self.v = v
        self.cur_sq = torch.zeros_like(v)
        self.diff_sq = torch.zeros_like(v)
        self.scale = torch.ones_like(v)
        self.prev_sq = prev_sq
        self.first_sq = first_sq
        device, dtype = v.device, v.dtype
        layer_of = torch.empty(v.numel(), dtype=torch.long)
        sizes = []
        for i, layer in enumerate(layers):
            assert layer.segment is not None
            layer_of[layer.segment] = i
            sizes.append(layer.segment.stop - layer.segment.start)
        self.layer_of = layer_of.to(device)
        self.layer_counts = torch.tensor(sizes, dtype=dtype, device=device)
        # D = sum_i w_i * dv_i^2 with w_i = 1 / (num_layers * neurons_in_layer(i)).
        self.d_weight = (1.0 / (len(sizes) * self.layer_counts))[self.layer_of]
        self.attach(layers)

    def attach(self, layers: Sequence[Layer]) -> None:
        """Give every layer its views of the flat buffers (again, on a copy of the monitor)."""
        for layer in layers:
            seg = layer.segment
            layer.views = (self.cur_sq[seg], self.diff_sq[seg], self.scale[seg], self.first_sq[seg])

    @classmethod
    def zeros(cls, n: int, device: torch.device, layers: Sequence[Layer]) -> NeuronSums:
        """Fresh state for ``n`` neurons: zero velocities and norms."""
        dtype = torch.float32 if device.type == "mps" else torch.float64
        v, prev_sq, first_sq = (torch.zeros(n, dtype=dtype, device=device) for _ in range(3))
        return cls(v, prev_sq, first_sq, layers)

    def baseline(self, layers: Sequence[Layer], fused: FusedOutput) -> None:
        """The baseline's squared norms, from the snapshot just filled (in these buffers' precision, as the
        kernel does), then carried from measurement to measurement. ``fused(layer, call, batch, dtype)``
        gives the slices that keep no snapshot (fed BatchNorms)."""
        self.prev_sq.zero_()
        self.scale.fill_(1.0)
        dtype = self.v.dtype
        for layer in layers:
            assert layer.segment is not None
            for call, per_call in enumerate(layer.snapshots):
                for batch, stored in enumerate(per_call):
                    t = fused(layer, call, batch, dtype) if stored is None else stored
                    if t is None:
                        continue
                    part = sum_squares(t.to(dtype), layer.dim % t.ndim)
                    self.prev_sq[layer.segment] += part
                    if call == 0 and batch == 0:
                        self.first_sq[layer.segment] = part

    def start(self) -> None:
        """A measurement begins: clear its sums."""
        self.cur_sq.zero_()
        self.diff_sq.zero_()

    def nbytes(self) -> int:
        """Bytes of the six per-neuron buffers."""
        flat = (self.v, self.prev_sq, self.cur_sq, self.diff_sq, self.first_sq, self.scale)
        return sum(t.numel() * t.element_size() for t in flat)


def reset_scales(layers: Sequence[Layer], first_sq_current: bool) -> None:
    """Every layer restarts at ``s = 1``; ``first_sq_current`` tells whether ``first_sq`` holds the
    snapshot's first-slice norms (after a baseline) or must be re-taken (after a restore)."""
    for layer in layers:
        layer.scale, layer.first_stale = None, not first_sq_current


class Accumulator:
    """What every hooked output of a pass goes through: one :meth:`compare` call per output slice."""

    #: Whether this accumulator also computes the sums of an eval BatchNorm fed by the output it gets.
    fuses_batchnorm = False

    def compare(self, layer: Layer, call: int, batch: int, out: Tensor, prev: Tensor, dim: int) -> None:
        """Add this slice's per-neuron sums to ``layer.views``, then overwrite the snapshot slice ``prev``
        with ``out``. ``dim`` is the neuron dim of ``out`` (non-negative)."""
        raise NotImplementedError


class CopyOnly(Accumulator):
    """The baseline's filling pass: the snapshot takes the outputs, nothing is summed."""

    def compare(self, layer: Layer, call: int, batch: int, out: Tensor, prev: Tensor, dim: int) -> None:
        prev.copy_(out)


class TorchSums(Accumulator):
    """PyTorch ops, any device and dtype (half/bfloat16 outputs are compared in float32)."""

    def compare(self, layer: Layer, call: int, batch: int, out: Tensor, prev: Tensor, dim: int) -> None:
        if call < len(layer.feeds) and layer.feeds[call] is not None:
            raise MeasurementError(
                f"Module '{layer.name}' changed its output dtype or layout ({out.dtype}), so the BatchNorm that"
                " follows it can no longer be measured from its pass; the next measurement re-baselines."
            )
        assert layer.views is not None
        cur_sq, diff_sq, scale_flat, first_sq = layer.views
        wide = out.dtype if out.dtype in (torch.float32, torch.float64) else torch.float32
        part = sum_squares(out, dim)
        cur_sq.add_(part)
        if call == 0 and batch == 0:
            if layer.first_stale:  # the kernel ran last time and kept no first-slice norms: take them now
                first_sq.copy_(sum_squares(prev, dim))
                layer.first_stale = False
            # cos(a, b) = cos(a, s*b) for any s > 0. Comparing a with s*b, s ~ |a|/|b| (measured on this
            # first slice), keeps ||a - s*b||^2 - (|a| - s|b|)^2 well conditioned even when the norms
            # differ a lot. 0/0, x/0, inf and 0 fall back to s = 1. s is rounded to the compute dtype,
            # so that the finalisation uses exactly the s applied here.
            scale = (part / first_sq).sqrt_().nan_to_num_(1.0, 1.0, 1.0).to(wide)
            scale.masked_fill_(scale == 0, 1.0)
            scale_flat.copy_(scale)
            first_sq.copy_(part)
            layer.scale = scale.view([-1 if d == dim else 1 for d in range(out.ndim)])
        if layer.scale is None:  # the first slice went through the kernel, with s = 1
            layer.scale = scale_flat.to(wide).view([-1 if d == dim else 1 for d in range(out.ndim)])
        if out.dtype == wide and prev.dtype == wide:
            # prev <- out - s*prev, reduced while this layer's slice is still in cache; then prev <- out.
            diff_sq.add_(sum_squares(torch.addcmul(out, prev, layer.scale, value=-1.0, out=prev), dim))
        else:  # half/bfloat16 outputs (AMP): the difference in float32
            diff_sq.add_(sum_squares(torch.addcmul(out.to(wide), prev.to(wide), layer.scale, value=-1.0), dim))
        prev.copy_(out)


class KernelSums(Accumulator):
    """The compiled CPU kernel (``compare.c``): one pass over output and snapshot, sums in double, s = 1.

    Slices the kernel does not take (another dtype, a gapped layout) go through :class:`TorchSums`.
    """

    fuses_batchnorm = True

    def __init__(self, kernel: _kernel.Kernel) -> None:
        self.kernel = kernel
        self._fallback = TorchSums()

    def compare(self, layer: Layer, call: int, batch: int, out: Tensor, prev: Tensor, dim: int) -> None:
        kernel = self.kernel
        if not kernel.supports(out, prev):
            self._fallback.compare(layer, call, batch, out, prev, dim)
            return
        assert layer.views is not None
        cur_sq, diff_sq, scale_flat, _ = layer.views
        if call == 0 and batch == 0:
            if layer.scale is not None:  # the previous measurement went through PyTorch ops
                scale_flat.fill_(1.0)
                layer.scale = None
            layer.first_stale = True
        feeds = layer.feeds[call] if call < len(layer.feeds) else None
        if feeds is None:
            kernel.compare(out, prev, dim, scale_flat, cur_sq, diff_sq)
        else:
            bn = feeds[0]
            assert bn.views is not None and bn.affine is not None
            kernel.compare(out, prev, dim, scale_flat, cur_sq, diff_sq, bn.module, bn.affine, bn.views[0], bn.views[1])


def accumulator_for(device: torch.device) -> Accumulator:
    """How outputs on ``device`` are compared: the kernel on CPU where it is available, else PyTorch ops."""
    kernel = _kernel.get() if device.type == "cpu" else None
    return TorchSums() if kernel is None else KernelSums(kernel)
