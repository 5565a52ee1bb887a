"""NeVe's decision rule: when to decay the learning rate and when, and why, to stop.

:class:`NeVeRule` is a pure state machine (plateau LR decay plus the stop test of
:class:`~neve_tune._decide.stopping.StopDetector`, with the optional anneal on convergence), with no
dependency outside the standard library. The plain-PyTorch controller :class:`neve_tune.NeVe` steps it once
per epoch; its flags reach the integrations through ``NeVe.metrics()`` and :func:`neve_tune.decide`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, Literal

from ..keys import StopReason
from .anneal import Anneal, Annealer
from .decide import check_stop_threshold
from .result import StepResult
from .stopping import StopCriteria, StopDetector

PlateauOn = Literal["velocity_change", "model_velocity"]

# torch.optim.lr_scheduler.ReduceLROnPlateau ignores LR changes smaller than this; so do we.
_LR_EPS = 1e-8


def _check_min_epochs(min_epochs: int) -> int:
    if isinstance(min_epochs, bool) or not isinstance(min_epochs, int) or min_epochs < 0:
        raise ValueError(f"min_epochs must be an integer >= 0, but got {min_epochs=}.")
    return min_epochs


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
        [0.1]
        >>> rule.step(0.4, 0.02, [0.1]).lr_decayed, rule.step(0.3, 0.03, [0.1]).lrs
        (False, [0.05])
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
        check_stop_threshold(stop_threshold)
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

    def step(
        self,
        model_velocity: float,
        velocity_change: float | None,
        lrs: Sequence[float],
        *,
        raw_change: float | None = None,
        train_loss: float | None = None,
    ) -> StepResult:
        """Advance one epoch and return the result: the decision, with the new learning rates.

        Args:
            model_velocity: V of this epoch.
            velocity_change: D (``None`` at the first epoch).
            lrs: the current learning rates, one per param group.
            raw_change: ``u_t``, the mean over neurons of ``1 - rho_i`` (enables the collapse test).
            train_loss: this epoch's training loss (enables the loss tests), ``None`` when not known.

        Returns:
            A :class:`~neve_tune.StepResult` with ``epoch`` = the number of steps so far and no per-layer
            velocities (:class:`~neve_tune.NeVe` adds those).
        """
        self.check_num_groups(len(lrs))
        self.num_steps += 1
        new_lrs, decayed, reason, detail = self._advance(
            model_velocity, velocity_change, tuple(float(lr) for lr in lrs), raw_change, train_loss
        )
        return StepResult(
            epoch=self.num_steps,
            model_velocity=model_velocity,
            velocity_change=velocity_change,
            lr_decayed=decayed,
            lrs=list(new_lrs),
            stop_reason=reason,
            num_decays=self.num_decays,
            train_loss=train_loss,
            detail=detail,
            stop_threshold=self.stop_threshold,
            min_epochs=self.min_epochs,
            annealing=self.annealer is not None and self.annealer.cooling and reason is None,
        )

    def _advance(
        self,
        model_velocity: float,
        velocity_change: float | None,
        lrs: tuple[float, ...],
        raw_change: float | None,
        train_loss: float | None,
    ) -> tuple[tuple[float, ...], bool, StopReason | None, str]:
        """The decision flow of one epoch: ``(new lrs, decayed, stop reason, detail)``."""
        reason = self.detector.step(self.num_steps, model_velocity, velocity_change, raw_change, train_loss)
        detail = self.detector.detail
        value = velocity_change if self.plateau_on == "velocity_change" else model_velocity
        annealer = self.annealer
        if annealer is not None and annealer.cooling and reason is not StopReason.DIVERGED:
            if annealer.done(self.num_steps):
                return lrs, False, None if annealer.by_cap else StopReason.CONVERGED, ""
            return self._cool(lrs)
        if reason is StopReason.DIVERGED or value is None or not math.isfinite(value):
            return self._maybe_anneal(lrs, False, reason, detail)
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
        return self._maybe_anneal(lrs, decayed, reason, detail)

    def _maybe_anneal(
        self, lrs: tuple[float, ...], decayed: bool, reason: StopReason | None, detail: str
    ) -> tuple[tuple[float, ...], bool, StopReason | None, str]:
        """A convergence (or the coming cap) starts the cooldown instead of stopping, with an annealer."""
        a = self.annealer
        if a is None or reason not in (None, StopReason.CONVERGED):
            return lrs, decayed, reason, detail
        converged = reason is StopReason.CONVERGED
        if not a.should_start(self.num_steps, converged) or not a.begin(self.num_steps, lrs, converged):
            return lrs, decayed, reason, detail
        return self._cool(lrs)

    def _cool(self, lrs: tuple[float, ...]) -> tuple[tuple[float, ...], bool, StopReason | None, str]:
        assert self.annealer is not None
        floors = [self.min_lrs[0]] * len(lrs) if self._min_lr_scalar else self.min_lrs
        new = tuple(self.annealer.lrs(self.num_steps, floors))
        return new, any(old - lr > _LR_EPS for old, lr in zip(lrs, new, strict=True)), None, ""

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
        """Restore what :meth:`state_dict` returned, settings included (re-validated); a state that is not
        one :meth:`state_dict` wrote raises ``ValueError`` naming what is missing, and changes nothing.

        The state's settings win over the constructor's (a resumed run keeps deciding as it did); a
        ``UserWarning`` names every setting that changed. To run with other settings, do not load a state."""
        before = self._settings()
        missing = sorted(_STATE_KEYS - set(state))
        if missing:
            raise ValueError(
                f"This NeVeRule state lacks {missing}: it was not written by NeVeRule.state_dict() of this"
                " version of neve_tune. Restore from a checkpoint this version wrote, or start a fresh rule."
            )
        fresh = NeVeRule(
            factor=state["factor"],
            patience=state["patience"],
            stop_threshold=state["stop_threshold"],
            min_lr=state["min_lr"],
            plateau_on=state["plateau_on"],
            min_epochs=int(state["min_epochs"]),
        )
        fresh.best = float(state["best"])
        fresh.bad_epochs = int(state["bad_epochs"])
        fresh.num_decays = int(state["num_decays"])
        fresh.num_steps = int(state["num_steps"])
        fresh.detector.load_state_dict(state["detector"])
        if state["anneal"] is not None:
            fresh.annealer = Annealer(Anneal())
            fresh.annealer.load_state_dict(state["anneal"])
        self.__dict__.update(fresh.__dict__)
        changed = [f"{k} {v!r} -> {self._settings()[k]!r}" for k, v in before.items() if v != self._settings()[k]]
        if changed:
            warnings.warn(
                f"The loaded NeVe state replaces these settings of the object it was loaded into: {'; '.join(changed)}."
                " The state wins, so a resumed run decides as before; to train with the new settings, start a fresh"
                " NeVe instead of loading the state.",
                UserWarning,
                stacklevel=3,
            )

    def _settings(self) -> dict[str, Any]:
        """The settings a state carries (and those it resets), for the load warning."""
        keys = ("factor", "patience", "stop_threshold", "plateau_on", "min_epochs", "num_classes", "criteria")
        return {**{k: getattr(self, k) for k in keys}, "min_lr": self.min_lrs, "anneal": self.anneal}

    def __repr__(self) -> str:
        return (
            f"NeVeRule(factor={self.factor}, patience={self.patience}, stop_threshold={self.stop_threshold},"
            f" min_lr={self.state_dict()['min_lr']}, plateau_on={self.plateau_on!r},"
            f" min_epochs={self.min_epochs}, num_classes={self.num_classes}"
            + ("" if self.anneal is None else f", anneal={self.anneal!r}")
            + ")"
        )


_STATE_KEYS = frozenset(NeVeRule(min_epochs=0).state_dict())
