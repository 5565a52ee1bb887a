"""BatchNorm fusion: an eval BatchNorm fed by a hooked module is measured from that module's pass.

An eval-mode BatchNorm whose input is exactly the output of the hooked module before it (conv -> BN)
computes ``alpha * x + beta`` per channel. On the kernel path its sums then come from that module's pass
(with alpha, beta now and at the previous measurement), and it keeps no snapshot of its own.

* Pairing: the baseline's first pass (:meth:`BatchNormFusion.observe`) pairs a BatchNorm with the output
  seen just before it, when that output is one the kernel takes (CPU, float32/64, dense) and the
  BatchNorm's input is that very tensor, unchanged; later aux batches must confirm the pair or it is
  dropped.
* Checking: every later pass (:meth:`BatchNormFusion.check_fed`) checks that the BatchNorm still takes
  that output (same data, shape, strides and version) and is still in eval mode; otherwise the
  measurement raises :class:`MeasurementError` and the next one re-baselines.
* Affine: one float64 (4, neurons) buffer holds, for every fed BatchNorm, alpha, beta now (rows 0-1,
  written by the kernel) and at the previous measurement (rows 2-3).

The per-layer fields it owns are ``fed_by``, ``feeds``, ``affine`` and ``expect`` (see ``layer.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from . import kernel as _kernel
from .layer import Layer, MeasurementError, Signature, signature
from .snapshot import StoredLayout, slot

# The last output that may feed a BatchNorm: (layer, call, signature, dtype).
_Output = tuple[Layer, int, Signature, torch.dtype]


def fits(module: nn.Module, inputs: Any, last: _Output) -> bool:
    """Whether ``module`` is an eval-mode, running-stats BatchNorm whose input is the output ``last``
    recorded, unchanged: its output is then an exact per-channel affine function of that output."""
    return (
        type(module) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
        and not module.training
        and getattr(module, "running_mean", None) is not None
        and getattr(module, "running_var", None) is not None
        and isinstance(inputs, tuple)
        and len(inputs) == 1
        and isinstance(inputs[0], Tensor)
        and inputs[0].dtype == last[3]
        and signature(inputs[0]) == last[2]
        and all(
            t is None or (isinstance(t, Tensor) and t.dtype == last[3] and t.device.type == "cpu" and t.is_contiguous())
            for t in (module.running_mean, module.running_var, module.weight, module.bias)
        )
    )


def batchnorm_affine(bn: nn.Module) -> tuple[Tensor, Tensor]:
    """alpha, beta (float64) with ``bn(x) = alpha * x + beta`` per channel, for a BatchNorm in eval mode."""
    assert isinstance(bn, nn.modules.batchnorm._BatchNorm)
    assert bn.running_mean is not None and bn.running_var is not None
    alpha = (bn.running_var.double() + bn.eps).rsqrt()
    if isinstance(bn.weight, Tensor):
        alpha = alpha * bn.weight.double()
    beta = -bn.running_mean.double() * alpha
    if isinstance(bn.bias, Tensor):
        beta = beta + bn.bias.double()
    return alpha, beta


class BatchNormFusion:
    """Finds, checks, saves and restores the BatchNorms measured from their source's pass."""

    def __init__(self) -> None:
        self.enabled = False  # whether the current baseline may pair (kernel path, no max_positions)
        self.affine: Tensor | None = None  # see allocate
        self._last: _Output | None = None

    # ------------------------------------------------------------------ baseline
    def start(self, layers: Sequence[Layer], enabled: bool) -> None:
        """A baseline begins: forget every pairing; pair anew only when ``enabled``."""
        for layer in layers:
            layer.fed_by, layer.feeds = [], []
        self.enabled = enabled
        self._last = None

    def end_pass(self) -> None:
        """The baseline's first pass is over."""
        self._last = None

    def observe(self, layer: Layer, call: int, module: nn.Module, inputs: Any, out: Tensor, batch: int) -> None:
        """Baseline, first pass, one hooked output: pair an eval BatchNorm with the output just seen from
        another hooked module (on aux batch 0), and keep pairs only if every later aux batch confirms them."""
        while len(layer.fed_by) <= call:
            layer.fed_by.append(None)
            layer.feeds.append(None)
        last, self._last = self._last, None
        # Only outputs that the kernel will take (CPU, float32/64, dense) can feed a BatchNorm's sums.
        if (
            self.enabled
            and out.device.type == "cpu"
            and out.dtype in (torch.float32, torch.float64)
            and _kernel.memory_order(out) is not None
        ):
            self._last = (layer, call, signature(out), out.dtype)
        if batch > 0:  # confirm on later batches; drop a pair that does not hold
            pair = layer.fed_by[call]
            if pair is not None and (last is None or last[:2] != pair or not fits(module, inputs, last)):
                layer.fed_by[call] = None
                pair[0].feeds[pair[1]] = None
            return
        if last is None or not fits(module, inputs, last) or layer.dim % out.ndim != 1:
            return
        source, source_call = last[0], last[1]
        if source is layer or source.dim % out.ndim != 1 or source.fed_by[source_call] is not None:
            return
        if source.feeds[source_call] is None:
            layer.fed_by[call] = (source, source_call)
            source.feeds[source_call] = (layer, call)

    @staticmethod
    def stored_layout(layer: Layer) -> StoredLayout:
        """The layout of the slices that get a snapshot: all but those of BatchNorms fed by a source."""
        return [
            [None] * len(per_call) if call < len(layer.fed_by) and layer.fed_by[call] is not None else per_call
            for call, per_call in enumerate(layer.layout)
        ]

    def allocate(self, layers: Sequence[Layer]) -> None:
        """One float64 (4, neurons) buffer for every fed BatchNorm: alpha, beta now (rows 0-1, written by
        the kernel) and at the previous measurement (rows 2-3); each such layer gets its columns."""
        fed = [layer for layer in layers if any(pair is not None for pair in layer.fed_by)]
        total = 0
        for layer in fed:
            assert layer.segment is not None
            total += layer.segment.stop - layer.segment.start
        self.affine = torch.zeros(4, total, dtype=torch.float64) if fed else None
        self.attach(layers)

    def attach(self, layers: Sequence[Layer]) -> None:
        """Give every fed BatchNorm its columns of the affine buffer (again, on a copy of the monitor)."""
        fed = [layer for layer in layers if any(pair is not None for pair in layer.fed_by)]
        start = 0
        for layer in layers:
            layer.affine = None
            if layer in fed and self.affine is not None:
                assert layer.segment is not None
                stop = start + layer.segment.stop - layer.segment.start
                layer.affine = self.affine[:, start:stop]
                start = stop

    def init_affine(self, layers: Sequence[Layer]) -> None:
        """The baseline's alpha, beta of every fed BatchNorm, as "now" and as "before"."""
        for layer in layers:
            if layer.affine is not None:
                alpha, beta = batchnorm_affine(layer.module)
                layer.affine[0].copy_(alpha)
                layer.affine[1].copy_(beta)
                layer.affine[2:].copy_(layer.affine[:2])

    @staticmethod
    def output(layer: Layer, call: int, batch: int, dtype: torch.dtype) -> Tensor | None:
        """A fed BatchNorm's output on one aux batch, ``alpha * source + beta`` from the source's snapshot
        slice, in ``dtype``; ``None`` for a slice that is not fed."""
        pair = layer.fed_by[call] if call < len(layer.fed_by) else None
        if pair is None:
            return None
        source = pair[0].snapshots[pair[1]][batch]
        assert source is not None and layer.affine is not None
        shape = [-1 if d == 1 else 1 for d in range(source.ndim)]
        return torch.addcmul(layer.affine[1].view(shape), source.to(dtype), layer.affine[0].view(shape))

    # ------------------------------------------------------------------ every measurement
    @staticmethod
    def check_fed(layer: Layer, module: nn.Module, inputs: Any) -> None:
        """A fed BatchNorm ran: it must have taken its source's output of this aux batch, in eval mode."""
        expect, layer.expect = layer.expect, None
        x = inputs[0] if isinstance(inputs, tuple) and inputs else None
        if expect is None or not isinstance(x, Tensor) or signature(x) != expect or module.training:
            raise MeasurementError(
                f"BatchNorm '{layer.name}' no longer takes the output of the module it followed when the"
                " monitor was set up (or is no longer in eval mode); the next measurement re-baselines."
            )

    def roll(self) -> None:
        """A measurement finished: its alpha, beta become the next one's "before"."""
        if self.affine is not None:
            self.affine[2:].copy_(self.affine[:2])

    def nbytes(self) -> int:
        """Bytes of the affine buffer."""
        return 0 if self.affine is None else self.affine.numel() * self.affine.element_size()

    # ------------------------------------------------------------------ state
    @staticmethod
    def state(layer: Layer) -> dict[str, Any]:
        """The layer's pairing, for the monitor's state_dict: its sources by name, and its affine columns."""
        return {"fed_by": [None if p is None else (p[0].name, p[1]) for p in layer.fed_by], "affine": layer.affine}

    def restore(
        self, layers: Sequence[Layer], entries: Sequence[Mapping[str, Any]], device: torch.device, pairing: bool
    ) -> dict[tuple[str, int, int], Tensor]:
        """Restore the pairings of saved per-layer entries (``layer.layout`` already restored).

        With ``pairing`` (the CPU kernel path) fed BatchNorms stay fed. Otherwise they are measured on their
        own from now on, and the returned slices, ``alpha' * source + beta'`` keyed by (layer name, call,
        batch), are their snapshots, rebuilt from their source's.
        """
        by_name = {layer.name: layer for layer in layers}
        saved = {entry["name"]: entry["snapshots"] for entry in entries}
        rebuilt: dict[tuple[str, int, int], Tensor] = {}
        for layer, entry in zip(layers, entries, strict=True):
            layer.fed_by, layer.feeds = [], [None] * len(layer.layout)
            for call, pair in enumerate(entry.get("fed_by", [])):
                source = None if pair is None else (by_name[pair[0]], int(pair[1]))
                layer.fed_by.append(source if pairing else None)
                if source is None:
                    continue
                source_saved = saved[source[0].name][source[1]]
                layer.layout[call] = [slot(t, device) for t in source_saved]
                if not pairing:
                    affine = entry["affine"]
                    for batch, t in enumerate(source_saved):
                        shape = [-1 if d == 1 else 1 for d in range(t.ndim)]
                        y = torch.addcmul(affine[3].view(shape), t.double(), affine[2].view(shape))
                        rebuilt[(layer.name, call, batch)] = y.to(t.dtype)
        for layer in layers:
            for call, fed_pair in enumerate(layer.fed_by):
                if fed_pair is not None:
                    fed_pair[0].feeds[fed_pair[1]] = (layer, call)
        self.allocate(layers)
        for layer, entry in zip(layers, entries, strict=True):
            if layer.affine is not None:
                layer.affine.copy_(entry["affine"])
        return rebuilt
