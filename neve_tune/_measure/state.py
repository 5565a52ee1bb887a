"""The velocity monitor's saved state: its format, its fingerprints and its compact snapshot encodings.

* Format (``"format_version"``): :data:`STATE_FORMAT`, the only one that loads; any other is refused with
  a ``ValueError`` that says so.
* Fingerprints: ``"aux_fingerprint"`` (a hash of the aux set's bytes, shapes and dtypes) and
  ``"layer_fingerprint"`` (per hooked module: its number of neurons and its parameter/buffer shapes). A state
  loaded into a monitor with another aux set or other layer widths is refused, with what differs.
* Snapshot encodings (``"snapshot"``), chosen by ``VelocityMonitor(state_snapshot=...)`` or
  ``state_dict(snapshot=...)``:

  - ``"full"``: the snapshot as kept (the outputs' own dtype): the restored monitor continues with
    identical numbers.
  - ``"half"``: every slice as float16, scaled by a power of two per slice so that its largest value sits
    near float16's top (no overflow; scaling by a power of two is exact); float16's 11-bit significand
    leaves a relative rounding error of at most 2^-11 per value. Half the bytes of a float32 snapshot. The
    first measurement after a restore compares with the rounded snapshot (error: see the README).
  - ``"none"``: no snapshot; the restored monitor re-baselines at its next measurement (which returns
    ``None``: one epoch without V or D), then continues with the saved velocities.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn

from .layer import Layer

#: The format of ``VelocityMonitor.state_dict``, under its ``"format_version"`` key.
STATE_FORMAT = 3
#: How a state holds the snapshot: ``"full"``, ``"half"`` (float16) or ``"none"`` (re-baseline on resume).
SnapshotInState = Literal["full", "half", "none"]
SNAPSHOT_CHOICES = ("full", "half", "none")
_HALF_TOP = 2.0**14  # largest |value| of a slice after scaling (float16's max is 65504 ~ 2^16)


def check_snapshot_choice(snapshot: str) -> SnapshotInState:
    """``snapshot`` if it is one of :data:`SNAPSHOT_CHOICES`, else ``ValueError``."""
    if snapshot not in SNAPSHOT_CHOICES:
        raise ValueError(f"snapshot must be one of {SNAPSHOT_CHOICES}, but got {snapshot=}.")
    return cast(SnapshotInState, snapshot)


# ---------------------------------------------------------------------- fingerprints
def aux_fingerprint(batches: Sequence[Any]) -> str:
    """A hash of the aux batches: every tensor's dtype, shape and bytes, and the structure around them."""
    h = hashlib.blake2b(digest_size=16)

    def feed(x: Any) -> None:
        if isinstance(x, Tensor):
            t = x.detach().cpu().contiguous().flatten()
            h.update(f"T{t.dtype}{tuple(x.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
        elif isinstance(x, Mapping):
            h.update(b"{")
            for k in sorted(x, key=str):
                h.update(repr(k).encode())
                feed(x[k])
            h.update(b"}")
        elif isinstance(x, (tuple, list)):
            h.update(b"[")
            for v in x:
                feed(v)
            h.update(b"]")
        else:
            h.update(repr(x).encode())

    for batch in batches:
        feed(batch)
    return h.hexdigest()


def layer_fingerprint(layers: Sequence[Layer]) -> dict[str, dict[str, Any]]:
    """Per hooked module: its number of neurons (``None`` before the first output) and the shapes of its
    parameters and buffers."""
    return {
        layer.name: {
            "width": None if layer.segment is None else layer.segment.stop - layer.segment.start,
            "shapes": _shapes(layer.module),
        }
        for layer in layers
    }


def _shapes(module: nn.Module) -> dict[str, list[int]]:
    named = [*module.named_parameters(), *module.named_buffers()]
    return {name: list(t.shape) for name, t in named if t is not None}


def check_fingerprints(state: Mapping[str, Any], aux: str, layers: Sequence[Layer]) -> None:
    """Refuse a state saved with another aux set or for other layer shapes (``ValueError`` saying what
    differs)."""
    if state["aux_fingerprint"] != aux:
        raise ValueError(
            "This VelocityMonitor state was saved with another aux set (other inputs, or the same kind drawn with"
            " another seed): its velocities would compare responses to different inputs. Build the monitor with"
            " the aux set of the saved run (same data, n, seed and dtype), or start from a fresh monitor."
        )
    saved_layers = state["layer_fingerprint"]
    now = layer_fingerprint(layers)
    for name, saved in saved_layers.items():
        here = now.get(name)
        if here is None:
            continue  # the layer lists themselves are checked with their names
        width = saved.get("width")
        if width is not None and here["width"] is not None and width != here["width"]:
            raise ValueError(
                f"This VelocityMonitor state was saved for a model whose layer '{name}' has {width} neurons, but"
                f" this model's has {here['width']}: another architecture or width. Load it into the model it"
                " was saved with."
            )
        if saved.get("shapes") is not None and saved["shapes"] != here["shapes"]:
            raise ValueError(
                f"This VelocityMonitor state was saved for a model whose layer '{name}' has parameter shapes"
                f" {saved['shapes']}, but this model's are {here['shapes']}: another architecture or width."
                " Load it into the model it was saved with."
            )


# ---------------------------------------------------------------------- the snapshot, encoded
def encode_snapshot(slices: Sequence[Sequence[Tensor | None]], snapshot: str) -> dict[str, Any]:
    """The per-layer saved fields for one layer's snapshot slices (per call, per aux batch)."""
    if snapshot == "full":
        return {"snapshots": [list(per_call) for per_call in slices]}
    if snapshot == "none":
        return {"snapshots": []}
    halves, scales, dtypes = [], [], []
    for per_call in slices:
        h_row: list[Tensor | None] = []
        s_row: list[float] = []
        d_row: list[str | None] = []
        for t in per_call:
            half, scale = (None, 1.0) if t is None else _to_half(t)
            h_row.append(half)
            s_row.append(scale)
            d_row.append(None if t is None else str(t.dtype).removeprefix("torch."))
        halves.append(h_row)
        scales.append(s_row)
        dtypes.append(d_row)
    return {"snapshots": halves, "snapshot_scales": scales, "snapshot_dtypes": dtypes}


def _to_half(t: Tensor) -> tuple[Tensor, float]:
    """``t / scale`` as float16 and the power of two ``scale`` that puts its largest value near 2^14."""
    amax = float(t.detach().abs().max()) if t.numel() else 0.0
    if not 0 < amax < math.inf:  # all zero, or non-finite (diverged: inf/NaN are kept as they are)
        return t.detach().half(), 1.0
    scale = 2.0 ** (math.ceil(math.log2(amax)) - math.log2(_HALF_TOP))
    return (t.detach() / scale).half(), scale


def decode_snapshot(entry: Mapping[str, Any]) -> list[list[Tensor | None]]:
    """One saved layer's snapshot slices in their original dtype (float16 slices scaled back)."""
    slices = [list(per_call) for per_call in entry["snapshots"]]
    if "snapshot_scales" not in entry:
        return slices
    out: list[list[Tensor | None]] = []
    for per_call, scales, dtypes in zip(slices, entry["snapshot_scales"], entry["snapshot_dtypes"], strict=True):
        row: list[Tensor | None] = []
        for t, scale, dtype in zip(per_call, scales, dtypes, strict=True):
            row.append(None if t is None else (t.to(getattr(torch, dtype)) * scale))
        out.append(row)
    return out


# ---------------------------------------------------------------------- reading a state
def saved_layers(state: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The per-layer entries of a saved state, once its format is known to be one this version reads."""
    version = state.get("format_version")
    if version != STATE_FORMAT:
        raise ValueError(
            f"This VelocityMonitor state has format_version={version!r}, but this version of neve_tune reads"
            f" format {STATE_FORMAT} only: it was saved by another neve_tune version. Load it with that version,"
            " or start from a fresh monitor (its first measure() takes a new baseline)."
        )
    return list(state["layers"])


def moved(t: Tensor | None, device: torch.device) -> Tensor | None:
    """A detached copy of ``t`` on ``device`` (``None`` stays ``None``)."""
    return None if t is None else t.detach().to(device).clone()
