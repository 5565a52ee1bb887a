"""LabelWave's stopping rule on the per-epoch flip fractions: moving average, running minimum, patience.

Two guards against firing on clean data, where the flip count also wobbles once it is small (measured in
``studies/overfitting/``: digits at 3-13 flips of 1,347; MNIST-1D at a constant learning rate, an unstable
phase where the loss and the flips rose together): the rise must exceed the counting noise
(``significance`` standard errors, a flip count varying like a Poisson count), and, when the training loss
is known, that loss must have fallen since the minimum. Memorising is fitting the wrong labels: the loss
falls while the predictions churn; a loss that rises with the flips is an unstable phase, not memorisation.

A warm-up guard keeps the minimum out of the first phase of a slow start: a network that still predicts one
or a few classes for everything flips few predictions, so the count dips there, rises as the network leaves
that phase, and a minimum kept from it made LabelWave fire on clean data (MNIST-1D at lr 0.005; the
``memorizing`` stop then restored weights of 0.23-0.27 test accuracy, 0.29-0.31 after its cooldown, where
the runs went on to 0.45-0.72). A minimum
counts only once the network has learned something (``learned``: the training loss removed that share of
the chance-level loss), and only from a window made of such epochs.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["Memorization", "WaveTracker"]


@dataclass(frozen=True)
class Memorization:
    """The settings of NeVe's memorisation watch (``NeVe(memorization=Memorization(...))``).

    Attributes:
        window: the moving average of the per-epoch flip fraction spans this many epochs (LabelWave's k).
        patience: the network has started to memorise once the smoothed flip fraction's minimum is this many
            epochs old (counted in epochs after the minimum) and the latest smoothed value rose above it
            (by ``significance``, with a falling training loss, see the module docstring).
        significance: the rise must exceed this many standard errors of the counting noise of the two
            smoothed values (``sqrt(sum flips) / (window * samples)`` each); 0 accepts any rise.
        restore_best_weights: when NeVe stops for memorisation, put the weights of the minimum back into
            the model (as Keras' ``EarlyStopping(restore_best_weights=True)``). Keeping them costs one copy
            of the model's parameters and buffers in CPU memory, refreshed at every new minimum. ``False``:
            no copy is kept and the model ends with its latest weights.
        anneal: after restoring, train a short cooldown from the restored weights before stopping: the
            learning rates fall linearly over ``max(3, ceil(t / 10))`` epochs (``t`` the epoch of the
            decision; :class:`~neve_tune.Anneal`'s rule, with ``NeVe(anneal=...)``'s settings when given).
            Measured on MNIST-1D with 20% flipped labels: the minimum's weights alone lie 0.8-4 points
            under the run's best test epoch (the constant-LR test curve is noisy); with the cooldown they
            reach it (``studies/overfitting/``). ``False``: stop at once with the restored weights.
        learned: the warm-up guard. A smoothed value counts as a minimum only once an epoch's training loss
            ``L`` has removed at least this share of the chance-level loss, ``1 - L / log(C) >= learned``
            (``C`` the number of classes of the observed outputs), and only when every epoch of its window
            comes from that epoch on. The default 0.1 is NeVe's "stuck at chance" level
            (:class:`~neve_tune.StopCriteria` ``chance_progress``): the guard opens once the network has left
            chance. Measured in ``studies/overfitting/``: at lr 0.005 on MNIST-1D it opens at epochs 4-7, as
            the predictions leave the one-class phase, and on the fast runs at epoch 2 (the first with flips
            to count), so their decisions are unchanged. ``0`` turns the guard off. Without a training
            loss (``step()`` with no loss) or a class count, the guard cannot be evaluated and stays open, as
            the falling-loss test.
            The loss must be the mean cross-entropy per sample (or token), as for NeVe's stalled test: a
            summed or otherwise scaled loss keeps the guard shut, and the watch then never decides.

    Example:
        >>> from neve_tune import Memorization
        >>> Memorization(patience=10, restore_best_weights=False)
        Memorization(window=3, patience=10, significance=2.0, restore_best_weights=False, anneal=True, learned=0.1)
    """

    window: int = 3
    patience: int = 5
    significance: float = 2.0
    restore_best_weights: bool = True
    anneal: bool = True
    learned: float = 0.1

    def __post_init__(self) -> None:
        for name in ("window", "patience"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Memorization {name} must be an integer >= 1, but got {name}={value!r}.")
        if isinstance(self.significance, bool) or not isinstance(self.significance, (int, float)):
            raise ValueError(f"Memorization significance must be a number >= 0, but got {self.significance!r}.")
        if not (math.isfinite(self.significance) and self.significance >= 0):
            raise ValueError(f"Memorization significance must be a number >= 0, but got {self.significance!r}.")
        if (
            isinstance(self.learned, bool)
            or not isinstance(self.learned, (int, float))
            or not (math.isfinite(self.learned) and 0 <= self.learned < 1)
        ):
            raise ValueError(
                f"Memorization learned must be a number in [0, 1) (a share of the chance-level loss), but got"
                f" {self.learned!r}; 0 turns the warm-up guard off."
            )
        for name in ("restore_best_weights", "anneal"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"Memorization {name} must be True or False, but got {getattr(self, name)!r}.")


class WaveTracker:
    """The smoothed flip fraction, its running minimum and its age: a pure state machine (no torch).

    :meth:`step` takes one epoch's flips and the number of samples compared (``observed``; 0 when there was
    nothing to compare, e.g. the first epoch), and the epoch's training loss and chance-level loss when known.
    Once ``window`` epochs are in, the mean of their fractions is the smoothed value; once the warm-up guard
    is open (``Memorization.learned``) and ``window`` epochs came since, a value at or below the minimum so
    far becomes the new minimum (a tie moves it later: a flat curve is not a rise).

    NaN policy: an epoch with nothing compared is missing (not counted; the window is kept). A NaN or
    missing training loss switches the loss test off for the windows it is in, and opens the warm-up guard
    (it cannot be evaluated).

    State: :meth:`state_dict` is JSON-able; :meth:`load_state_dict` restores it exactly.
    """

    def __init__(self, settings: Memorization) -> None:
        self.settings = settings
        # (fraction, its counting variance flips / observed^2, training loss or NaN) of the latest epochs
        self.recent: deque[tuple[float, float, float]] = deque(maxlen=settings.window)
        self.smoothed: float | None = None
        self.variance = 0.0  # of the smoothed value
        self.loss = math.nan  # mean training loss over the window
        self.best = math.inf
        self.best_variance = 0.0
        self.best_loss = math.nan
        self.best_epoch: int | None = None
        self.epoch = 0
        self.learned_epoch: int | None = None  # the epoch the warm-up guard opened
        self.since_learned = 0  # epochs counted since the guard opened (a minimum needs a whole window)

    def step(
        self,
        epoch: int,
        flips: float,
        observed: int,
        train_loss: float | None = None,
        chance_loss: float | None = None,
    ) -> bool:
        """Record epoch ``epoch``'s flips among ``observed`` samples; True when it sets a new minimum.

        ``chance_loss`` is the loss of a network at chance (``log C`` for a cross-entropy over ``C``
        classes), the reference of the warm-up guard.
        """
        self.epoch = epoch
        if observed <= 0:
            return False
        loss = math.nan if train_loss is None else float(train_loss)
        self.recent.append((flips / observed, flips / observed**2, loss))
        if self.learned_epoch is None and self._learned(loss, chance_loss):
            self.learned_epoch = epoch
        if self.learned_epoch is not None:
            self.since_learned += 1
        k = self.settings.window
        if len(self.recent) < k:
            return False
        self.smoothed = sum(r[0] for r in self.recent) / k
        self.variance = sum(r[1] for r in self.recent) / k**2
        self.loss = sum(r[2] for r in self.recent) / k
        if self.since_learned >= k and self.smoothed <= self.best:
            self.best, self.best_variance = self.smoothed, self.variance
            self.best_loss, self.best_epoch = self.loss, epoch
            return True
        return False

    def _learned(self, loss: float, chance_loss: float | None) -> bool:
        """Whether the warm-up guard opens at this epoch (see ``Memorization.learned``)."""
        learned = self.settings.learned
        if learned <= 0 or chance_loss is None or not chance_loss > 0 or not math.isfinite(loss):
            return True  # off, or cannot be evaluated
        return 1.0 - loss / chance_loss >= learned

    @property
    def memorizing(self) -> bool:
        """The minimum is ``patience`` epochs old, the smoothed value rose above it by more than the counting
        noise, and the training loss (when known at both) fell since."""
        if self.best_epoch is None or self.smoothed is None or self.epoch - self.best_epoch < self.settings.patience:
            return False
        noise = self.settings.significance * math.sqrt(self.variance + self.best_variance)
        if not self.smoothed - self.best > noise:
            return False
        return not self.loss >= self.best_loss  # NaN (a loss unknown at either end) passes

    def state_dict(self) -> dict[str, Any]:
        return {
            "settings": asdict(self.settings),
            "recent": [list(r) for r in self.recent],
            "smoothed": self.smoothed,
            "variance": self.variance,
            "loss": self.loss,
            "best": self.best,
            "best_variance": self.best_variance,
            "best_loss": self.best_loss,
            "best_epoch": self.best_epoch,
            "epoch": self.epoch,
            "learned_epoch": self.learned_epoch,
            "since_learned": self.since_learned,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.settings = Memorization(**state["settings"])
        self.recent = deque(
            ((float(f), float(v), float(loss)) for f, v, loss in state["recent"]), maxlen=self.settings.window
        )
        self.smoothed = None if state["smoothed"] is None else float(state["smoothed"])
        self.variance = float(state["variance"])
        self.loss = float(state["loss"])
        self.best = float(state["best"])
        self.best_variance = float(state["best_variance"])
        self.best_loss = float(state["best_loss"])
        self.best_epoch = None if state["best_epoch"] is None else int(state["best_epoch"])
        self.epoch = int(state["epoch"])
        self.learned_epoch = None if state["learned_epoch"] is None else int(state["learned_epoch"])
        self.since_learned = int(state["since_learned"])
