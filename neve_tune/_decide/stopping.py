"""When a low (or never-settling) velocity does not mean "converged": the stalled and collapsed tests.

``V < stop_threshold`` says the network stopped moving on the aux set. It does not say the network
*learned*: a learning rate far too small never moves it, and one far too large can kill every ReLU in a
few epochs, after which nothing moves either. :class:`StopDetector` tells the three apart without
validation data, from what NeVe already measures (V, its peak so far, and the raw per-epoch change ``u``)
and, when the training loop passes it, the training loss. It is a pure state machine with no dependency
outside the standard library, stepped once per epoch by :class:`neve_tune.NeVeRule`.

The thresholds are :class:`StopCriteria`; every one is a ratio or a fraction (scale-free), and the
defaults were chosen on 58 measured runs (MLPs, CNNs with and without BatchNorm, digits and tabular data;
healthy, slow, stalled and collapsed trainings) and then widened where a later healthy run came close
(a small digits MLP at lr 0.02 peaked at 9.5x the threshold; never-moving runs peak at 0.2x or less).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from ..keys import StopReason

__all__ = ["StopCriteria", "StopDetector"]


@dataclass(frozen=True)
class StopCriteria:
    """The thresholds of NeVe's stalled / collapsed / converged tests (all scale-free).

    Attributes:
        peak_ratio: without a training loss, a trial whose model velocity never reached
            ``peak_ratio * stop_threshold`` is **stalled** (it never moved) rather than converged when
            ``V`` falls under ``stop_threshold``. The healthy runs measured peaked at 9.5x the default
            threshold or more (most at 40x or more), never-moving ones at 0.2x or less.
        freeze_ratio: **collapsed** when the raw per-epoch change ``u_t = mean_i (1 - rho_i^t)`` falls to
            ``freeze_ratio * u_{t - freeze_span}`` or less while ``u_{t - freeze_span}`` was at least
            ``10 * stop_threshold``: an abrupt freeze, the signature of gradients that vanished at once
            (dead ReLUs). The steepest healthy decay measured was 2.2e-3 over 3 epochs.
        freeze_span: the number of epochs of that comparison.
        learned: with a training loss, "learned" means at least this share of the chance-level loss was
            removed: ``p = 1 - L / L_ref >= learned`` (``L`` the mean of the last ``loss_window`` losses,
            ``L_ref = log(num_classes)``, or the first loss when the number of classes is unknown). A
            trial with ``V < stop_threshold`` and ``p >= learned`` is converged; with ``p < learned`` it is
            stalled; either only once the loss no longer falls (``min_slope``). Lower it for hard tasks whose final loss
            stays high (e.g. many classes, label noise).
        min_slope: "still learning": the smoothed loss fell by at least this share of ``L_ref`` per epoch
            over the last ``loss_window`` epochs; such a trial keeps training even with ``V`` under the
            threshold, whether or not it has already learned (``p >= learned``): a network whose loss still
            falls that fast is not done, however still its aux responses are.
        chance_progress: "stuck at chance": ``p < chance_progress``...
        chance_epochs: ...with no ``min_slope`` progress for this many consecutive epochs after the
            warm-up: **stalled** even though ``V`` never settles (an LR so large the network thrashes at
            chance). Needs the training loss; without it such a trial runs to its epoch cap.
        loss_window: the number of epochs averaged into ``L`` (and the span of the slope).
    """

    peak_ratio: float = 2.0
    freeze_ratio: float = 1e-4
    freeze_span: int = 3
    learned: float = 0.25
    min_slope: float = 0.01
    chance_progress: float = 0.1
    chance_epochs: int = 10
    loss_window: int = 3

    def __post_init__(self) -> None:
        for name in ("peak_ratio", "freeze_ratio", "min_slope"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, but got {name}={value!r}.")
        for name in ("learned", "chance_progress"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 < value <= 1.0):
                raise ValueError(f"{name} must be in (0, 1], but got {name}={value!r}.")
        for name in ("freeze_span", "chance_epochs", "loss_window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, but got {name}={value!r}.")


class StopDetector:
    """Classifies each epoch as converged, stalled, collapsed or diverged (or none: keep training).

    Order of the tests at epoch ``t`` (1-based):

    1. **diverged**: V, D or the training loss is NaN or infinite (at any epoch, even in the warm-up);
    2. **collapsed** (needs ``u``): an abrupt freeze (see :class:`StopCriteria`), remembered when it
       happens and reported at the first epoch ``>= min_epochs``; never when the loss says the network
       learned (``p >= learned``);
    3. nothing else before ``min_epochs``;
    4. with a training loss: ``V < stop_threshold`` keeps training while the loss still falls by
       ``min_slope`` per epoch (the aux responses settled, but the network is still learning), and is
       then converged when ``p >= learned``, otherwise stalled; with ``V`` above the threshold,
       ``chance_epochs`` epochs stuck at chance are stalled ("unsettled");
    5. without a loss: ``V < stop_threshold`` is stalled when the peak V stayed under
       ``peak_ratio * stop_threshold``, converged otherwise.

    A trial whose loss is missing at some epochs is judged with the loss at the epochs that have one.
    A reference loss ``L_ref <= 0`` (a first loss of 0 or less, when the number of classes is unknown)
    disables the loss tests: the trial is judged as without a loss.

    State: :meth:`state_dict` is JSON-able; :meth:`load_state_dict` restores it exactly.
    """

    def __init__(
        self, *, stop_threshold: float, min_epochs: int, num_classes: int | None, criteria: StopCriteria
    ) -> None:
        self.stop_threshold = stop_threshold
        self.min_epochs = min_epochs
        self.num_classes = num_classes
        self.criteria = criteria
        self.peak_velocity = 0.0
        self.raw_changes: list[float] = []
        self.froze_at: int | None = None
        self.losses: list[float] = []
        self.first_loss: float | None = None
        self.chance_run = 0
        self.detail = ""

    # ------------------------------------------------------------------ the loss view
    @property
    def reference_loss(self) -> float | None:
        """``L_ref``: ``log(num_classes)``, else the first reported loss, else ``None``."""
        if self.num_classes is not None and self.num_classes >= 2:
            return math.log(self.num_classes)
        return self.first_loss

    def progress(self) -> float | None:
        """``p = 1 - L / L_ref`` over the last ``loss_window`` losses, ``None`` without a usable loss."""
        ref = self.reference_loss
        if not self.losses or ref is None or not ref > 0:
            return None
        window = self.losses[-self.criteria.loss_window :]
        return 1.0 - (sum(window) / len(window)) / ref

    def slope(self, partial: bool = False) -> float:
        """The share of ``L_ref`` removed per epoch over the last window: the mean of the last ``w`` losses
        against the ``w`` before, ``w = loss_window``; ``inf`` (unknown) until two windows exist. With
        ``partial``, while fewer than two windows exist, ``w = len(losses) // 2``: known from the second loss."""
        w = self.criteria.loss_window
        if partial and len(self.losses) < 2 * w:
            w = len(self.losses) // 2
        ref = self.reference_loss
        if w < 1 or len(self.losses) < 2 * w or ref is None or not ref > 0:
            return math.inf
        now = sum(self.losses[-w:]) / w
        before = sum(self.losses[-2 * w : -w]) / w
        return (before - now) / (w * ref)

    # ------------------------------------------------------------------ one epoch
    def step(
        self,
        epoch: int,
        model_velocity: float,
        velocity_change: float | None,
        raw_change: float | None = None,
        train_loss: float | None = None,
    ) -> StopReason | None:
        """Take one epoch's numbers and return the reason to stop now, or ``None``; sets :attr:`detail`."""
        self.detail = ""
        finite = math.isfinite(model_velocity) and (velocity_change is None or math.isfinite(velocity_change))
        if not finite:
            return StopReason.DIVERGED
        if train_loss is not None and not math.isfinite(train_loss):
            self.detail = f"the training loss is {train_loss}"
            return StopReason.DIVERGED
        self.peak_velocity = max(self.peak_velocity, model_velocity)
        if train_loss is not None:
            if self.first_loss is None:
                self.first_loss = float(train_loss)
            self.losses = [*self.losses, float(train_loss)][-2 * self.criteria.loss_window :]
        self._watch_freeze(epoch, raw_change)
        p = self.progress() if train_loss is not None else None
        learned = p is not None and p >= self.criteria.learned
        if self.froze_at is not None and epoch >= self.min_epochs and not learned:
            self.detail = (
                f"the aux responses froze at epoch {self.froze_at} (raw change fell by more than"
                f" {1 / self.criteria.freeze_ratio:.0f}x in {self.criteria.freeze_span} epochs): dead units"
            )
            return StopReason.COLLAPSED
        if epoch < self.min_epochs:
            return None
        if p is not None:
            return self._with_loss(model_velocity, p)
        if model_velocity < self.stop_threshold:
            if self.peak_velocity < self.criteria.peak_ratio * self.stop_threshold:
                self.detail = f"it never moved: peak model velocity {self.peak_velocity:.3g}"
                return StopReason.STALLED
            return StopReason.CONVERGED
        return None

    def _watch_freeze(self, epoch: int, raw_change: float | None) -> None:
        if raw_change is None or not math.isfinite(raw_change):
            return
        span = self.criteria.freeze_span
        self.raw_changes = [*self.raw_changes, float(raw_change)][-(span + 1) :]
        if self.froze_at is None and epoch >= 2 and len(self.raw_changes) == span + 1:
            then, now = self.raw_changes[0], self.raw_changes[-1]
            if then >= 10 * self.stop_threshold and now <= self.criteria.freeze_ratio * then:
                self.froze_at = epoch

    def _with_loss(self, model_velocity: float, p: float) -> StopReason | None:
        c = self.criteria
        slope = self.slope()
        if model_velocity < self.stop_threshold:
            self.chance_run = 0
            if slope >= c.min_slope and (math.isfinite(slope) or p < c.learned):
                # V says "not moving", but the loss still falls (or, not learned yet, may still): keep training.
                return None
            early = self.slope(partial=True) if not math.isfinite(slope) else slope
            if p >= c.learned and math.isfinite(early) and early >= c.min_slope:
                return None  # learned, and before two loss windows exist the loss seen so far still falls
            if p >= c.learned:
                return StopReason.CONVERGED
            self.detail = f"only {p:.0%} of the chance-level loss removed, and the loss no longer falls"
            return StopReason.STALLED
        self.chance_run = self.chance_run + 1 if (p < c.chance_progress and slope < c.min_slope) else 0
        if self.chance_run >= c.chance_epochs:
            self.detail = (
                f"unsettled: not learning while still moving ({p:.0%} of the chance-level loss removed,"
                f" {self.chance_run} epochs without progress)"
            )
            return StopReason.STALLED
        return None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The counters and histories, as plain JSON-able values (the settings live in the rule)."""
        return {
            "criteria": asdict(self.criteria),
            "num_classes": self.num_classes,
            "peak_velocity": self.peak_velocity,
            "raw_changes": list(self.raw_changes),
            "froze_at": self.froze_at,
            "losses": list(self.losses),
            "first_loss": self.first_loss,
            "chance_run": self.chance_run,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; the criteria are re-validated."""
        self.criteria = StopCriteria(**state["criteria"])
        self.num_classes = None if state["num_classes"] is None else int(state["num_classes"])
        self.peak_velocity = float(state["peak_velocity"])
        self.raw_changes = [float(x) for x in state["raw_changes"]]
        self.froze_at = None if state["froze_at"] is None else int(state["froze_at"])
        self.losses = [float(x) for x in state["losses"]]
        self.first_loss = None if state["first_loss"] is None else float(state["first_loss"])
        self.chance_run = int(state["chance_run"])
