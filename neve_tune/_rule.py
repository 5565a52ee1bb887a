"""NeVe's decision rule: when to decay the learning rate and when to stop, as a pure state machine.

This module imports nothing but the standard library, so the same rule object serves the plain-PyTorch
controller, the Ray Tune scheduler and the Optuna pruner. No integration re-implements it.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

PlateauOn = Literal["velocity_change", "model_velocity"]

# torch.optim.lr_scheduler.ReduceLROnPlateau ignores LR changes smaller than this; so do we.
_LR_EPS = 1e-8


class StopReason(str, enum.Enum):
    """Why a trial stopped. The value is the plain string that tags, attributes and results carry."""

    CONVERGED = "converged"
    """The model velocity fell under ``stop_threshold``: training has settled."""
    DIVERGED = "diverged"
    """The model velocity or the velocity change was NaN or infinite."""
    MAX_T = "max_t"
    """The trial reached the epoch/iteration cap of its scheduler."""
    PRUNED = "pruned"
    """A wrapped, validation-based pruner (e.g. Optuna's MedianPruner) rejected the trial."""

    def __str__(self) -> str:
        return self.value


class StopFlags:
    """``converged`` / ``diverged`` / ``should_stop``, derived from a ``stop_reason`` attribute."""

    stop_reason: StopReason | None

    @property
    def converged(self) -> bool:
        return self.stop_reason is StopReason.CONVERGED

    @property
    def diverged(self) -> bool:
        return self.stop_reason is StopReason.DIVERGED

    @property
    def should_stop(self) -> bool:
        """True when training should end here (converged or diverged)."""
        return self.stop_reason is not None


@dataclass(frozen=True)
class Decision(StopFlags):
    """What the rule decided at one step.

    Attributes:
        lrs: the learning rates after this step, one per param group.
        lr_decayed: whether at least one learning rate was lowered at this step.
        stop_reason: ``CONVERGED``, ``DIVERGED`` or ``None`` (keep training).
    """

    lrs: tuple[float, ...]
    lr_decayed: bool
    stop_reason: StopReason | None


def _is_finite(value: float | None) -> bool:
    return value is None or math.isfinite(value)


class NeVeRule:
    """Plateau-based LR decay and velocity-based stopping, with no dependency on torch.

    The rule sees one ``(model_velocity, velocity_change)`` pair per epoch:

    * **LR decay** works like ``torch.optim.lr_scheduler.ReduceLROnPlateau`` in ``min`` mode with
      threshold 0 and no cooldown, stepped on the velocity change D (or on the model velocity V with
      ``plateau_on="model_velocity"``). An epoch improves only when the value is strictly below the
      best one so far; otherwise it is a bad epoch. When ``bad_epochs > patience`` every learning rate
      is multiplied by ``factor`` (never below ``min_lr``), then ``best`` resets to +inf and
      ``bad_epochs`` to 0. D does not exist at the first epoch; such an epoch does not touch the plateau.
    * **Stop:** ``V < stop_threshold`` means the trial converged.

    NaN policy: a NaN or infinite V or D means the trial **diverged**. Such an epoch is never counted as
    a quiet bad epoch and never decays the LR; the decision carries ``StopReason.DIVERGED``.

    State: ``state_dict()`` holds plain Python numbers only (JSON-able); ``load_state_dict()`` restores
    them exactly, so a resumed run makes the same decisions.

    Args:
        factor: multiplier applied to every LR on a plateau, ``0 < factor < 1``.
        patience: number of bad epochs tolerated before a decay (decay when ``bad_epochs > patience``).
        stop_threshold: the trial converged once the model velocity is under this value.
        min_lr: lower bound on the LR, a scalar or one value per param group.
        plateau_on: ``"velocity_change"`` (default, as in the paper) or ``"model_velocity"``.

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
    ) -> None:
        if not 0.0 < factor < 1.0:
            raise ValueError(f"factor must be between 0 and 1 exclusive (factor < 1.0), but got {factor=}.")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
            raise ValueError(f"patience must be a non-negative integer, but got {patience=}.")
        if not (math.isfinite(stop_threshold) and stop_threshold >= 0.0):
            raise ValueError(f"stop_threshold must be a finite number >= 0, but got {stop_threshold=}.")
        if plateau_on not in ("velocity_change", "model_velocity"):
            raise ValueError(
                f"plateau_on must be 'velocity_change' or 'model_velocity', but got {plateau_on=}."
            )
        min_lrs = [float(min_lr)] if isinstance(min_lr, (int, float)) else [float(m) for m in min_lr]
        if not min_lrs or any(not (math.isfinite(m) and m >= 0.0) for m in min_lrs):
            raise ValueError(f"min_lr must be a number >= 0 or a non-empty list of them, but got {min_lr=}.")
        self.factor = float(factor)
        self.patience = patience
        self.stop_threshold = float(stop_threshold)
        self.plateau_on: PlateauOn = plateau_on
        self._min_lr_scalar = isinstance(min_lr, (int, float))
        self.min_lrs = min_lrs
        self.best = math.inf
        self.bad_epochs = 0
        self.num_decays = 0
        self.num_steps = 0

    def check_num_groups(self, num_groups: int) -> None:
        """Raise if ``min_lr`` was given per group for a different number of param groups."""
        if not self._min_lr_scalar and len(self.min_lrs) != num_groups:
            raise ValueError(f"expected {num_groups} min_lrs (one per param group), got {len(self.min_lrs)}")

    def classify(self, model_velocity: float, velocity_change: float | None = None) -> StopReason | None:
        """The stop decision for one measurement alone, with no state: DIVERGED, CONVERGED or None.

        Integrations that decide from each reported result (the Ray scheduler, the Optuna pruner) call
        this, so they stop exactly where the controller does.
        """
        if not (_is_finite(model_velocity) and _is_finite(velocity_change)):
            return StopReason.DIVERGED
        if model_velocity < self.stop_threshold:
            return StopReason.CONVERGED
        return None

    def step(
        self, model_velocity: float, velocity_change: float | None, lrs: Sequence[float]
    ) -> Decision:
        """Advance one epoch and return the decision, including the new learning rates."""
        self.check_num_groups(len(lrs))
        self.num_steps += 1
        lrs = tuple(float(lr) for lr in lrs)
        reason = self.classify(model_velocity, velocity_change)
        value = velocity_change if self.plateau_on == "velocity_change" else model_velocity
        if reason is StopReason.DIVERGED or value is None:
            return Decision(lrs, False, reason)
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
        return Decision(lrs, decayed, reason)

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
            "best": self.best,
            "bad_epochs": self.bad_epochs,
            "num_decays": self.num_decays,
            "num_steps": self.num_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned. Settings are re-validated."""
        fresh = NeVeRule(
            factor=state["factor"],
            patience=state["patience"],
            stop_threshold=state["stop_threshold"],
            min_lr=state["min_lr"],
            plateau_on=state["plateau_on"],
        )
        fresh.best = float(state["best"])
        fresh.bad_epochs = int(state["bad_epochs"])
        fresh.num_decays = int(state["num_decays"])
        fresh.num_steps = int(state["num_steps"])
        self.__dict__.update(fresh.__dict__)

    def __repr__(self) -> str:
        return (
            f"NeVeRule(factor={self.factor}, patience={self.patience}, stop_threshold={self.stop_threshold},"
            f" min_lr={self.state_dict()['min_lr']}, plateau_on={self.plateau_on!r})"
        )
