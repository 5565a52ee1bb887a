"""The trial's own stop decision, read from one epoch's reported metrics: :func:`~neve_tune.decide`.

Stateless and standard library only. The Ray Tune scheduler and the Optuna pruner call it, so they stop
exactly where the trial's :class:`~neve_tune.NeVe` decided; no integration re-implements the rule
(:class:`~neve_tune.NeVeRule`, which sets the flags read here).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .. import keys
from ..keys import StopReason


def check_stop_threshold(stop_threshold: float) -> float:
    """``stop_threshold`` as a float, or ``ValueError`` unless it is a finite number > 0."""
    if (
        isinstance(stop_threshold, bool)
        or not isinstance(stop_threshold, (int, float))
        or not (math.isfinite(stop_threshold) and stop_threshold > 0.0)
    ):
        raise ValueError(f"stop_threshold must be a finite number > 0, but got {stop_threshold=}.")
    return float(stop_threshold)


def _not_a_number(key: str, value: Any) -> TypeError:
    return TypeError(
        f"decide() expects a number under {key!r}, but the metrics hold {value!r} ({type(value).__name__})."
        " Report plain floats, as `neve.metrics()` does."
    )


def _number(metrics: Mapping[str, Any], key: str) -> float | None:
    """``metrics[key]`` as a float (numbers and numeric strings such as ``"nan"``), ``None`` when absent."""
    value = metrics.get(key)
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise _not_a_number(key, value) from None


def decide(
    metrics: Mapping[str, Any],
    *,
    velocity_key: str = keys.MODEL_VELOCITY,
    change_key: str = keys.VELOCITY_CHANGE,
) -> StopReason | None:
    """The trial's own stop decision, read from one epoch's reported metrics; ``None`` to keep training.

    This is how the integrations (:class:`neve_tune.ray.NeVeScheduler`, :class:`neve_tune.optuna.NeVePruner`)
    learn what the trial's ``NeVe`` decided: it reads the flags ``neve/diverged``, ``neve/collapsed``,
    ``neve/stalled`` and ``neve/converged`` of ``NeVe.metrics()`` (a flat Ray Tune result, or the ``"neve"``
    user attribute of an Optuna trial) and returns the first that is 1.0, in that order. It **never
    recomputes** the decision with other settings: the trial's ``NeVe`` applied its own ``stop_threshold``,
    warm-up (``min_epochs``) and stalled/collapsed tests. It keeps no history, so the same metrics give the
    same decision in any process, in any order, after any restore.

    ``None`` is also the answer when the metrics hold no model velocity (a step on which ``NeVe`` took a
    fresh baseline after a failed measurement, so nothing was measured), and when they hold no flag.

    NaN policy: a NaN or infinite model velocity or velocity change means the trial **diverged**
    (``DIVERGED``), whatever the flags; so does ``neve/diverged == 1.0``. A non-finite value is never
    read as convergence and never skipped. Values may be numbers or numeric strings (``"nan"``,
    ``"inf"``, as Optuna user attributes store them).

    Args:
        metrics: one epoch's flat metrics, keyed by :mod:`neve_tune.keys`; other keys are ignored.
        velocity_key: the key of the model velocity.
        change_key: the key of the velocity change (absent at the first epoch).

    Returns:
        ``StopReason.DIVERGED``, ``COLLAPSED``, ``STALLED``, ``CONVERGED`` or ``None`` (continue). A
        ``StopReason`` is a non-empty string, so ``if decide(metrics): stop`` reads naturally.

    Raises:
        TypeError: a velocity or a flag is not a number.

    Example:
        >>> from neve_tune import decide, keys
        >>> decide({keys.MODEL_VELOCITY: 4e-4, keys.CONVERGED: 1.0})  # the trial's own decision
        <StopReason.CONVERGED: 'converged'>
        >>> decide({keys.MODEL_VELOCITY: 4e-4, keys.CONVERGED: 0.0, keys.STALLED: 1.0})
        <StopReason.STALLED: 'stalled'>
        >>> decide({keys.MODEL_VELOCITY: 4e-4, keys.CONVERGED: 0.0}) is None
        True
        >>> decide({keys.MODEL_VELOCITY: 0.2, keys.VELOCITY_CHANGE: float("nan")})
        <StopReason.DIVERGED: 'diverged'>
    """
    # Called once per reported result by the Ray scheduler: kept to a few dict reads, well under a
    # microsecond (benchmarks/scheduler_decision.py).
    raw_velocity = metrics.get(velocity_key)
    if raw_velocity is None:
        return None
    raw_change = metrics.get(change_key)
    try:
        model_velocity = float(raw_velocity)
    except (TypeError, ValueError):
        raise _not_a_number(velocity_key, raw_velocity) from None
    try:
        velocity_change = None if raw_change is None else float(raw_change)
    except (TypeError, ValueError):
        raise _not_a_number(change_key, raw_change) from None
    if not math.isfinite(model_velocity) or (velocity_change is not None and not math.isfinite(velocity_change)):
        return StopReason.DIVERGED
    for reason, flag in keys.DECISION_FLAGS.items():
        if flag in metrics and _number(metrics, flag) == 1.0:
            return reason
    return None


def settings_disagreement(metrics: Mapping[str, Any], stop_threshold: float | None, who: str) -> str | None:
    """A message when ``stop_threshold`` differs from the trial's own (``neve/stop_threshold``), else None.

    The integrations call it once per trial: the trial's ``NeVe`` decides with its own threshold, so a
    different value given to a scheduler or pruner has no effect, and the user should know.
    """
    if stop_threshold is None:
        return None
    raw = metrics.get(keys.STOP_THRESHOLD)
    try:
        own = None if raw is None else float(raw)
    except (TypeError, ValueError):
        own = None
    if own is None or math.isclose(own, stop_threshold, rel_tol=1e-9, abs_tol=0.0):
        return None
    return (
        f"{who} was given stop_threshold={stop_threshold:g}, but the trial's NeVe reports"
        f" stop_threshold={own:g} ({keys.STOP_THRESHOLD}). The trial's own NeVe decides (with {own:g});"
        f" {who}'s value is ignored. Pass the same value to both, or drop it from {who}."
    )


__all__ = ["check_stop_threshold", "decide", "settings_disagreement"]
