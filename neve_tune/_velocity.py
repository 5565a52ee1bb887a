"""Neural velocity: how much each neuron's responses to a fixed auxiliary set move between epochs.

For neuron ``i`` with response vector ``y_i`` (all its outputs over every aux sample and every other
position) at measurement ``t``::

    rho_i^t = cos(y_i^t, y_i^{t-1})
    v_i^t   = (1 - rho_i^t) - momentum * v_i^{t-1}          (v^{-1} = 0)
    V^t     = mean over all neurons of |v_i^t|
    D^t     = mean over modules of (mean over the module's neurons of (v_i^t - v_i^{t-1})^2),  t >= 1

How it is computed (one pass over memory, at most one snapshot):

* Every hooked output is compared, batch by batch and inside its forward hook, with the stored slice of
  the previous snapshot: we accumulate per neuron ``||y^t||^2`` and ``||y^t - s*y^{t-1}||^2``; then the
  slice is overwritten with the current output. That single copy is also what keeps the measurement
  correct when a later in-place op (``ReLU(inplace=True)``) rewrites the output.
* The snapshot is allocated once, as one flat buffer per dtype: the baseline runs the aux set twice, first
  to learn the output shapes, then to fill it. Nothing is allocated or concatenated per measurement.
* ``||y^{t-1}||^2`` is kept from the previous measurement, never recomputed.
* ``1 - rho = (||a - s b||^2 - (|a| - s|b|)^2) / (2 |a| s|b|)``. This form has no catastrophic
  cancellation when ``rho`` is close to 1 (late training, where the stop decision is made), unlike
  ``1 - a.b/|a||b|``.
* On CPU, float32/float64 outputs go through a compiled C kernel (``_compare.c``, see ``_kernel.py``) that
  reads the output and the snapshot slice once, sums in double (so s = 1) and writes the slice. With
  PyTorch ops (GPU, AMP dtypes, no C compiler), s = |a|/|b| measured on the first slice keeps the form
  well conditioned in float32.
* An eval-mode BatchNorm whose input is exactly the output of the hooked module before it (conv -> BN)
  computes ``alpha * x + beta`` per channel, so on the kernel path its sums come from that module's pass
  (with alpha, beta now and at the previous measurement) and it keeps no snapshot of its own. The pairing is
  found at the baseline and checked at every measurement; if the BatchNorm stops taking that output, the
  measurement raises MeasurementError and the next one re-baselines.
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

from . import _kernel

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

#: A neuron whose squared response norm exceeds this (NaN, inf, or a norm above 1.8e19) has diverged.
FLOAT32_MAX = torch.finfo(torch.float32).max

LayerSelection = Sequence[type[nn.Module]] | Sequence[str] | Callable[[str, nn.Module], bool] | None
AuxInput = Tensor | Iterable[Any]
# One recorded output slice: shape, dtype, device and memory order (outermost dim first; the snapshot
# slice is laid out like the output, so channels_last outputs keep channels_last snapshots).
_Slot = tuple[torch.Size, torch.dtype, torch.device, tuple[int, ...]]


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


def _order(t: Tensor) -> tuple[int, ...]:
    """The memory order a snapshot slice for ``t`` gets: ``t``'s own if dense, else plain contiguous."""
    return _kernel.memory_order(t) or tuple(range(t.ndim))


def _signature(t: Tensor) -> tuple[int, tuple[int, ...], tuple[int, ...], int]:
    """Identifies a tensor's contents: where it lives, its shape, strides and in-place version."""
    return (t.data_ptr(), tuple(t.shape), t.stride(), t._version)


def _fits(module: nn.Module, inputs: Any, last: tuple[Any, ...]) -> bool:
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
        and _signature(inputs[0]) == last[2]
        and all(
            t is None or (t.dtype == last[3] and t.device.type == "cpu" and t.is_contiguous())
            for t in (module.running_mean, module.running_var, module.weight, module.bias)
        )
    )


def _batchnorm_affine(bn: nn.Module) -> tuple[Tensor, Tensor]:
    """alpha, beta (float64) with ``bn(x) = alpha * x + beta`` per channel, for a BatchNorm in eval mode."""
    assert isinstance(bn, nn.modules.batchnorm._BatchNorm)
    assert bn.running_mean is not None and bn.running_var is not None
    alpha = (bn.running_var.double() + bn.eps).rsqrt()
    if bn.weight is not None:
        alpha = alpha * bn.weight.double()
    beta = -bn.running_mean.double() * alpha
    if bn.bias is not None:
        beta = beta + bn.bias.double()
    return alpha, beta


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
        "sample_index",
        "scale",
        "segment",
        "snapshots",
        "views",
    )

    def __init__(self, name: str, module: nn.Module, segment: slice | None) -> None:
        self.name = name
        self.module = module
        self.dim = neuron_dim(module)
        self.segment = segment  # slice of the flat per-neuron buffers; None until the first output
        # snapshots[call][batch]: the previous output of the call-th invocation on that aux batch.
        self.snapshots: list[list[Tensor | None]] = []
        # layout[call][batch]: (shape, dtype, device, memory order) of that slice, recorded by the
        # baseline's first pass.
        self.layout: list[list[_Slot | None]] = []
        self.sample_index: list[Tensor | None] = []  # per call, bounded-memory position subsample
        # Eval-mode BatchNorm fed directly by another hooked module (the "source"): per call, the source and
        # its call (fed_by, on the BatchNorm) and the BatchNorm and its call (feeds, on the source). Such a
        # BatchNorm keeps no snapshot: its sums come from the source's pass, through affine = (alpha, beta
        # now; alpha, beta at the previous measurement), 4 x neurons in float64.
        self.fed_by: list[tuple[_Layer, int] | None] = []
        self.feeds: list[tuple[_Layer, int] | None] = []
        self.affine: Tensor | None = None
        self.expect: tuple[int, tuple[int, ...], tuple[int, ...], int] | None = None  # the input it must get
        self.calls = 0
        # (cur_sq, diff_sq, scale, first_sq): this layer's views of the monitor's flat per-neuron buffers.
        self.views: tuple[Tensor, Tensor, Tensor, Tensor] | None = None
        self.scale: Tensor | None = None  # s, in the compute dtype, shaped to broadcast over the output
        self.first_stale = False  # first_sq is out of date (the kernel path, which uses s = 1, ran last)


class VelocityMonitor:
    """Measures neural velocity on a fixed auxiliary set, exactly as NeVe defines it.

    The first :meth:`measure` takes the baseline snapshot and returns ``None``; every later call returns
    a :class:`Measurement`. Each measurement runs the aux set through the model in ``eval()`` mode under
    ``no_grad`` on the model's own device, then restores every submodule's previous mode. It changes no
    parameter, no BatchNorm statistic and no RNG state (CPU and the model's CUDA device).

    Neurons: dim 1 of Conv/ConvTranspose/BatchNorm (and any other selected module's) outputs, the last
    dim of Linear/LayerNorm outputs, so sequence models ``(N, T, C)`` are measured per feature.

    NaN policy: a response holding NaN or inf, or one so large that its squared norm leaves the float32
    range (norm above 1.8e19), gives that neuron a NaN velocity, hence a NaN model velocity; it is never
    turned into zeros, so a diverged model never looks converged.

    Memory: at most one snapshot of the hooked outputs (in their own dtype) plus a few floats per neuron;
    on the CPU fast path, eval BatchNorms fed directly by a hooked module keep none (see above). With
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
        # The snapshot: one flat buffer per (device, dtype); every slice in layer.snapshots is a view of one.
        self._snapshot_buffers: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        # Per measurement: what the hooks do ("shape", "fill" or "compare"), and the compiled comparison
        # kernel (CPU only; None = PyTorch ops).
        self._mode = "compare"
        self._kernel: _kernel.Kernel | None = None
        self._pairing = False  # whether eval BatchNorms may take their sums from the module feeding them
        self._affine: Tensor | None = None  # see _allocate_affine
        self._last_output: tuple[Any, ...] | None = None
        self._batch_index = 0

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
        flat.append(self._affine)
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
        self._kernel = _kernel.get() if device.type == "cpu" else None
        self._handles = [layer.module.register_forward_hook(self._make_hook(layer)) for layer in self._layers]
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=cuda):
                if any(training for _, training in modes):
                    self._inner.eval()
                if baseline:
                    # Two passes: the first only records the outputs' shapes, so that the snapshot is then
                    # allocated once, in one piece per dtype; the second fills it.
                    for layer in self._layers:
                        layer.layout, layer.fed_by, layer.feeds = [], [], []
                    self._pairing = self._kernel is not None and self.max_positions is None
                    self._last_output = None
                    self._run("shape", batches)
                    self._last_output = None
                    self._drop_silent_layers()
                    self._allocate_affine()
                    self._allocate_snapshot()
                    self._run("fill", batches)
                    self._allocate_flat(device)
                    result = None
                else:
                    assert self._cur_sq is not None and self._diff_sq is not None
                    self._cur_sq.zero_()
                    self._diff_sq.zero_()
                    self._run("compare", batches)
                    result = self._finish()
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles = []
            for module, training in modes:
                if module.training != training:
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
        self._snapshot_buffers = {}
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
                    "fed_by": [None if p is None else (p[0].name, p[1]) for p in layer.fed_by],
                    "affine": layer.affine,
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
            saved = entry["snapshots"]
            layer.layout = [
                [None if t is None else (t.shape, t.dtype, device, _order(t)) for t in per_call] for per_call in saved
            ]
            layer.sample_index = [move(t) for t in entry["sample_index"]]
            layer.scale, layer.first_stale = None, True  # s restarts at 1; first-slice norms are re-taken
        # Fed BatchNorms: keep the pairing on the CPU fast path; elsewhere rebuild their snapshots from the
        # source's (alpha' * source + beta') and measure them on their own from now on.
        pairing = device.type == "cpu" and _kernel.get() is not None and self.max_positions is None
        by_name = {layer.name: layer for layer in self._layers}
        rebuilt: dict[tuple[str, int, int], Tensor] = {}
        saved_affine: dict[str, Any] = {}
        for layer, entry in zip(self._layers, state["layers"], strict=True):
            fed_by = [None if p is None else (by_name[p[0]], int(p[1])) for p in entry.get("fed_by", [])]
            affine = entry.get("affine")
            layer.fed_by, layer.feeds = [], [None] * len(layer.layout)
            for call, pair in enumerate(fed_by):
                if pair is None:
                    layer.fed_by.append(None)
                    continue
                source_saved = state["layers"][names.index(pair[0].name)]["snapshots"][pair[1]]
                layer.layout[call] = [(t.shape, t.dtype, device, _order(t)) for t in source_saved]
                if pairing:
                    layer.fed_by.append(pair)
                    continue
                layer.fed_by.append(None)
                for batch, t in enumerate(source_saved):
                    shape = [-1 if d == 1 else 1 for d in range(t.ndim)]
                    y = torch.addcmul(affine[3].view(shape), t.double(), affine[2].view(shape))
                    rebuilt[(layer.name, call, batch)] = y.to(t.dtype)
            saved_affine[layer.name] = affine
        for layer in self._layers:
            for call, pair in enumerate(layer.fed_by):
                if pair is not None:
                    pair[0].feeds[pair[1]] = (layer, call)
        self._allocate_affine()
        for layer in self._layers:
            if layer.affine is not None:
                layer.affine.copy_(saved_affine[layer.name])
        self._allocate_snapshot()
        for layer, entry in zip(self._layers, state["layers"], strict=True):
            for call, (per_call, saved) in enumerate(zip(layer.snapshots, entry["snapshots"], strict=True)):
                for batch, (t, value) in enumerate(zip(per_call, saved, strict=True)):
                    if t is not None:
                        t.copy_(rebuilt.get((layer.name, call, batch), value))
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
            if layer.calls != len(layer.layout):
                raise MeasurementError(
                    f"Module '{layer.name}' ran {layer.calls} times on aux batch {batch_index}, but"
                    f" {len(layer.layout)} times before: the model's forward must run the same modules on"
                    " the same aux set every epoch."
                )

    def _drop_silent_layers(self) -> None:
        """Forget selected modules that never ran on the aux set (e.g. train-only auxiliary heads)."""
        ran = [layer for layer in self._layers if layer.layout]
        if not ran:
            raise ValueError(
                f"None of the selected modules {self.layer_names[:12]} ran when the aux set went through"
                f" {type(self._inner).__name__} in eval mode. Select modules that the forward uses (`layers=`)."
            )
        self._layers = ran

    def _run(self, mode: str, batches: list[Any]) -> None:
        self._mode = mode
        for index, batch in enumerate(batches):
            self._batch_index = index
            for layer in self._layers:
                layer.calls = 0
                layer.expect = None
            try:
                _call(self._inner, batch)
            except (torch.OutOfMemoryError, MeasurementError):
                raise
            except RuntimeError as exc:
                raise ValueError(
                    f"The aux set does not fit the model: {type(self._inner).__name__} failed on an aux batch"
                    f" of shape {_batch_shape(batch)}: {exc}.{_expected_input(self._inner)} Pass aux inputs"
                    " shaped like one training batch, e.g. neve_tune.noise_aux(sample_shape) with the shape of"
                    " one sample (no batch dim)."
                ) from exc
            self._check_calls(index)

    def _make_hook(self, layer: _Layer) -> Callable[..., None]:
        num_batches = len(self._batches)

        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if not isinstance(output, Tensor):
                raise TypeError(
                    f"Module '{layer.name}' ({type(module).__name__}) returns {type(output).__name__}, not a"
                    " tensor, so NeVe cannot read its neurons. Exclude it with `layers=`."
                )
            call = layer.calls
            layer.calls += 1
            batch = self._batch_index
            out = self._positions(layer, call, output.detach())
            dim = layer.dim % out.ndim
            if self._mode == "shape":
                self._pair(layer, call, module, inputs, out)
                if call == len(layer.layout):
                    if batch != 0:
                        raise MeasurementError(
                            f"Module '{layer.name}' ran more often on aux batch {batch} than on aux batch 0:"
                            " the model's forward must run the same modules on every aux batch."
                        )
                    layer.layout.append([None] * num_batches)
                if layer.segment is None:
                    start = self._num_neurons
                    self._num_neurons += out.shape[dim]
                    layer.segment = slice(start, self._num_neurons)
                elif layer.segment.stop - layer.segment.start != out.shape[dim]:
                    raise MeasurementError(f"Module '{layer.name}' changed its number of neurons.")
                layer.layout[call][batch] = (out.shape, out.dtype, out.device, _order(out))
                return
            fed_by = layer.fed_by[call] if call < len(layer.fed_by) else None
            if fed_by is not None:  # an eval BatchNorm whose sums came from its source's pass
                self._check_fed(layer, call, module, inputs)
                return
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
            if self._mode == "fill":
                prev.copy_(out)
            else:
                self._compare(layer, call, out, prev, dim)
            feeds = layer.feeds[call] if call < len(layer.feeds) else None
            if feeds is not None:
                feeds[0].expect = _signature(out)

        return hook

    def _pair(self, layer: _Layer, call: int, module: nn.Module, inputs: Any, out: Tensor) -> None:
        """Baseline, first pass: find eval BatchNorms whose input is the output just seen from another
        hooked module (CPU fast path only), and keep pairs only if every aux batch confirms them."""
        while len(layer.fed_by) <= call:
            layer.fed_by.append(None)
            layer.feeds.append(None)
        last, self._last_output = self._last_output, None
        # Only outputs that the kernel will take (CPU, float32/64, dense) can feed a BatchNorm's sums.
        if (
            self._pairing
            and out.device.type == "cpu"
            and out.dtype in (torch.float32, torch.float64)
            and _kernel.memory_order(out) is not None
        ):
            self._last_output = (layer, call, _signature(out), out.dtype)
        if self._batch_index > 0:  # confirm on later batches; drop a pair that does not hold
            pair = layer.fed_by[call]
            if pair is not None and (last is None or last[:2] != pair or not _fits(module, inputs, last)):
                layer.fed_by[call] = None
                pair[0].feeds[pair[1]] = None
            return
        if last is None or not _fits(module, inputs, last) or layer.dim % out.ndim != 1:
            return
        source, source_call = last[0], last[1]
        if source is layer or source.dim % out.ndim != 1 or source.fed_by[source_call] is not None:
            return
        if source.feeds[source_call] is None:
            layer.fed_by[call] = (source, source_call)
            source.feeds[source_call] = (layer, call)

    def _check_fed(self, layer: _Layer, call: int, module: nn.Module, inputs: Any) -> None:
        expect, layer.expect = layer.expect, None
        x = inputs[0] if isinstance(inputs, tuple) and inputs else None
        if expect is None or not isinstance(x, Tensor) or _signature(x) != expect or module.training:
            raise MeasurementError(
                f"BatchNorm '{layer.name}' no longer takes the output of the module it followed when the"
                " monitor was set up (or is no longer in eval mode); the next measurement re-baselines."
            )

    def _compare(self, layer: _Layer, call: int, out: Tensor, prev: Tensor, dim: int) -> None:
        """Accumulate this slice's per-neuron sums, then overwrite the snapshot slice with ``out``."""
        assert layer.views is not None
        cur_sq, diff_sq, scale_flat, first_sq = layer.views
        first = call == 0 and self._batch_index == 0
        kernel = self._kernel
        if kernel is not None and kernel.supports(out, prev):
            # One pass over out and prev, sums in double: s = 1 is exact enough there (see _compare.c).
            if first:
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
                kernel.compare(
                    out, prev, dim, scale_flat, cur_sq, diff_sq, bn.module, bn.affine, bn.views[0], bn.views[1]
                )
            return
        if call < len(layer.feeds) and layer.feeds[call] is not None:
            raise MeasurementError(
                f"Module '{layer.name}' changed its output dtype or layout ({out.dtype}), so the BatchNorm that"
                " follows it can no longer be measured from its pass; the next measurement re-baselines."
            )
        wide = out.dtype if out.dtype in (torch.float32, torch.float64) else torch.float32
        part = _sum_squares(out, dim)
        cur_sq.add_(part)
        if first:
            if layer.first_stale:  # the kernel ran last time and kept no first-slice norms: take them now
                first_sq.copy_(_sum_squares(prev, dim))
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
            diff_sq.add_(_sum_squares(torch.addcmul(out, prev, layer.scale, value=-1.0, out=prev), dim))
        else:  # half/bfloat16 outputs (AMP): the difference in float32
            diff_sq.add_(_sum_squares(torch.addcmul(out.to(wide), prev.to(wide), layer.scale, value=-1.0), dim))
        prev.copy_(out)

    @staticmethod
    def _stored_layout(layer: _Layer) -> list[list[_Slot | None]]:
        """The layout of the slices that get a snapshot: all but those of BatchNorms fed by a source."""
        return [
            [None] * len(per_call) if call < len(layer.fed_by) and layer.fed_by[call] is not None else per_call
            for call, per_call in enumerate(layer.layout)
        ]

    def _allocate_affine(self) -> None:
        """One float64 (4, neurons) buffer for every fed BatchNorm: alpha, beta now (rows 0-1, written by
        the kernel) and at the previous measurement (rows 2-3); each such layer gets its columns."""
        fed = [layer for layer in self._layers if any(pair is not None for pair in layer.fed_by)]
        total = 0
        for layer in fed:
            assert layer.segment is not None
            total += layer.segment.stop - layer.segment.start
        self._affine = torch.zeros(4, total, dtype=torch.float64) if fed else None
        start = 0
        for layer in self._layers:
            layer.affine = None
            if layer in fed and self._affine is not None:
                assert layer.segment is not None
                stop = start + layer.segment.stop - layer.segment.start
                layer.affine = self._affine[:, start:stop]
                start = stop

    def _allocate_snapshot(self) -> None:
        """Give every recorded slice a view of one flat buffer per (device, dtype); reuse same-sized ones."""
        sizes: dict[tuple[torch.device, torch.dtype], int] = {}
        for layer in self._layers:
            for per_call in self._stored_layout(layer):
                for entry in per_call:
                    if entry is not None:
                        shape, dtype, device, _ = entry
                        sizes[(device, dtype)] = sizes.get((device, dtype), 0) + shape.numel()
        current = {key: t.numel() for key, t in self._snapshot_buffers.items()}
        if current != sizes:
            for layer in self._layers:  # let go of the old snapshot before allocating the new one
                layer.snapshots = []
            self._snapshot_buffers = {}
            self._snapshot_buffers = {
                (device, dtype): torch.empty(n, dtype=dtype, device=device) for (device, dtype), n in sizes.items()
            }
        offsets = dict.fromkeys(sizes, 0)
        for layer in self._layers:
            layer.snapshots = []
            for per_call in self._stored_layout(layer):
                views: list[Tensor | None] = []
                for entry in per_call:
                    if entry is None:
                        views.append(None)
                        continue
                    shape, dtype, device, order = entry
                    start = offsets[(device, dtype)]
                    offsets[(device, dtype)] = start + shape.numel()
                    piece = self._snapshot_buffers[(device, dtype)][start : start + shape.numel()]
                    # laid out like the output: the copy into it and the kernel's pass are then linear
                    view = piece.view([shape[d] for d in order]).permute([order.index(d) for d in range(len(order))])
                    views.append(view)
                layer.snapshots.append(views)

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
        # The baseline's squared norms: computed once here (in the flat buffers' precision, as the kernel
        # does), then carried from measurement to measurement.
        assert self._prev_sq is not None and self._first_sq is not None
        self._prev_sq.zero_()
        assert self._scale is not None
        self._scale.fill_(1.0)
        for layer in self._layers:
            layer.scale, layer.first_stale = None, False
        for layer in self._layers:  # the baseline's alpha, beta of every fed BatchNorm, now and "before"
            if layer.affine is not None:
                alpha, beta = _batchnorm_affine(layer.module)
                layer.affine[0].copy_(alpha)
                layer.affine[1].copy_(beta)
                layer.affine[2:].copy_(layer.affine[:2])
        for layer in self._layers:
            assert layer.segment is not None
            for call, per_call in enumerate(layer.snapshots):
                pair = layer.fed_by[call] if call < len(layer.fed_by) else None
                for batch, t in enumerate(per_call):
                    if pair is not None:  # this BatchNorm's outputs: alpha * source + beta
                        source = pair[0].snapshots[pair[1]][batch]
                        assert source is not None and layer.affine is not None
                        shape = [-1 if d == 1 else 1 for d in range(source.ndim)]
                        t = torch.addcmul(
                            layer.affine[1].view(shape), source.to(dtype), layer.affine[0].view(shape)
                        )
                    if t is None:
                        continue
                    part = _sum_squares(t.to(dtype), layer.dim % t.ndim)
                    self._prev_sq[layer.segment] += part
                    if call == 0 and batch == 0:
                        self._first_sq[layer.segment] = part

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
        # Non-finite, or beyond float32's range (norm > 1.8e19): diverged, whichever path computed the sums.
        finite = (cur_sq <= FLOAT32_MAX) & (prev_sq <= FLOAT32_MAX) & (self._diff_sq <= FLOAT32_MAX)
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
        if self._affine is not None:
            self._affine[2:].copy_(self._affine[:2])
        index = self._count
        self._count += 1
        num_layers = len(self._layers)
        head = summary[: 2 + num_layers].tolist()
        per_neuron = summary[2 + num_layers :]
        names = [layer.name for layer in self._layers]
        return Measurement(
            index=index,
            model_velocity=head[0],
            velocity_change=None if index == 0 else head[1],
            layers={layer.name: per_neuron[layer.segment] for layer in self._layers},  # type: ignore[index]
            layer_velocity=dict(zip(names, head[2:], strict=True)),
        )
