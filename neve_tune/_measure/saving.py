"""Saving and restoring a :class:`~neve_tune.VelocityMonitor`: what its ``state_dict()`` holds and how
``load_state_dict()`` rebuilds the monitor from it (the format, fingerprints and snapshot encodings are
``state.py``'s). A friend module of ``monitor.py``: it reads and writes the monitor's private fields.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from . import state as _state
from .accumulate import NeuronSums, accumulator_for, reset_scales
from .inputs import model_device
from .layer import Layer
from .snapshot import slot
from .state import STATE_FORMAT, SnapshotInState

if TYPE_CHECKING:
    from .monitor import VelocityMonitor


def save(monitor: VelocityMonitor, snapshot: SnapshotInState | None) -> dict[str, Any]:
    """``monitor.state_dict(snapshot)``: velocities, norms, the snapshot (as asked) and the fingerprints."""
    snapshot = _state.check_snapshot_choice(monitor.state_snapshot if snapshot is None else snapshot)
    sums, kept = monitor._sums, snapshot != "none"
    return {
        "format_version": STATE_FORMAT,
        "momentum": monitor.momentum,
        "max_positions": monitor.max_positions,
        "count": monitor._count,
        "has_baseline": monitor._has_baseline and kept,
        "snapshot": snapshot,
        "aux_fingerprint": monitor._aux.fingerprint(),
        "layer_fingerprint": _state.layer_fingerprint(monitor._layers),
        "layers": [
            {
                "name": layer.name,
                "segment": None if layer.segment is None else (layer.segment.start, layer.segment.stop),
                **_state.encode_snapshot(layer.snapshots, snapshot),
                "sample_index": list(layer.sample_index),
                **(monitor._fusion.state(layer) if kept else {"fed_by": [], "affine": None}),
            }
            for layer in monitor._layers
        ],
        "v": None if sums is None else sums.v,
        "prev_sq": None if sums is None else sums.prev_sq,
        "first_sq": None if sums is None else sums.first_sq,
    }


def load(monitor: VelocityMonitor, state: Mapping[str, Any]) -> None:
    """``monitor.load_state_dict(state)``; a refused state (``ValueError``) leaves the monitor as it was."""
    entries = _state.saved_layers(state)
    layers = _matched_layers(monitor, [entry["name"] for entry in entries])
    _state.check_fingerprints(state, monitor._aux.fingerprint(), layers)
    monitor._layers = layers
    device = model_device(monitor._inner)
    if float(state["momentum"]) != monitor.momentum:
        warnings.warn(
            f"The loaded state replaces the monitor's momentum {monitor.momentum} -> {float(state['momentum'])}:"
            " the state wins, so a resumed run measures as before; for another momentum, do not load the state.",
            UserWarning,
            stacklevel=3,
        )
    monitor.momentum = float(state["momentum"])
    monitor.max_positions = state["max_positions"]
    monitor._count = int(state["count"])
    monitor._has_baseline = bool(state["has_baseline"])
    snapshots = [_state.decode_snapshot(entry) for entry in entries]
    for layer, entry, saved in zip(layers, entries, snapshots, strict=True):
        seg = entry["segment"]
        layer.segment = None if seg is None else slice(seg[0], seg[1])
        layer.layout = [[None if t is None else slot(t, device) for t in per_call] for per_call in saved]
        layer.sample_index = [_state.moved(t, device) for t in entry["sample_index"]]
    reset_scales(layers, first_sq_current=False)  # s restarts at 1; first-slice norms are re-taken
    # Fed BatchNorms: keep the pairing on the CPU fast path; elsewhere rebuild their snapshots from the
    # source's (alpha' * source + beta') and measure them on their own from now on.
    pairing = accumulator_for(device).fuses_batchnorm and monitor.max_positions is None
    decoded = [{**entry, "snapshots": saved} for entry, saved in zip(entries, snapshots, strict=True)]
    rebuilt = monitor._fusion.restore(layers, decoded, device, pairing)
    monitor._allocate_snapshot()
    monitor._snapshot.load(layers, snapshots, rebuilt)
    v, prev_sq, first_sq = (_state.moved(state[key], device) for key in ("v", "prev_sq", "first_sq"))
    monitor._passes.num_neurons = 0 if v is None else v.numel()
    monitor._sums = None
    if v is not None and prev_sq is not None and first_sq is not None:
        monitor._sums = NeuronSums(v, prev_sq, first_sq, layers)


def _matched_layers(monitor: VelocityMonitor, names: list[str]) -> list[Layer]:
    """The saved layers (in their order), or ``ValueError`` if they are not this monitor's."""
    by_name = {layer.name: layer for layer in monitor._layers}
    if not all(n in by_name for n in names):  # the saving monitor may have dropped silent layers
        raise ValueError(
            f"This state was saved for layers {names}, but this monitor hooks {monitor.layer_names}. Build"
            " the monitor on the same architecture with the same `layers=` selection."
        )
    return [by_name[n] for n in names]
