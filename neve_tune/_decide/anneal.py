"""Anneal on convergence: an opt-in end of a NeVe trial that finishes the job a schedule would.

The paper's rule ends a trial the first time the model velocity falls under ``stop_threshold``. Its
plateau decay rarely fires before that, so the trial often ends at its initial learning rate, where a
schedule (cosine, step) would still anneal and gain. With :class:`Anneal`, that first convergence
starts a **cooldown** instead: the learning rates fall over ``L = max(min_length, ceil(fraction * t))``
more epochs (``t`` the epoch of the convergence), linearly (default), along a half cosine, or in one
step, and the trial then ends as converged. This is the decay phase of a warmup-stable-decay schedule
(Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations"), with
NeVe choosing when the stable phase is over. With ``max_epochs`` (the loop's epoch cap) a trial that has
not converged starts a cooldown of ``max(min_length, ceil(cap_fraction * max_epochs))`` epochs in time to
finish it at the cap, so it also ends annealed (the loop then stops it at its cap, not as converged).
The two lengths differ on purpose: a converged network has settled at its LR and a short decay collects
the gain, while one still moving at the cap needs the longer decay of a schedule (measured in
``studies/ranking_signals.md``).

:class:`Annealer` is the pure state machine (no torch), stepped by :class:`neve_tune.NeVeRule`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

AnnealShape = Literal["linear", "cosine", "step"]

__all__ = ["Anneal", "AnnealShape", "Annealer"]


@dataclass(frozen=True)
class Anneal:
    """The settings of anneal-on-convergence (see the module docstring).

    Attributes:
        fraction: the cooldown lasts ``ceil(fraction * t)`` epochs after a convergence at epoch ``t``
            (the WSD literature's 10-20% of the run; 0.1 and 0.25 measured in
            ``studies/ranking_signals.md``: the same accuracy, 0.1 for 4-8% fewer epochs).
        cap_fraction: the cooldown of a trial that reaches the cap unconverged lasts
            ``ceil(cap_fraction * max_epochs)`` epochs (20% of the run, a schedule's decay phase).
        min_length: a cooldown lasts at least this many epochs.
        shape: the LR multiplier over the ``L`` cooldown epochs ``j = 1..L``: ``"linear"``
            ``1 - j / (L + 1)``, ``"cosine"`` ``(1 + cos(pi j / (L + 1))) / 2``, or ``"step"``
            ``step_factor`` throughout.
        step_factor: the multiplier of the ``"step"`` shape, in ``(0, 1)``.
        max_epochs: the loop's epoch cap, when known: a trial that has not converged by epoch
            ``t = max_epochs - max(min_length, ceil(cap_fraction * max_epochs))`` starts a cooldown of the
            remaining epochs, so it ends annealed at the cap. ``None``: only a convergence starts one.

    Example:
        >>> from neve_tune import NeVeRule, Anneal
        >>> rule = NeVeRule(min_epochs=0, anneal=Anneal())  # a cooldown of max(3, ceil(t / 10)) epochs
        >>> [rule.step(v, 0.0, [1.0]).lrs for v in (0.5, 0.2, 1e-4)][-1]  # converged at epoch 3: cooldown
        (0.75,)
        >>> [rule.step(1e-4, 0.0, [lr]).lrs for lr in (0.75, 0.5)]
        [(0.5,), (0.25,)]
        >>> rule.step(1e-4, 0.0, [0.25]).stop_reason  # the cooldown's 3rd and last epoch
        <StopReason.CONVERGED: 'converged'>
    """

    fraction: float = 0.1
    cap_fraction: float = 0.2
    min_length: int = 3
    shape: AnnealShape = "linear"
    step_factor: float = 0.1
    max_epochs: int | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.fraction, (int, float)) and math.isfinite(self.fraction) and self.fraction >= 0):
            raise ValueError(f"Anneal fraction must be a finite number >= 0, but got fraction={self.fraction!r}.")
        if not (isinstance(self.cap_fraction, (int, float)) and 0 <= self.cap_fraction < 1):
            raise ValueError(f"Anneal cap_fraction must be in [0, 1), but got cap_fraction={self.cap_fraction!r}.")
        if isinstance(self.min_length, bool) or not isinstance(self.min_length, int) or self.min_length < 1:
            raise ValueError(f"Anneal min_length must be an integer >= 1, but got min_length={self.min_length!r}.")
        if self.shape not in ("linear", "cosine", "step"):
            raise ValueError(f"Anneal shape must be 'linear', 'cosine' or 'step', but got shape={self.shape!r}.")
        if not 0.0 < self.step_factor < 1.0:
            raise ValueError(f"Anneal step_factor must be in (0, 1), but got step_factor={self.step_factor!r}.")
        if self.max_epochs is not None and (
            isinstance(self.max_epochs, bool) or not isinstance(self.max_epochs, int) or self.max_epochs < 1
        ):
            raise ValueError(f"Anneal max_epochs must be None or an integer >= 1, but got {self.max_epochs!r}.")

    def length(self, epoch: int) -> int:
        """The cooldown length for a convergence at ``epoch``."""
        return max(self.min_length, math.ceil(self.fraction * epoch))

    def cap_length(self) -> int | None:
        """The cooldown length of a trial annealed into the cap (``None`` without ``max_epochs``)."""
        if self.max_epochs is None:
            return None
        return max(self.min_length, math.ceil(self.cap_fraction * self.max_epochs))

    def multiplier(self, j: int, length: int) -> float:
        """The LR multiplier of cooldown epoch ``j`` (1-based) of ``length``."""
        if self.shape == "step":
            return self.step_factor
        x = j / (length + 1)
        return 1.0 - x if self.shape == "linear" else 0.5 * (1.0 + math.cos(math.pi * x))


class Annealer:
    """The cooldown's state: when it started, how long it lasts, the LRs it scales, and why it started.

    State: :meth:`state_dict` is JSON-able (settings and counters); :meth:`load_state_dict` restores it.
    """

    def __init__(self, settings: Anneal) -> None:
        self.settings = settings
        self.start: int | None = None  # the epoch whose decision started the cooldown
        self.length = 0
        self.base_lrs: tuple[float, ...] = ()
        self.by_cap = False

    @property
    def cooling(self) -> bool:
        """Whether a cooldown is under way."""
        return self.start is not None

    def should_start(self, epoch: int, converged: bool) -> bool:
        """Whether this epoch's decision starts a cooldown (a first convergence, or the cap coming)."""
        if self.cooling:
            return False
        cap, cap_length = self.settings.max_epochs, self.settings.cap_length()
        return converged or (cap is not None and cap_length is not None and epoch < cap and epoch + cap_length >= cap)

    def begin(self, epoch: int, lrs: Sequence[float], converged: bool) -> bool:
        """Start the cooldown at ``epoch``; False when no epoch is left for one (then stop as decided)."""
        cap = self.settings.max_epochs
        length = self.settings.length(epoch) if converged else (self.settings.cap_length() or 0)
        if cap is not None:
            length = min(length, cap - epoch)
        if length < 1:
            return False
        self.start, self.length, self.base_lrs, self.by_cap = epoch, length, tuple(lrs), not converged
        return True

    def lrs(self, epoch: int, floors: Sequence[float]) -> tuple[float, ...]:
        """The LRs to train the epoch after ``epoch`` with (cooldown epoch ``epoch - start + 1``)."""
        assert self.start is not None
        m = self.settings.multiplier(epoch - self.start + 1, self.length)
        return tuple(max(lr * m, floor) for lr, floor in zip(self.base_lrs, floors, strict=True))

    def done(self, epoch: int) -> bool:
        """Whether ``epoch`` was the cooldown's last."""
        return self.start is not None and epoch - self.start >= self.length

    def state_dict(self) -> dict[str, Any]:
        return {
            "settings": asdict(self.settings),
            "start": self.start,
            "length": self.length,
            "base_lrs": list(self.base_lrs),
            "by_cap": self.by_cap,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.settings = Anneal(**state["settings"])
        self.start = None if state["start"] is None else int(state["start"])
        self.length = int(state["length"])
        self.base_lrs = tuple(float(x) for x in state["base_lrs"])
        self.by_cap = bool(state["by_cap"])
