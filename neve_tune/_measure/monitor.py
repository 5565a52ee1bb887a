"""Neural velocity: how much each neuron's responses to a fixed auxiliary set move between epochs.

For neuron ``i`` with response vector ``y_i`` (all its outputs over every aux sample and every other
position) at measurement ``t``::

    rho_i^t = cos(y_i^t, y_i^{t-1})
    v_i^t   = (1 - rho_i^t) - momentum * v_i^{t-1}          (v^{-1} = 0)
    V^t     = mean over all neurons of |v_i^t|
    D^t     = mean over modules of (mean over the module's neurons of (v_i^t - v_i^{t-1})^2),  t >= 1

How it is computed (one pass over memory, at most one snapshot), each mechanism in its own module:

* Every hooked output is compared, batch by batch and inside its forward hook (``hooks.py``), with the
  stored slice of the previous snapshot: we accumulate per neuron ``||y^t||^2`` and ``||y^t - s*y^{t-1}||^2``
  (``accumulate.py``); then the slice is overwritten with the current output. That single copy is also
  what keeps the measurement correct when a later in-place op (``ReLU(inplace=True)``) rewrites the output.
* The snapshot is allocated once, as one flat buffer per dtype (``snapshot.py``): the baseline runs the aux
  set twice, first to learn the output shapes, then to fill it. Nothing is allocated per measurement.
* ``||y^{t-1}||^2`` is kept from the previous measurement, never recomputed.
* ``1 - rho = (||a - s b||^2 - (|a| - s|b|)^2) / (2 |a| s|b|)``. This form has no catastrophic
  cancellation when ``rho`` is close to 1 (late training, where the stop decision is made), unlike
  ``1 - a.b/|a||b|``.
* On CPU, float32/float64 outputs go through a compiled C kernel (``kernel.py``) that reads the output
  and the snapshot slice once and sums in double (so s = 1). With PyTorch ops (GPU, AMP dtypes, no C
  compiler), s = |a|/|b| measured on the first slice keeps the form well conditioned in float32.
* On the kernel path, an eval BatchNorm fed directly by a hooked module (conv -> BN) keeps no snapshot: its
  sums come from that module's pass (``bnfuse.py``). ``max_positions`` subsamples (``subsample.py``).
* All per-neuron state lives in flat buffers on the model's device; a measurement synchronises once.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from . import saving
from . import state as _state
from .accumulate import Accumulator, CopyOnly, NeuronSums, accumulator_for, reset_scales
from .auxchecks import refuse_meta_model
from .bnfuse import BatchNormFusion
from .coverage import CoverageWatch, parameter_coverage, unmeasured_modules
from .hooks import Passes
from .inputs import AuxBatches, AuxInput, model_device, unwrap_model
from .inputs import as_batches as as_batches  # re-exported, as are the names below
from .layer import Layer
from .layer import MeasurementError as MeasurementError
from .layertable import layer_rule
from .selection import CHANNELS_FIRST as CHANNELS_FIRST
from .selection import CHANNELS_LAST as CHANNELS_LAST
from .selection import DEFAULT_LAYER_TYPES as DEFAULT_LAYER_TYPES
from .selection import LayerSelection as LayerSelection
from .selection import select_layers as select_layers
from .snapshot import Snapshot
from .state import STATE_FORMAT as STATE_FORMAT
from .state import SnapshotInState
from .subsample import PositionSampler

#: A neuron whose squared response norm exceeds this (NaN, inf, or a norm above 1.8e19) has diverged.
FLOAT32_MAX = torch.finfo(torch.float32).max


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

    State: :meth:`state_dict` (format :data:`STATE_FORMAT`) holds velocities, norms, the snapshot (in full,
    as float16, or not at all: ``state_snapshot``) and fingerprints of the aux set and of the layer shapes; a
    monitor restored with :meth:`load_state_dict` continues with identical numbers (``"full"``).

    Copies: ``pickle``, ``copy.deepcopy`` and ``torch.save``/``torch.load`` of a monitor (or of an object
    holding one, with its model) give a monitor that measures exactly like the original, on the copied
    model. Hooks exist only during a measurement, so they always go on the model the copy holds.

    Autocast: measurements run with autocast disabled, in the model's own dtype, whether or not the caller
    is inside ``torch.autocast``; a bfloat16/float16 model is compared in float32.

    Args:
        model: the network (DataParallel/DDP and ``torch.compile`` wrappers are unwrapped; module names
            are those of the unwrapped model).
        aux: the auxiliary inputs: a tensor (dim 0 indexes samples) or an iterable of batches. See
            :func:`neve_tune.noise_aux`.
        momentum: ``mu`` in ``v^t = (1 - rho^t) - mu * v^{t-1}``.
        layers: which modules to hook; see :func:`select_layers` (how each is read: the layer table,
            :func:`neve_tune.register_layer_rule`). Warns once when they hold under half the parameters.
        batch_size: split a tensor aux set into batches of this size (None: one batch).
        max_positions: opt-in bounded memory: keep at most this many positions per neuron and sample.
        seed: seed of the monitor's own generator for ``max_positions`` (the global RNG is untouched).
        state_snapshot: how :meth:`state_dict` holds the snapshot by default: ``"full"`` (exact resume),
            ``"half"`` (float16, half the bytes of a float32 snapshot) or ``"none"`` (a few bytes per neuron;
            the restored monitor re-baselines, losing one measurement). Settable later as an attribute.

    Raises:
        ValueError: the aux set holds NaN or inf, or an argument is out of range.

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
        state_snapshot: SnapshotInState = "full",
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
        self.state_snapshot: SnapshotInState = state_snapshot
        _state.check_snapshot_choice(state_snapshot)
        self._seed = seed
        self._inner = unwrap_model(model)
        refuse_meta_model(self._inner)
        self._aux = AuxBatches(aux, batch_size)
        rules = {n: (m, layer_rule(m)) for n, m in select_layers(self._inner, layers).items()}
        self._layers = [Layer(n, m, rule.dim, rule.output) for n, (m, rule) in rules.items()]
        self._coverage = CoverageWatch()
        self._coverage.check(self._inner, [layer.module for layer in self._layers])
        self._sums: NeuronSums | None = None  # flat per-neuron state, allocated at the baseline
        self._snapshot = Snapshot()
        self._fusion = BatchNormFusion()
        self._passes = Passes(self._inner, self._aux, self._fusion)
        self._count = 0  # measurements after the baseline
        self._has_baseline = False
        self._closed = False

    # ------------------------------------------------------------------ public API
    @property
    def layer_names(self) -> list[str]:
        """Names of the hooked modules, in ``named_modules()`` order."""
        return [layer.name for layer in self._layers]

    @property
    def coverage(self) -> float:
        """Share (0..1) of the model's parameters in hooked modules or their descendants (after the baseline,
        only modules that ran on the aux set count). The monitor warns once when it is below 0.5."""
        return parameter_coverage(self._inner, [layer.module for layer in self._layers])

    def unmeasured_modules(self, top: int = 5) -> list[tuple[str, str, int]]:
        """The ``top`` modules holding the most unmeasured parameters: ``(name, class name, elements)``."""
        return unmeasured_modules(self._inner, [layer.module for layer in self._layers], top)

    @property
    def num_measurements(self) -> int:
        """Measurements taken after the baseline snapshot."""
        return self._count

    def snapshot_bytes(self) -> int:
        """Bytes of activations kept between measurements (the snapshot)."""
        return self._snapshot.nbytes(self._layers)

    def state_bytes(self) -> int:
        """All bytes kept between measurements: the snapshot plus the per-neuron buffers."""
        flat = 0 if self._sums is None else self._sums.nbytes()
        return self.snapshot_bytes() + flat + self._fusion.nbytes()

    def measure(self) -> Measurement | None:
        """Run the aux set through the model; ``None`` for a (re-)baseline, else a :class:`Measurement`."""
        if self._closed:
            raise RuntimeError("This VelocityMonitor is closed; create a new one to keep measuring.")
        baseline = not self._has_baseline
        self._has_baseline = False  # stays False unless every batch goes through
        device = model_device(self._inner)
        batches = self._aux.on(device)
        modes = [(m, m.training) for m in self._inner.modules()]
        cuda = [device] if device.type == "cuda" else []
        accumulator = accumulator_for(device)
        result: Measurement | None = None
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=cuda), _without_autocast(device):
                if any(training for _, training in modes):
                    self._inner.eval()
                if baseline:
                    self._baseline(device, batches, accumulator)
                else:
                    result = self._compare(batches, accumulator)
        finally:
            for module, training in modes:
                if module.training != training:
                    module.training = training
        self._has_baseline = True
        return result

    def close(self) -> None:
        """Remove every hook and drop the snapshot. Further :meth:`measure` calls raise."""
        self._passes.remove_hooks()
        self._snapshot.release(self._layers)
        self._aux.release()
        self._closed = True

    def __enter__(self) -> VelocityMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def state_dict(self, snapshot: SnapshotInState | None = None) -> dict[str, Any]:
        """Everything needed to continue: velocities, norms, the snapshot and the fingerprints.

        Args:
            snapshot: ``"full"`` (identical numbers after a restore), ``"half"`` (float16: half the bytes of a
                float32 snapshot, a small error in the first measurement after a restore) or ``"none"`` (no
                snapshot: the restored monitor re-baselines at its next measurement); default
                ``self.state_snapshot``. See the README's "Checkpoint size" for sizes and errors.

        The state's ``"format_version"`` is :data:`STATE_FORMAT` (see ``saving.py``).
        """
        return saving.save(self, snapshot)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output onto this monitor's model device.

        Reads states of :data:`STATE_FORMAT` only. Raises ``ValueError`` for a state of another format, one
        saved for other layers or layer shapes, or one saved with another aux set; a refused state leaves the
        monitor as it was.
        """
        saving.load(self, state)

    def __getstate__(self) -> dict[str, Any]:
        """For pickle, ``copy.deepcopy`` and ``torch.save``: the flat buffers travel, per-layer views do not
        (a pickled view would carry its own copy of the whole buffer and alias nothing)."""
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Rebuild every per-layer view onto the copied flat buffers. The model is not touched: inside a
        deepcopy of an object holding both, it may not be filled in yet."""
        self.__dict__.update(state)
        if self._closed:
            return
        self._allocate_snapshot()  # same sizes: the copied buffers are kept, the views rebuilt onto them
        self._fusion.attach(self._layers)
        if self._sums is not None:
            self._sums.attach(self._layers)

    # ------------------------------------------------------------------ passes
    def _baseline(self, device: torch.device, batches: list[Any], accumulator: Accumulator) -> None:
        """Two passes: the first only records the outputs' shapes (and pairs BatchNorms), so that the
        snapshot is then allocated once, in one piece per dtype; the second fills it."""
        for layer in self._layers:
            layer.layout = []
        self._fusion.start(self._layers, accumulator.fuses_batchnorm and self.max_positions is None)
        self._passes.record(self._layers, batches, self._sampler())
        self._fusion.end_pass()
        self._layers = self._passes.ran(self._layers)
        self._coverage.check(self._inner, [layer.module for layer in self._layers], stacklevel=4)
        self._fusion.allocate(self._layers)
        self._allocate_snapshot()
        self._passes.measure(self._layers, batches, self._sampler(), CopyOnly().compare)
        n = self._passes.num_neurons
        if self._sums is None or self._sums.v.numel() != n:
            self._sums = NeuronSums.zeros(n, device, self._layers)
        reset_scales(self._layers, first_sq_current=True)
        self._fusion.init_affine(self._layers)
        self._sums.baseline(self._layers, self._fusion.output)

    def _compare(self, batches: list[Any], accumulator: Accumulator) -> Measurement:
        sums = self._sums
        assert sums is not None, "a measurement follows a baseline"
        sums.start()
        self._passes.measure(self._layers, batches, self._sampler(), accumulator.compare)
        return self._finish(sums)

    # ------------------------------------------------------------------ helpers
    def _sampler(self) -> PositionSampler | None:
        return None if self.max_positions is None else PositionSampler(self.max_positions, self._seed)

    def _allocate_snapshot(self) -> None:
        self._snapshot.allocate(self._layers, [self._fusion.stored_layout(layer) for layer in self._layers])

    # ------------------------------------------------------------------ the formulas
    def _finish(self, sums: NeuronSums) -> Measurement:
        """rho, v, V, D from this measurement's sums; they become the next measurement's previous ones."""
        cur_sq, prev_sq, diff_sq = sums.cur_sq, sums.prev_sq, sums.diff_sq
        norm_cur, norm_prev = cur_sq.sqrt(), prev_sq.sqrt() * sums.scale  # |a| and |s*b|
        one_minus_rho = (diff_sq - (norm_cur - norm_prev).square()) / (2 * norm_cur * norm_prev)
        one_minus_rho.clamp_(0.0, 2.0)
        cur_zero, prev_zero = cur_sq == 0, prev_sq == 0
        one_minus_rho = torch.where(cur_zero & prev_zero, 0.0, one_minus_rho)
        one_minus_rho = torch.where(cur_zero ^ prev_zero, 1.0, one_minus_rho)
        # Non-finite, or beyond float32's range (norm > 1.8e19): diverged, whichever path computed the sums.
        finite = (cur_sq <= FLOAT32_MAX) & (prev_sq <= FLOAT32_MAX) & (diff_sq <= FLOAT32_MAX)
        one_minus_rho = torch.where(finite, one_minus_rho, math.nan)

        v_old = sums.v
        v_new = one_minus_rho - self.momentum * v_old
        abs_v = v_new.abs()
        layer_sum = torch.zeros_like(sums.layer_counts).index_add_(0, sums.layer_of, abs_v)
        summary = torch.cat(
            [
                abs_v.mean().reshape(1),
                (sums.d_weight * (v_new - v_old).square()).sum().reshape(1),
                layer_sum / sums.layer_counts,
                v_new,
            ]
        ).cpu()  # the one synchronisation of a measurement
        sums.v = v_new
        prev_sq.copy_(cur_sq)  # this measurement's norms are the next one's previous norms
        self._fusion.roll()
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
            layers={layer.name: per_neuron[layer.segment] for layer in self._layers},
            layer_velocity=dict(zip(names, head[2:], strict=True)),
        )


def _without_autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Autocast off on the model's device: the measurement runs in the model's own dtype."""
    try:
        return torch.autocast(device.type, enabled=False)
    except RuntimeError:  # a device type autocast does not know
        return contextlib.nullcontext()
