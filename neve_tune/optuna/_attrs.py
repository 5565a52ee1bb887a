"""Where NeVe's per-step metrics live on an Optuna trial, and how they are encoded.

``Trial.report`` takes one float, so NeVe's metrics travel as trial **user attributes**:

* ``"neve"`` — the latest step: ``{"step": <optuna step>, "value": <reported value>, **NeVe.metrics()}``.
  This is what :class:`~neve_tune.optuna.NeVePruner` reads.
* ``"neve_history"`` — a list of those dicts, one per reported step, oldest first (for plots and MLflow).
* ``"neve_stop_reason"`` — ``"converged"``, ``"stalled"``, ``"collapsed"``, ``"diverged"``, ``"pruned"`` or
  ``"max_t"``, set when the trial stops for that reason (absent while it runs, and when it ran its full
  budget without ``max_epochs``).
* ``"neve_stop_epoch"`` — ``neve/epoch`` at that stop: the number of epochs trained.

Values are plain JSON: finite floats stay floats; NaN and infinities become the strings ``"nan"``,
``"inf"`` and ``"-inf"`` (strict JSON has no NaN), so ``float(x)`` reads any of them back.
Every step stores fresh objects, never a mutated earlier one (``InMemoryStorage`` keeps references).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

#: User attr holding the latest step's metrics (what the pruner decides on).
NEVE_ATTR = "neve"
#: User attr holding every reported step's metrics, oldest first.
HISTORY_ATTR = "neve_history"
#: User attr: why the trial stopped (a :class:`neve_tune.StopReason` value).
STOP_REASON_ATTR = "neve_stop_reason"
#: User attr: ``neve/epoch`` when the trial stopped.
STOP_EPOCH_ATTR = "neve_stop_epoch"
#: Key of the Optuna step inside a ``"neve"`` entry.
STEP_KEY = "step"
#: Key of the value passed to ``trial.report`` inside a ``"neve"`` entry.
VALUE_KEY = "value"


def encode(value: float) -> float | str:
    """A float as strict JSON: itself when finite, else ``"nan"``, ``"inf"`` or ``"-inf"``."""
    value = float(value)
    if math.isfinite(value):
        return value
    if math.isnan(value):
        return "nan"
    return "inf" if value > 0 else "-inf"


def decode(value: Any) -> float:
    """The inverse of :func:`encode` (also accepts plain floats, ints and numeric strings)."""
    return float(value)


def encode_entry(step: int, value: float, metrics: Mapping[str, float]) -> dict[str, Any]:
    """A fresh ``"neve"`` entry for one step."""
    entry: dict[str, Any] = {STEP_KEY: int(step), VALUE_KEY: encode(value)}
    for key, metric in metrics.items():
        entry[str(key)] = encode(metric)
    return entry
