"""NeVe's decision rule: when to decay the learning rate and when to stop.

Two forms of one rule, with no dependency outside the standard library:

* :class:`NeVeRule`, a pure state machine (plateau LR decay plus the stop test), which the plain-PyTorch
  controller :class:`neve_tune.NeVe` steps once per epoch;
* :func:`decide`, the stop test alone as a stateless function of one epoch's reported metrics. The Ray
  Tune scheduler, the Optuna pruner and Optuna's ``report_epoch`` call it, so they stop exactly where
  the controller does. No integration re-implements the rule.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .. import keys
from ..keys import StopReason
from .anneal import Anneal, Annealer
from .stopping import StopCriteria, StopDetector, StopFlags, settings_disagreement

PlateauOn = Literal["velocity_change", "model_velocity"]

# torch.optim.lr_scheduler.ReduceLROnPlateau ignores LR changes smaller than this; so do we.
_LR_EPS = 1e-8

__all__ = [
    "Anneal", "Decision", "NeVeRule", "PlateauOn", "StopCriteria", "StopFlags", "StopReason", "decide",
    "settings_disagreement",
]  # fmt: skip


@dataclass(frozen=True)
class Decision(StopFlags):
    """What the rule decided at one step.

    Attributes:
        lrs: the learning rates after this step, one per param group.
        lr_decayed: whether at least one learning rate was lowered at this step.
        stop_reason: ``CONVERGED``, ``STALLED``, ``COLLAPSED``, ``DIVERGED`` or ``None`` (keep training).
        detail: why, in words, for a stalled/collapsed/diverged decision ("" otherwise).
    """

    lrs: tuple[float, ...]
    lr_decayed: bool
    stop_reason: StopReason | None
    detail: str = ""


def _is_finite(value: float | None) -> bool:
    return value is None or math.isfinite(value)


def _classify(model_velocity: float, velocity_change: float | None, stop_threshold: float) -> StopReason | None:
    if not (_is_finite(model_velocity) and _is_finite(velocity_change)):
        return StopReason.DIVERGED
    if model_velocity < stop_threshold:
        return StopReason.CONVERGED
    return None


def _check_stop_threshold(stop_threshold: float) -> float:
    if isinstance(stop_threshold, bool) or not isinstance(stop_threshold, (int, float)):
        raise ValueError(f"stop_threshold must be a finite number > 0, but got {stop_threshold=}.")
    if not (math.isfinite(stop_threshold) and stop_threshold > 0.0):
        raise ValueError(f"stop_threshold must be a finite number > 0, but got {stop_threshold=}.")
    return float(stop_threshold)


def _check_min_epochs(min_epochs: int) -> int:
    if isinstance(min_epochs, bool) or not isinstance(min_epochs, int) or min_epochs < 0:
        raise ValueError(f"min_epochs must be an integer >= 0, but got {min_epochs=}.")
    return min_epochs


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
    stop_threshold: float | None = None,
    velocity_key: str = keys.MODEL_VELOCITY,
    change_key: str = keys.VELOCITY_CHANGE,
) -> StopReason | None:
    """The trial's own stop decision, read from one epoch's reported metrics; ``None`` to keep training.

    This is how every integration (:class:`neve_tune.ray.NeVeScheduler`,
    :class:`neve_tune.optuna.NeVePruner`, both ``report_epoch``) learns what the trial's ``NeVe``
    decided: it reads the flags ``neve/diverged``, ``neve/collapsed``, ``neve/stalled`` and
    ``neve/converged`` of ``NeVe.metrics()`` (a flat Ray Tune result, or the ``"neve"`` user attribute
    of an Optuna trial) and returns the first that is 1.0, in that order. It **never recomputes** the
    decision with other settings: the trial's ``NeVe`` applied its own ``stop_threshold``, warm-up
    (``min_epochs``) and stalled/collapsed tests. It keeps no history, so the same metrics give the same
    decision in any process, in any order, after any restore.

    ``stop_threshold`` only matters for metrics from an older producer that reports no flags at all
    (none of the four keys): they are classified by the bare velocity test, ``CONVERGED`` when the
    model velocity is under it. With flags present it is ignored; an integration given a threshold that
    differs from the trial's own (``neve/stop_threshold``) warns (see :func:`settings_disagreement`).

    ``None`` is also the answer when the metrics hold no model velocity (a step on which ``NeVe`` took a
    fresh baseline after a failed measurement, so nothing was measured).

    NaN policy: a NaN or infinite model velocity or velocity change means the trial **diverged**
    (``DIVERGED``), whatever the flags; so does ``neve/diverged == 1.0``. A non-finite value is never
    read as convergence and never skipped. Values may be numbers or numeric strings (``"nan"``,
    ``"inf"``, as Optuna user attributes store them).

    Args:
        metrics: one epoch's flat metrics, keyed by :mod:`neve_tune.keys`; other keys are ignored.
        stop_threshold: for flagless (older) metrics only: converged once the model velocity is under it;
            ``None``: such metrics never stop.
        velocity_key: the key of the model velocity.
        change_key: the key of the velocity change (absent at the first epoch).

    Returns:
        ``StopReason.DIVERGED``, ``COLLAPSED``, ``STALLED``, ``CONVERGED`` or ``None`` (continue). A
        ``StopReason`` is a non-empty string, so ``if decide(metrics): stop`` reads naturally.

    Raises:
        TypeError: a velocity or a flag is not a number.
        ValueError: ``stop_threshold`` is not a finite number > 0.

    Example:
        >>> from neve_tune import decide, keys
        >>> decide({keys.MODEL_VELOCITY: 4e-4, keys.CONVERGED: 1.0})  # the trial's own decision
        <StopReason.CONVERGED: 'converged'>
        >>> decide({keys.MODEL_VELOCITY: 4e-4, keys.CONVERGED: 0.0, keys.STALLED: 1.0})
        <StopReason.STALLED: 'stalled'>
        >>> decide({keys.MODEL_VELOCITY: 4e-4, keys.CONVERGED: 0.0}, stop_threshold=1e-3) is None
        True
        >>> decide({keys.MODEL_VELOCITY: 0.2, keys.VELOCITY_CHANGE: float("nan")})
        <StopReason.DIVERGED: 'diverged'>
        >>> decide({keys.MODEL_VELOCITY: 4e-4}, stop_threshold=1e-3)  # an older producer, no flags
        <StopReason.CONVERGED: 'converged'>
    """
    # Called once per reported result by the Ray scheduler: the common path is inlined and stays well
    # under a microsecond (benchmarks/scheduler_decision.py).
    if stop_threshold is not None and not (
        isinstance(stop_threshold, (int, float)) and math.isfinite(stop_threshold) and stop_threshold > 0.0
    ):
        _check_stop_threshold(stop_threshold)  # raises
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
    if not (_is_finite(model_velocity) and _is_finite(velocity_change)):
        return StopReason.DIVERGED
    flagged = False
    for reason, flag in keys.DECISION_FLAGS.items():
        if flag in metrics:
            flagged = True
            if _number(metrics, flag) == 1.0:
                return reason
    if not flagged and stop_threshold is not None:  # an older producer, without flags
        return _classify(model_velocity, velocity_change, stop_threshold)
    return None


class NeVeRule:
    """Plateau-based LR decay and the stop decision (converged / stalled / collapsed / diverged), no torch.

    The rule sees one ``(model_velocity, velocity_change)`` pair per epoch, plus, when available, the raw
    per-epoch change ``u`` (``raw_change``) and the training loss:

    * **LR decay** works like ``torch.optim.lr_scheduler.ReduceLROnPlateau`` in ``min`` mode with
      threshold 0 and no cooldown, stepped on the velocity change D (or on the model velocity V with
      ``plateau_on="model_velocity"``). An epoch improves only when the value is strictly below the
      best one so far; otherwise it is a bad epoch. When ``bad_epochs > patience`` every learning rate
      is multiplied by ``factor`` (never below ``min_lr``), then ``best`` resets to +inf and
      ``bad_epochs`` to 0. D does not exist at the first epoch; such an epoch does not touch the plateau.
    * **Stop** (:class:`~neve_tune._decide.stopping.StopDetector`): nothing but divergence is decided before
      ``min_epochs``; then ``V < stop_threshold`` is **converged** only for a network that moved (its
      peak V reached ``peak_ratio * stop_threshold``) and, with a loss, learned (``p >= learned``);
      otherwise **stalled**. An abrupt freeze of ``u`` is **collapsed**. With a loss, a trial stuck at
      chance for ``chance_epochs`` epochs is stalled even while V stays high. See :class:`StopCriteria`.
    * **Anneal on convergence** (opt-in, ``anneal=Anneal(...)``): the first convergence starts a cooldown
      instead of a stop: the LRs fall over the next ``L`` epochs (:class:`~neve_tune.Anneal`), during which
      only divergence stops the trial and no plateau decay fires; the trial then ends as converged. A
      cooldown started by the cap coming (``Anneal.max_epochs``) ends with no decision (the loop's cap).

    NaN policy: a NaN or infinite V, D or training loss means the trial **diverged**, at any epoch. Such
    an epoch is never counted as a quiet bad epoch and never decays the LR; the decision carries
    ``StopReason.DIVERGED``.

    State: ``state_dict()`` holds plain Python numbers only (JSON-able); ``load_state_dict()`` restores
    them exactly, so a resumed run makes the same decisions.

    Args:
        factor: multiplier applied to every LR on a plateau, ``0 < factor < 1``.
        patience: number of bad epochs tolerated before a decay (decay when ``bad_epochs > patience``).
        stop_threshold: "not moving" once the model velocity is under this value (``> 0``).
        min_lr: lower bound on the LR, a scalar or one value per param group.
        plateau_on: ``"velocity_change"`` (default, as in the paper) or ``"model_velocity"``.
        min_epochs: the warm-up: no converged/stalled/collapsed decision before this epoch (divergence is
            always decided), like Ray's ``grace_period`` and Optuna's ``n_warmup_steps``.
        num_classes: the number of classes of a cross-entropy training loss (``L_ref = log C``); ``None``
            or ``0``: unknown, the first reported loss is the reference.
        criteria: the thresholds of the stalled/collapsed tests (:class:`StopCriteria` defaults).
        anneal: anneal on convergence (:class:`~neve_tune.Anneal`); ``None`` (default): the paper's rule,
            stop at the first convergence.

    Example:
        >>> rule = NeVeRule(patience=0, factor=0.5)
        >>> rule.step(0.5, None, [0.1]).lrs
        (0.1,)
        >>> rule.step(0.4, 0.02, [0.1]).lr_decayed, rule.step(0.3, 0.03, [0.1]).lrs
        (False, (0.05,))
    """

    def __init__(
        self,
        *,
        factor: float = 0.5,
        patience: int = 10,
        stop_threshold: float = 1e-3,
        min_lr: float | Sequence[float] = 0.0,
        plateau_on: PlateauOn = "velocity_change",
        min_epochs: int = 5,
        num_classes: int | None = None,
        criteria: StopCriteria | None = None,
        anneal: Anneal | None = None,
    ) -> None:
        if not 0.0 < factor < 1.0:
            raise ValueError(f"factor must be between 0 and 1 exclusive (factor < 1.0), but got {factor=}.")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
            raise ValueError(f"patience must be a non-negative integer, but got {patience=}.")
        _check_stop_threshold(stop_threshold)
        _check_min_epochs(min_epochs)
        if num_classes is not None and (
            isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes == 1 or num_classes < 0
        ):
            raise ValueError(f"num_classes must be None, 0 (unknown) or an integer >= 2, but got {num_classes=}.")
        if plateau_on not in ("velocity_change", "model_velocity"):
            raise ValueError(f"plateau_on must be 'velocity_change' or 'model_velocity', but got {plateau_on=}.")
        if criteria is not None and not isinstance(criteria, StopCriteria):
            raise TypeError(f"criteria must be a neve_tune.StopCriteria, but got {type(criteria).__name__}.")
        if anneal is not None and not isinstance(anneal, Anneal):
            raise TypeError(f"anneal must be a neve_tune.Anneal or None, but got {type(anneal).__name__}.")
        min_lrs = [float(min_lr)] if isinstance(min_lr, (int, float)) else [float(m) for m in min_lr]
        if not min_lrs or any(not (math.isfinite(m) and m >= 0.0) for m in min_lrs):
            raise ValueError(f"min_lr must be a number >= 0 or a non-empty list of them, but got {min_lr=}.")
        self.factor = float(factor)
        self.patience = patience
        self.stop_threshold = float(stop_threshold)
        self.plateau_on: PlateauOn = plateau_on
        self.min_epochs = min_epochs
        self._min_lr_scalar = isinstance(min_lr, (int, float))
        self.min_lrs = min_lrs
        self.best = math.inf
        self.bad_epochs = 0
        self.num_decays = 0
        self.num_steps = 0
        self.detector = StopDetector(
            stop_threshold=self.stop_threshold,
            min_epochs=min_epochs,
            num_classes=num_classes or None,
            criteria=criteria or StopCriteria(),
        )
        self.annealer = None if anneal is None else Annealer(anneal)

    @property
    def anneal(self) -> Anneal | None:
        """The anneal-on-convergence settings, ``None`` for the paper's rule."""
        return None if self.annealer is None else self.annealer.settings

    @property
    def criteria(self) -> StopCriteria:
        """The thresholds of the stalled/collapsed tests."""
        return self.detector.criteria

    @property
    def num_classes(self) -> int | None:
        """The number of classes behind ``L_ref = log C``, ``None`` when unknown."""
        return self.detector.num_classes

    def check_num_groups(self, num_groups: int) -> None:
        """Raise if ``min_lr`` was given per group for a different number of param groups."""
        if not self._min_lr_scalar and len(self.min_lrs) != num_groups:
            raise ValueError(f"expected {num_groups} min_lrs (one per param group), got {len(self.min_lrs)}")

    def classify(self, model_velocity: float, velocity_change: float | None = None) -> StopReason | None:
        """The bare velocity test for one measurement, with no state and no warm-up: DIVERGED, CONVERGED, None.

        What :func:`decide` applies to metrics from an older producer that reports no flags. The rule's own
        decision (:meth:`step`) adds the warm-up and the stalled/collapsed tests.
        """
        return _classify(model_velocity, velocity_change, self.stop_threshold)

    def step(
        self,
        model_velocity: float,
        velocity_change: float | None,
        lrs: Sequence[float],
        *,
        raw_change: float | None = None,
        train_loss: float | None = None,
    ) -> Decision:
        """Advance one epoch and return the decision, including the new learning rates.

        Args:
            model_velocity: V of this epoch.
            velocity_change: D (``None`` at the first epoch).
            lrs: the current learning rates, one per param group.
            raw_change: ``u_t``, the mean over neurons of ``1 - rho_i`` (enables the collapse test).
            train_loss: this epoch's training loss (enables the loss tests), ``None`` when not known.
        """
        self.check_num_groups(len(lrs))
        self.num_steps += 1
        lrs = tuple(float(lr) for lr in lrs)
        reason = self.detector.step(self.num_steps, model_velocity, velocity_change, raw_change, train_loss)
        detail = self.detector.detail
        value = velocity_change if self.plateau_on == "velocity_change" else model_velocity
        annealer = self.annealer
        if annealer is not None and annealer.cooling and reason is not StopReason.DIVERGED:
            if annealer.done(self.num_steps):
                return Decision(lrs, False, None if annealer.by_cap else StopReason.CONVERGED, "")
            return self._cool(lrs)
        if reason is StopReason.DIVERGED or value is None or not math.isfinite(value):
            return self._maybe_anneal(Decision(lrs, False, reason, detail))
        if value < self.best:
            self.best = float(value)
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1
        decayed = False
        if self.bad_epochs > self.patience:
            lrs, decayed = self._decay(lrs)
            self.best = math.inf
            self.bad_epochs = 0
        return self._maybe_anneal(Decision(lrs, decayed, reason, detail))

    def _maybe_anneal(self, decision: Decision) -> Decision:
        """A convergence (or the coming cap) starts the cooldown instead of stopping, with an annealer."""
        a = self.annealer
        if a is None or decision.stop_reason not in (None, StopReason.CONVERGED):
            return decision
        converged = decision.stop_reason is StopReason.CONVERGED
        if not a.should_start(self.num_steps, converged) or not a.begin(self.num_steps, decision.lrs, converged):
            return decision
        return self._cool(decision.lrs)

    def _cool(self, lrs: tuple[float, ...]) -> Decision:
        assert self.annealer is not None
        floors = [self.min_lrs[0]] * len(lrs) if self._min_lr_scalar else self.min_lrs
        new = self.annealer.lrs(self.num_steps, floors)
        return Decision(new, any(old - lr > _LR_EPS for old, lr in zip(lrs, new, strict=True)), None, "")

    def _decay(self, lrs: tuple[float, ...]) -> tuple[tuple[float, ...], bool]:
        new_lrs = []
        decayed = False
        for i, lr in enumerate(lrs):
            floor = self.min_lrs[0] if self._min_lr_scalar else self.min_lrs[i]
            new_lr = max(lr * self.factor, floor)
            if lr - new_lr > _LR_EPS:
                decayed = True
            else:
                new_lr = lr
            new_lrs.append(new_lr)
        if decayed:
            self.num_decays += 1
        return tuple(new_lrs), decayed

    def state_dict(self) -> dict[str, Any]:
        """The rule's settings and counters, as plain JSON-able Python values."""
        return {
            "factor": self.factor,
            "patience": self.patience,
            "stop_threshold": self.stop_threshold,
            "min_lr": self.min_lrs[0] if self._min_lr_scalar else list(self.min_lrs),
            "plateau_on": self.plateau_on,
            "min_epochs": self.min_epochs,
            "best": self.best,
            "bad_epochs": self.bad_epochs,
            "num_decays": self.num_decays,
            "num_steps": self.num_steps,
            "detector": self.detector.state_dict(),
            "anneal": None if self.annealer is None else self.annealer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned. Settings are re-validated.

        A state saved before the stalled/collapsed tests existed (no ``detector`` entry) restores with
        ``min_epochs=0`` and a peak velocity of +inf: it keeps deciding as before (V under the threshold
        is converged) until a training loss or the raw change sharpen the decision. A state without an
        ``anneal`` entry (saved before anneal-on-convergence existed) keeps this rule's ``anneal`` setting,
        with no cooldown under way.
        """
        fresh = NeVeRule(
            factor=state["factor"],
            patience=state["patience"],
            stop_threshold=state["stop_threshold"],
            min_lr=state["min_lr"],
            plateau_on=state["plateau_on"],
            min_epochs=int(state.get("min_epochs", 0)),
            anneal=self.anneal,
        )
        fresh.best = float(state["best"])
        fresh.bad_epochs = int(state["bad_epochs"])
        fresh.num_decays = int(state["num_decays"])
        fresh.num_steps = int(state["num_steps"])
        if "detector" in state:
            fresh.detector.load_state_dict(state["detector"])
        else:
            fresh.detector.peak_velocity = math.inf
        if state.get("anneal") is not None:
            fresh.annealer = Annealer(Anneal())
            fresh.annealer.load_state_dict(state["anneal"])
        elif "anneal" in state:
            fresh.annealer = None
        self.__dict__.update(fresh.__dict__)

    def __repr__(self) -> str:
        return (
            f"NeVeRule(factor={self.factor}, patience={self.patience}, stop_threshold={self.stop_threshold},"
            f" min_lr={self.state_dict()['min_lr']}, plateau_on={self.plateau_on!r},"
            f" min_epochs={self.min_epochs}, num_classes={self.num_classes}"
            + ("" if self.anneal is None else f", anneal={self.anneal!r}")
            + ")"
        )
