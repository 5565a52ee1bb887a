"""The forward hooks of a measurement, and the pass that runs the aux set under them.

This is the seam between the monitor and its mechanisms. Each hooked output (for a tuple output, the item
the layer table names: ``Layer.output``) goes through position
subsampling (``subsample.py``), then:

* on the baseline's first pass (:meth:`Passes.record`): BatchNorm pairing (``bnfuse.py``), and the slot
  of its snapshot slice and its neurons' segment of the flat buffers are recorded;
* on every later pass (:meth:`Passes.measure`): a fed BatchNorm is only checked (``bnfuse.py``); any other
  output goes, with its snapshot slice (``snapshot.py``), to one accumulator call (``accumulate.py``).

The hooks hold the model's forward to a fixed shape: the same modules must run as often, with the same
output shapes, on every aux batch and every measurement; otherwise :class:`MeasurementError`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from torch import Tensor, nn

from .bnfuse import BatchNormFusion
from .inputs import AuxBatches
from .layer import Layer, MeasurementError, signature
from .snapshot import slot
from .subsample import PositionSampler

#: An accumulator's compare: (layer, call, aux batch, output, snapshot slice, neuron dim) -> None.
Accumulate = Callable[[Layer, int, int, Tensor, Tensor, int], None]
Hook = Callable[[nn.Module, Any, Any], None]


@contextlib.contextmanager
def _without_nested_tensors(model: nn.Module) -> Iterator[None]:
    """Keep ``nn.TransformerEncoder`` from packing padded batches into nested tensors during one pass.

    In eval mode under ``no_grad``, an ``nn.TransformerEncoder`` given a ``src_key_padding_mask`` turns its
    input into a nested tensor, and every hooked Linear/LayerNorm inside then outputs one, which has no
    shape NeVe can read. With ``use_nested_tensor`` off for the pass it runs on ordinary (padded) tensors;
    the encoder layers, whose submodules carry hooks, already take their plain path, and attention keeps
    its native kernel.
    """
    packing = [
        m for m in model.modules() if isinstance(m, nn.TransformerEncoder) and getattr(m, "use_nested_tensor", False)
    ]
    for module in packing:
        module.use_nested_tensor = False
    try:
        yield
    finally:
        for module in packing:
            module.use_nested_tensor = True


class Passes:
    """Runs the aux set through the model with one forward hook on every hooked module.

    Args:
        model: the unwrapped model.
        aux: its aux batches.
        fusion: the monitor's BatchNorm fusion.
    """

    def __init__(self, model: nn.Module, aux: AuxBatches, fusion: BatchNormFusion) -> None:
        self.model = model
        self.aux = aux
        self.fusion = fusion
        self.num_neurons = 0  # neurons given a segment so far (segments are kept across re-baselines)
        self.batch_index = 0  # the aux batch the hooks are seeing
        self._handles: list[Any] = []

    def record(self, layers: Sequence[Layer], batches: list[Any], sampler: PositionSampler | None) -> None:
        """The baseline's first pass: record every output slice's slot in ``layer.layout`` (reset before),
        give each new layer its segment, and pair BatchNorms."""
        self._run(layers, batches, functools.partial(self._record_hook, sampler=sampler))

    def measure(
        self, layers: Sequence[Layer], batches: list[Any], sampler: PositionSampler | None, accumulate: Accumulate
    ) -> None:
        """A pass over the snapshot: every output slice and its snapshot slice go to ``accumulate``."""
        self._run(layers, batches, functools.partial(self._measure_hook, sampler=sampler, accumulate=accumulate))

    def ran(self, layers: list[Layer]) -> list[Layer]:
        """The layers that ran on the baseline's first pass: selected modules that never ran on the aux set
        (e.g. train-only auxiliary heads) are forgotten; none at all is an error."""
        ran = [layer for layer in layers if layer.layout]
        if not ran:
            raise ValueError(
                f"None of the selected modules {[layer.name for layer in layers][:12]} ran when the aux set went"
                f" through {type(self.model).__name__} in eval mode. Select modules that the forward uses"
                " (`layers=`)."
            )
        return ran

    def remove_hooks(self) -> None:
        """Remove the hooks of a pass in progress (none outside a pass)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _run(self, layers: Sequence[Layer], batches: list[Any], make_hook: Callable[[Layer], Hook]) -> None:
        with _without_nested_tensors(self.model):
            self._run_batches(layers, batches, make_hook)

    def _run_batches(self, layers: Sequence[Layer], batches: list[Any], make_hook: Callable[[Layer], Hook]) -> None:
        self._handles = [layer.module.register_forward_hook(make_hook(layer)) for layer in layers]
        try:
            for index, batch in enumerate(batches):
                self.batch_index = index
                for layer in layers:
                    layer.calls = 0
                    layer.expect = None
                self.aux.run(self.model, batch)
                for layer in layers:
                    if layer.calls != len(layer.layout):
                        raise MeasurementError(
                            f"Module '{layer.name}' ran {layer.calls} times on aux batch {index}, but"
                            f" {len(layer.layout)} times before: the model's forward must run the same modules on"
                            " the same aux set every epoch."
                        )
        finally:
            self.remove_hooks()

    def _record_hook(self, layer: Layer, sampler: PositionSampler | None) -> Hook:
        num_batches = len(self.aux)
        observe = self.fusion.observe

        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if not isinstance(output, Tensor):
                output = _select_output(layer, module, output)
            call = layer.calls
            layer.calls += 1
            batch = self.batch_index
            out = output.detach() if sampler is None else sampler.select(layer, call, output.detach())
            observe(layer, call, module, inputs, out, batch)
            if call == len(layer.layout):
                if batch != 0:
                    raise MeasurementError(
                        f"Module '{layer.name}' ran more often on aux batch {batch} than on aux batch 0:"
                        " the model's forward must run the same modules on every aux batch."
                    )
                layer.layout.append([None] * num_batches)
            size = out.shape[layer.dim % out.ndim]
            if layer.segment is None:
                layer.segment = slice(self.num_neurons, self.num_neurons + size)
                self.num_neurons += size
            elif layer.segment.stop - layer.segment.start != size:
                raise MeasurementError(f"Module '{layer.name}' changed its number of neurons.")
            layer.layout[call][batch] = slot(out)

        return hook

    def _measure_hook(self, layer: Layer, sampler: PositionSampler | None, accumulate: Accumulate) -> Hook:
        """The hot path: one accumulator call per output, no other dispatch."""
        check_fed = self.fusion.check_fed

        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if not isinstance(output, Tensor):
                output = _select_output(layer, module, output)
            call = layer.calls
            layer.calls += 1
            out = output.detach() if sampler is None else sampler.select(layer, call, output.detach())
            fed_by = layer.fed_by[call] if call < len(layer.fed_by) else None
            if fed_by is not None:  # an eval BatchNorm whose sums came from its source's pass
                check_fed(layer, module, inputs)
                return
            batch = self.batch_index
            if call >= len(layer.snapshots):
                raise MeasurementError(
                    f"Module '{layer.name}' ran more often on aux batch {batch} than before: the model's"
                    " forward must run the same modules on the same aux set every epoch."
                )
            prev = layer.snapshots[call][batch]
            if prev is None or prev.shape != out.shape:
                before = "nothing" if prev is None else tuple(prev.shape)
                raise MeasurementError(
                    f"Module '{layer.name}' output shape changed from {before} to {tuple(out.shape)} on the"
                    " same aux batch; the aux set and architecture must stay fixed."
                )
            accumulate(layer, call, batch, out, prev, layer.dim % out.ndim)
            feeds = layer.feeds[call] if call < len(layer.feeds) else None
            if feeds is not None:  # the BatchNorm it feeds must take exactly this output
                feeds[0].expect = signature(out)

        return hook


def _select_output(layer: Layer, module: nn.Module, output: Any) -> Tensor:
    """The tensor of a tuple/list output that the layer table names (``Layer.output``)."""
    if layer.output is not None and isinstance(output, (tuple, list)) and -len(output) <= layer.output < len(output):
        picked = output[layer.output]
        if isinstance(picked, Tensor):
            return picked
    what = type(output).__name__ if layer.output is None else f"{type(output).__name__} (item {layer.output})"
    raise TypeError(
        f"Module '{layer.name}' ({type(module).__name__}) returns {what}, not a tensor, so NeVe cannot read"
        f" its neurons. Exclude it with `layers=`, or say which output holds them with"
        f" `neve_tune.register_layer_rule({type(module).__name__}, output=0, dim=-1)`."
    )
