"""Neural velocity: how much each neuron's responses to a fixed auxiliary set move between epochs.

For neuron ``i`` with response vector ``y_i`` (all its outputs over every aux sample and every other
position) at measurement ``t``::

    rho_i^t = cos(y_i^t, y_i^{t-1})
    v_i^t   = (1 - rho_i^t) - momentum * v_i^{t-1}          (v^{-1} = 0)
    V^t     = mean over all neurons of |v_i^t|
    D^t     = mean over modules of (mean over the module's neurons of (v_i^t - v_i^{t-1})^2),  t >= 1

How it is computed (one pass over memory, one snapshot):

* Every hooked output is compared, batch by batch and inside its forward hook, with the stored slice of
  the previous snapshot: we accumulate per neuron ``||y^t||^2`` and ``||y^t - y^{t-1}||^2``; then the
  slice is overwritten with the current output. That single copy is also what keeps the measurement
  correct when a later in-place op (``ReLU(inplace=True)``) rewrites the output.
* ``||y^{t-1}||^2`` is kept from the previous measurement, never recomputed; nothing is concatenated.
* ``1 - rho = (||a - b||^2 - (|a| - |b|)^2) / (2 |a| |b|)``. This form has no catastrophic cancellation
  when ``rho`` is close to 1 (late training, where the stop decision is made), unlike ``1 - a.b/|a||b|``.
* All per-neuron state lives in flat buffers on the model's device; a measurement synchronises once.
"""

from __future__ import annotations

import fnmatch
import math
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

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

LayerSelection = Sequence[type[nn.Module]] | Sequence[str] | Callable[[str, nn.Module], bool] | None
AuxInput = Tensor | Iterable[Any]


class MeasurementError(RuntimeError):
    """The model did not run the same way on the aux set as before; the measurement was abandoned."""


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module that really computes: strips DataParallel/DistributedDataParallel and torch.compile."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # torch.compile's OptimizedModule
        else:
            return model


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a model with neither."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def neuron_dim(module: nn.Module) -> int:
    """The output dim that indexes neurons: last for Linear/LayerNorm, 1 for everything else."""
    return -1 if isinstance(module, CHANNELS_LAST) else 1


def select_layers(model: nn.Module, layers: LayerSelection = None) -> dict[str, nn.Module]:
    """The modules to hook, by name as in ``model.named_modules()``.

    ``layers`` is ``None`` (the default types: Conv/ConvTranspose 1-3d, Linear, BatchNorm 1-3d,
    LayerNorm), a sequence of module types, a sequence of name globs (``"features.*"``), or a predicate
    ``(name, module) -> bool``.
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
    if callable(layers) and not isinstance(layers, type):
        chosen = {n: m for n, m in model.named_modules() if layers(n, m)}
    else:
        items = list(layers)
        if not items:
            raise ValueError("layers= is empty: pass module types, name globs or a predicate, or None.")
        if all(isinstance(x, type) and issubclass(x, nn.Module) for x in items):
            types = tuple(items)
            chosen = {n: m for n, m in model.named_modules() if isinstance(m, types)}
        elif all(isinstance(x, str) for x in items):
            chosen = {
                n: m for n, m in model.named_modules() if any(fnmatch.fnmatchcase(n, g) for g in items)
            }
        else:
            raise TypeError(
                "layers= must be a sequence of nn.Module types, a sequence of name globs (str), or a"
                f" predicate (name, module) -> bool; got {layers!r}."
            )
    if not chosen:
        names = [n for n, _ in model.named_modules() if n][:12]
        raise ValueError(
            f"layers={layers!r} matches no module of {type(model).__name__}. Module names look like"
            f" {names}; pass types, globs or a predicate that selects at least one of them."
        )
    return chosen


def as_batches(aux: AuxInput, batch_size: int | None = None) -> list[Any]:
    """A fixed list of aux batches: a tensor split along dim 0, or an iterable's batches, materialised.

    A batch is a tensor (``model(batch)``), a tuple/list (``model(*batch)``) or a dict
    (``model(**batch)``). Tensor batches are views, not copies.
    """
    if batch_size is not None and (isinstance(batch_size, bool) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer or None, but got {batch_size=}.")
    if isinstance(aux, Tensor):
        if aux.ndim == 0 or aux.shape[0] == 0:
            raise ValueError(
                f"The aux set is empty (a tensor of shape {tuple(aux.shape)}). Pass at least one input, e.g."
                " neve_tune.noise_aux(input_shape, n=100)."
            )
        return list(aux.split(batch_size or aux.shape[0]))
    if isinstance(aux, (str, bytes)) or not isinstance(aux, Iterable):
        raise TypeError(
            f"aux must be a tensor or an iterable of batches, got {type(aux).__name__}. Build one with"
            " neve_tune.noise_aux, subset_aux or image_folder_aux."
        )
    if batch_size is not None:
        raise ValueError(
            "batch_size= only splits a tensor aux set; this aux set is an iterable that already yields"
            " batches. Drop batch_size, or pass a tensor."
        )
    batches = [b for b in aux]
    if not batches or all(isinstance(b, Tensor) and b.numel() == 0 for b in batches):
        raise ValueError(
            "The aux set is empty: its iterable yielded no inputs. Pass at least one input, e.g."
            " neve_tune.noise_aux(input_shape, n=100)."
        )
    return batches


def _sum_squares(x: Tensor, dim: int) -> Tensor:
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


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _call(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _batch_shape(batch: Any) -> Any:
    if isinstance(batch, Tensor):
        return tuple(batch.shape)
    if isinstance(batch, Mapping):
        return {k: _batch_shape(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return [_batch_shape(v) for v in batch]
    return type(batch).__name__


def _expected_input(model: nn.Module) -> str:
    """What the model's first weighted layer wants, for error messages; empty when it cannot be told."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            spatial = len(m.kernel_size)
            dims = ", ".join(["H", "W", "D"][:spatial]) if spatial > 1 else "L"
            return (
                f" Its first layer '{name}' ({type(m).__name__}) expects inputs shaped"
                f" (N, {m.in_channels}, {dims})."
            )
        if isinstance(m, nn.Linear):
            return f" Its first layer '{name}' (Linear) expects inputs shaped (N, ..., {m.in_features})."
        if isinstance(m, nn.Embedding):
            return f" Its first layer '{name}' (Embedding) expects integer indices below {m.num_embeddings}."
    return ""


@dataclass(frozen=True)
class Measurement:
    """One velocity measurement (after an epoch).

    Attributes:
        index: 0 for the first measurement after the baseline snapshot, then 1, 2, ...
        model_velocity: V, the mean over all hooked neurons of ``|v_i|``; NaN when any response holds a
            non-finite value (the model diverged).
        velocity_change: D, or ``None`` at index 0 (it needs two velocities).
        layers: module name -> 1-D CPU float64 tensor of that module's per-neuron velocities ``v_i``.
        layer_velocity: module name -> mean ``|v_i|`` over that module's neurons.
    """

    index: int
    model_velocity: float
    velocity_change: float | None
    layers: dict[str, Tensor] = field(repr=False)
    layer_velocity: dict[str, float] = field(repr=False)


class _Layer:
    """Hook-side state of one hooked module: where its neurons sit and its snapshot slices."""

    __slots__ = ("calls", "dim", "module", "name", "sample_index", "scale", "segment", "snapshots", "views")

    def __init__(self, name: str, module: nn.Module, segment: slice | None) -> None:
        self.name = name
        self.module = module
        self.dim = neuron_dim(module)
        self.segment = segment  # slice of the flat per-neuron buffers; None until the first output
        # snapshots[call][batch]: the previous output of the call-th invocation on that aux batch.
        self.snapshots: list[list[Tensor | None]] = []
        self.sample_index: list[Tensor | None] = []  # per call, bounded-memory position subsample
        self.calls = 0
        # (cur_sq, diff_sq, scale, first_sq): this layer's views of the monitor's flat per-neuron buffers.
        self.views: tuple[Tensor, Tensor, Tensor, Tensor] | None = None
        self.scale: Tensor | None = None  # s, in the compute dtype, shaped to broadcast over the output


class VelocityMonitor:
    """Measures neural velocity on a fixed auxiliary set, exactly as NeVe defines it.

    The first :meth:`measure` takes the baseline snapshot and returns ``None``; every later call returns
    a :class:`Measurement`. Each measurement runs the aux set through the model in ``eval()`` mode under
    ``no_grad`` on the model's own device, then restores every submodule's previous mode. It changes no
    parameter, no BatchNorm statistic and no RNG state (CPU and the model's CUDA device).

    Neurons: dim 1 of Conv/ConvTranspose/BatchNorm (and any other selected module's) outputs, the last
    dim of Linear/LayerNorm outputs, so sequence models ``(N, T, C)`` are measured per feature.

    NaN policy: a response holding NaN or inf gives that neuron a NaN velocity, hence a NaN model
    velocity; it is never turned into zeros, so a diverged model never looks converged.

    Memory: one snapshot of the hooked outputs (in their own dtype) plus a few floats per neuron. With
    ``max_positions=k`` only ``k`` fixed, randomly chosen positions per neuron and aux sample are kept
    (bounded memory for big models and inputs); velocities are then estimates of the exact ones.

    Failure: if a measurement raises half-way, the snapshot is part old, part new. The monitor notices,
    and the next :meth:`measure` takes a fresh baseline (returns ``None``) instead of comparing with it.

    State: :meth:`state_dict` holds velocities, norms and the snapshot, so a monitor restored with
    :meth:`load_state_dict` continues with identical numbers.

    Args:
        model: the network (DataParallel/DDP and ``torch.compile`` wrappers are unwrapped; module names
            are those of the unwrapped model).
        aux: the auxiliary inputs: a tensor (dim 0 indexes samples) or an iterable of batches. See
            :func:`neve_tune.noise_aux`.
        momentum: ``mu`` in ``v^t = (1 - rho^t) - mu * v^{t-1}``.
        layers: which modules to hook; see :func:`select_layers`.
        batch_size: split a tensor aux set into batches of this size (None: one batch).
        max_positions: opt-in bounded memory: keep at most this many positions per neuron and sample.
        seed: seed of the monitor's own generator for ``max_positions`` (the global RNG is untouched).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> monitor = VelocityMonitor(model, torch.randn(16, 4))
        >>> monitor.measure() is None
        True
        >>> m = monitor.measure()
        >>> m.model_velocity, m.velocity_change
        (0.0, None)
    """

    def __init__(
        self,
        model: nn.Module,
        aux: AuxInput,
        *,
        momentum: float = 0.5,
        layers: LayerSelection = None,
        batch_size: int | None = None,
        max_positions: int | None = None,
        seed: int = 0,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"{type(model).__name__} is not an nn.Module")
        if not math.isfinite(momentum):
            raise ValueError(f"momentum must be a finite number, but got {momentum=}.")
        if max_positions is not None and (isinstance(max_positions, bool) or max_positions < 1):
            raise ValueError(f"max_positions must be a positive integer or None, but got {max_positions=}.")
        self.model = model
        self.momentum = float(momentum)
        self.max_positions = max_positions
        self._seed = seed
        self._inner = unwrap_model(model)
        self._batches = as_batches(aux, batch_size)
        self._layers = [_Layer(n, m, None) for n, m in select_layers(self._inner, layers).items()]
        self._device_batches: tuple[torch.device, list[Any]] | None = None
        self._handles: list[Any] = []
        self._num_neurons = 0
        # Flat per-neuron state (allocated at the baseline, once the output shapes are known).
        self._v: Tensor | None = None
        self._prev_sq: Tensor | None = None
        self._cur_sq: Tensor | None = None
        self._diff_sq: Tensor | None = None
        # Per neuron: squared norm of the first slice (call 0, aux batch 0) of its previous response, and
        # the scale s = |a_first| / |b_first| used to compare a with s * b (see _make_hook).
        self._first_sq: Tensor | None = None
        self._scale: Tensor | None = None
        self._count = 0  # measurements after the baseline
        self._has_baseline = False
        self._closed = False

    # ------------------------------------------------------------------ public API
    @property
    def layer_names(self) -> list[str]:
        """Names of the hooked modules, in ``named_modules()`` order."""
        return [layer.name for layer in self._layers]

    @property
    def num_measurements(self) -> int:
        """Measurements taken after the baseline snapshot."""
        return self._count

    def snapshot_bytes(self) -> int:
        """Bytes of activations kept between measurements (the snapshot)."""
        return sum(
            t.numel() * t.element_size()
            for layer in self._layers
            for per_call in layer.snapshots
            for t in per_call
            if t is not None
        )

    def state_bytes(self) -> int:
        """All bytes kept between measurements: the snapshot plus the per-neuron buffers."""
        flat = [self._v, self._prev_sq, self._cur_sq, self._diff_sq, self._first_sq, self._scale]
        return self.snapshot_bytes() + sum(t.numel() * t.element_size() for t in flat if t is not None)

    def measure(self) -> Measurement | None:
        """Run the aux set through the model; ``None`` for a (re-)baseline, else a :class:`Measurement`."""
        if self._closed:
            raise RuntimeError("This VelocityMonitor is closed; create a new one to keep measuring.")
        baseline = not self._has_baseline
        self._has_baseline = False  # stays False unless every batch goes through
        device = model_device(self._inner)
        batches = self._batches_on(device)
        modes = [(m, m.training) for m in self._inner.modules()]
        cuda = [device] if device.type == "cuda" else []
        self._handles = [
            layer.module.register_forward_hook(self._make_hook(layer, baseline)) for layer in self._layers
        ]
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=cuda):
                self._inner.eval()
                if not baseline:
                    assert self._cur_sq is not None and self._diff_sq is not None
                    self._cur_sq.zero_()
                    self._diff_sq.zero_()
                for index, batch in enumerate(batches):
                    self._batch_index = index
                    for layer in self._layers:
                        layer.calls = 0
                    try:
                        _call(self._inner, batch)
                    except (torch.OutOfMemoryError, MeasurementError):
                        raise
                    except RuntimeError as exc:
                        raise ValueError(
                            f"The aux set does not fit the model: {type(self._inner).__name__} failed on an"
                            f" aux batch of shape {_batch_shape(batch)}: {exc}.{_expected_input(self._inner)}"
                            " Pass aux inputs shaped like one training batch, e.g."
                            " neve_tune.noise_aux(sample_shape) with the shape of one sample (no batch dim)."
                        ) from exc
                    self._check_calls(index)
                if baseline:
                    self._drop_silent_layers()
                    self._allocate_flat(device)
                    result = None
                else:
                    result = self._finish()
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles = []
            for module, training in modes:
                module.training = training
        self._has_baseline = True
        return result

    def close(self) -> None:
        """Remove every hook and drop the snapshot. Further :meth:`measure` calls raise."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for layer in self._layers:
            layer.snapshots = []
        self._device_batches = None
        self._closed = True

    def __enter__(self) -> VelocityMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue with identical numbers: velocities, norms and the snapshot."""
        return {
            "momentum": self.momentum,
            "max_positions": self.max_positions,
            "count": self._count,
            "has_baseline": self._has_baseline,
            "layers": [
                {
                    "name": layer.name,
                    "segment": None if layer.segment is None else (layer.segment.start, layer.segment.stop),
                    "snapshots": [list(per_call) for per_call in layer.snapshots],
                    "sample_index": list(layer.sample_index),
                }
                for layer in self._layers
            ],
            "v": self._v,
            "prev_sq": self._prev_sq,
            "first_sq": self._first_sq,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output onto this monitor's model device."""
        names = [entry["name"] for entry in state["layers"]]
        by_name = {layer.name: layer for layer in self._layers}
        if all(n in by_name for n in names):  # the saving monitor may have dropped silent layers
            self._layers = [by_name[n] for n in names]
        if names != self.layer_names:
            raise ValueError(
                f"This state was saved for layers {names}, but this monitor hooks {self.layer_names}. Build"
                " the monitor on the same architecture with the same `layers=` selection."
            )
        device = model_device(self._inner)

        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach().to(device).clone()

        self.momentum = float(state["momentum"])
        self.max_positions = state["max_positions"]
        self._count = int(state["count"])
        self._has_baseline = bool(state["has_baseline"])
        for layer, entry in zip(self._layers, state["layers"], strict=True):
            seg = entry["segment"]
            layer.segment = None if seg is None else slice(seg[0], seg[1])
            layer.snapshots = [[move(t) for t in per_call] for per_call in entry["snapshots"]]
            layer.sample_index = [move(t) for t in entry["sample_index"]]
        self._v = move(state["v"])
        self._prev_sq = move(state["prev_sq"])
        self._first_sq = move(state["first_sq"])
        self._num_neurons = 0 if self._v is None else self._v.numel()
        self._cur_sq = None if self._v is None else torch.zeros_like(self._v)
        self._diff_sq = None if self._v is None else torch.zeros_like(self._v)
        self._scale = None if self._v is None else torch.ones_like(self._v)
        if self._v is not None:
            self._build_weights()

    # ------------------------------------------------------------------ internals
    def _batches_on(self, device: torch.device) -> list[Any]:
        if self._device_batches is None or self._device_batches[0] != device:
            self._device_batches = (device, [_to_device(b, device) for b in self._batches])
        return self._device_batches[1]

    def _check_calls(self, batch_index: int) -> None:
        for layer in self._layers:
            if layer.calls != len(layer.snapshots):
                raise MeasurementError(
                    f"Module '{layer.name}' ran {layer.calls} times on aux batch {batch_index}, but"
                    f" {len(layer.snapshots)} times before: the model's forward must run the same modules on"
                    " the same aux set every epoch."
                )

    def _drop_silent_layers(self) -> None:
        """Forget selected modules that never ran on the aux set (e.g. train-only auxiliary heads)."""
        ran = [layer for layer in self._layers if layer.snapshots]
        if not ran:
            raise ValueError(
                f"None of the selected modules {self.layer_names[:12]} ran when the aux set went through"
                f" {type(self._inner).__name__} in eval mode. Select modules that the forward uses (`layers=`)."
            )
        self._layers = ran

    def _make_hook(self, layer: _Layer, baseline: bool) -> Callable[..., None]:
        num_batches = len(self._batches)

        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if not isinstance(output, Tensor):
                raise TypeError(
                    f"Module '{layer.name}' ({type(module).__name__}) returns {type(output).__name__}, not a"
                    " tensor, so NeVe cannot read its neurons. Exclude it with `layers=`."
                )
            call = layer.calls
            layer.calls += 1
            out = self._positions(layer, call, output.detach())
            dim = layer.dim % out.ndim
            if call == len(layer.snapshots):
                if not (baseline and self._batch_index == 0):
                    raise MeasurementError(
                        f"Module '{layer.name}' ran more often on aux batch {self._batch_index} than before: the"
                        " model's forward must run the same modules on the same aux set every epoch."
                    )
                layer.snapshots.append([None] * num_batches)
            slot = layer.snapshots[call]
            prev = slot[self._batch_index]
            if baseline or prev is None:
                if layer.segment is None:
                    start = self._num_neurons
                    self._num_neurons += out.shape[dim]
                    layer.segment = slice(start, self._num_neurons)
                elif layer.segment.stop - layer.segment.start != out.shape[dim]:
                    raise MeasurementError(f"Module '{layer.name}' changed its number of neurons.")
                slot[self._batch_index] = out.clone(memory_format=torch.contiguous_format)
                return
            if prev.shape != out.shape:
                raise MeasurementError(
                    f"Module '{layer.name}' output shape changed from {tuple(prev.shape)} to"
                    f" {tuple(out.shape)} on the same aux batch; the aux set and architecture must stay fixed."
                )
            assert layer.views is not None
            cur_sq, diff_sq, scale_flat, first_sq = layer.views
            wide = out.dtype if out.dtype in (torch.float32, torch.float64) else torch.float32
            part = _sum_squares(out, dim)
            cur_sq.add_(part)
            if call == 0 and self._batch_index == 0:
                # cos(a, b) = cos(a, s*b) for any s > 0. Comparing a with s*b, s ~ |a|/|b| (measured on this
                # first slice), keeps ||a - s*b||^2 - (|a| - s|b|)^2 well conditioned even when the norms
                # differ a lot. 0/0, x/0, inf and 0 fall back to s = 1. s is rounded to the compute dtype,
                # so that the finalisation uses exactly the s applied here.
                scale = (part / first_sq).sqrt_().nan_to_num_(1.0, 1.0, 1.0).to(wide)
                scale.masked_fill_(scale == 0, 1.0)
                scale_flat.copy_(scale)
                first_sq.copy_(part)
                layer.scale = scale.view([-1 if d == dim else 1 for d in range(out.ndim)])
            scale = layer.scale
            assert scale is not None
            if out.dtype == wide:
                # prev <- out - s*prev, reduced while this layer's slice is still in cache; then prev <- out.
                torch.addcmul(out, prev, scale, value=-1.0, out=prev)
                diff_sq.add_(_sum_squares(prev, dim))
            else:  # half/bfloat16 outputs (AMP): the difference in float32
                diff_sq.add_(_sum_squares(torch.addcmul(out.float(), prev.float(), scale, value=-1.0), dim))
            prev.copy_(out)

        return hook

    def _positions(self, layer: _Layer, call: int, out: Tensor) -> Tensor:
        """Bounded-memory mode: keep a fixed random subset of each sample's non-neuron positions."""
        if self.max_positions is None or out.ndim <= 2:
            return out
        dim = layer.dim % out.ndim
        # (N, C, *spatial) -> (N, C, P) or (N, *seq, C) -> (N, P, C)
        flat = out.flatten(2) if dim == 1 else out.flatten(1, -2)
        pos_dim = 2 if dim == 1 else 1
        n_pos = flat.shape[pos_dim]
        if n_pos <= self.max_positions:
            return flat
        while len(layer.sample_index) <= call:
            layer.sample_index.append(None)
        index = layer.sample_index[call]
        if index is None:
            gen = torch.Generator().manual_seed(self._seed * 1_000_003 + zlib.crc32(layer.name.encode()) + call)
            index = torch.randperm(n_pos, generator=gen)[: self.max_positions].sort().values.to(out.device)
            layer.sample_index[call] = index
        return flat.index_select(pos_dim, index)

    def _allocate_flat(self, device: torch.device) -> None:
        dtype = torch.float32 if device.type == "mps" else torch.float64
        n = self._num_neurons
        if self._v is None or self._v.numel() != n:
            self._v = torch.zeros(n, dtype=dtype, device=device)
            self._cur_sq = torch.zeros(n, dtype=dtype, device=device)
            self._diff_sq = torch.zeros(n, dtype=dtype, device=device)
            self._scale = torch.ones(n, dtype=dtype, device=device)
            self._prev_sq = torch.zeros(n, dtype=dtype, device=device)
            self._first_sq = torch.zeros(n, dtype=dtype, device=device)
            self._build_weights()
        # The baseline's squared norms: computed once here, then carried from measurement to measurement.
        assert self._prev_sq is not None and self._first_sq is not None
        self._prev_sq.zero_()
        for layer in self._layers:
            assert layer.segment is not None
            dim = layer.dim
            for per_call in layer.snapshots:
                for t in per_call:
                    if t is None:
                        continue
                    self._prev_sq[layer.segment] += _sum_squares(t, dim % t.ndim)
            first = layer.snapshots[0][0]
            assert first is not None
            self._first_sq[layer.segment] = _sum_squares(first, dim % first.ndim)

    def _build_weights(self) -> None:
        assert self._v is not None
        device, dtype = self._v.device, self._v.dtype
        layer_of = torch.empty(self._v.numel(), dtype=torch.long)
        sizes = []
        for i, layer in enumerate(self._layers):
            assert layer.segment is not None
            layer_of[layer.segment] = i
            sizes.append(layer.segment.stop - layer.segment.start)
        counts = torch.tensor(sizes, dtype=dtype, device=device)
        self._layer_of = layer_of.to(device)
        self._layer_counts = counts
        # D = sum_i w_i * dv_i^2 with w_i = 1 / (num_layers * neurons_in_layer(i)).
        self._d_weight = (1.0 / (len(sizes) * counts))[self._layer_of]
        assert self._cur_sq is not None and self._diff_sq is not None
        assert self._scale is not None and self._first_sq is not None
        for layer in self._layers:
            seg = layer.segment
            layer.views = (self._cur_sq[seg], self._diff_sq[seg], self._scale[seg], self._first_sq[seg])

    def _finish(self) -> Measurement:
        assert self._v is not None and self._prev_sq is not None
        assert self._cur_sq is not None and self._diff_sq is not None
        cur_sq, prev_sq = self._cur_sq, self._prev_sq
        assert self._scale is not None
        norm_cur, norm_prev = cur_sq.sqrt(), prev_sq.sqrt() * self._scale  # |a| and |s*b|
        one_minus_rho = (self._diff_sq - (norm_cur - norm_prev).square()) / (2 * norm_cur * norm_prev)
        one_minus_rho.clamp_(0.0, 2.0)
        cur_zero, prev_zero = cur_sq == 0, prev_sq == 0
        one_minus_rho = torch.where(cur_zero & prev_zero, 0.0, one_minus_rho)
        one_minus_rho = torch.where(cur_zero ^ prev_zero, 1.0, one_minus_rho)
        finite = torch.isfinite(cur_sq) & torch.isfinite(prev_sq) & torch.isfinite(self._diff_sq)
        one_minus_rho = torch.where(finite, one_minus_rho, math.nan)

        v_old = self._v
        v_new = one_minus_rho - self.momentum * v_old
        abs_v = v_new.abs()
        layer_sum = torch.zeros_like(self._layer_counts).index_add_(0, self._layer_of, abs_v)
        summary = torch.cat(
            [
                abs_v.mean().reshape(1),
                (self._d_weight * (v_new - v_old).square()).sum().reshape(1),
                layer_sum / self._layer_counts,
                v_new,
            ]
        ).cpu()  # the one synchronisation of a measurement
        self._v = v_new
        prev_sq.copy_(cur_sq)  # this measurement's norms are the next one's previous norms
        index = self._count
        self._count += 1
        num_layers = len(self._layers)
        per_neuron = summary[2 + num_layers :]
        layers: dict[str, Tensor] = {}
        layer_velocity: dict[str, float] = {}
        for i, layer in enumerate(self._layers):
            assert layer.segment is not None
            layers[layer.name] = per_neuron[layer.segment]
            layer_velocity[layer.name] = float(summary[2 + i])
        return Measurement(
            index=index,
            model_velocity=float(summary[0]),
            velocity_change=None if index == 0 else float(summary[1]),
            layers=layers,
            layer_velocity=layer_velocity,
        )
