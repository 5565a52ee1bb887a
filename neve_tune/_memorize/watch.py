"""The memorisation watch: flips counted in the training pass, LabelWave's rule, the weights at its minimum."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .flips import FlipCounter
from .predictions import NoClassOutput, as_indices, class_predictions, num_classes
from .wave import Memorization, WaveTracker

__all__ = ["MemorizationWatch", "WatchStep"]


@dataclass(frozen=True)
class WatchStep:
    """What the watch saw at one epoch's end.

    Attributes:
        flips: samples whose prediction changed since the previous epoch (``None``: nothing to compare).
        fraction: ``flips`` over the samples observed in both epochs.
        smoothed: the moving average of ``fraction`` (``None`` until ``window`` epochs are in).
        best_epoch: the epoch of the smoothed value's minimum so far (``None`` before the first).
        memorizing: the minimum is ``patience`` epochs old and the smoothed value rose above it.
    """

    flips: float | None
    fraction: float | None
    smoothed: float | None
    best_epoch: int | None
    memorizing: bool


class MemorizationWatch:
    """Counts flips from the batches it is shown and says when the network has started to memorise.

    :meth:`observe` is called once per training batch with the model's outputs of the forward that trains
    on it and the batch's dataset indices; :meth:`end_epoch` once per epoch. With
    ``restore_best_weights`` it keeps a CPU copy of the model's ``state_dict()`` (parameters and buffers)
    from the end of the epoch that set the smoothed minimum, and :meth:`restore` loads it back.

    A model with no class output (a regression head ``(N, 1)``, integer outputs) gives no signal: the first
    such batch warns once, and the watch then ignores every batch (it never decides memorisation).

    NaN policy: NaN logits give some argmax (PyTorch's), counted like any prediction; a diverged run is
    stopped by the velocity rule, not here.

    State: :meth:`state_dict` holds the prediction tables, the tracker and the kept weights (tensors, for
    ``torch.save``); :meth:`load_state_dict` restores them.
    """

    def __init__(self, model: nn.Module, settings: Memorization) -> None:
        if not isinstance(settings, Memorization):
            raise TypeError(
                f"memorization must be a neve_tune.Memorization or None, but got {settings!r}: pass"
                " memorization=None to turn the memorisation watch off, or neve_tune.Memorization(...) (the"
                " default, Memorization(), is on)."
            )
        self.model = model
        self.settings = settings
        self.counter = FlipCounter()
        self.tracker = WaveTracker(settings)
        self.best_state: dict[str, Tensor] | None = None
        self.no_class_output: str | None = None  # why the outputs give no signal, once seen
        self.classes: int | None = None  # of the observed outputs: the warm-up guard's chance level log C
        self.frozen = False  # after a decision: flips are still counted, the minimum and kept weights stay
        self._observed = False  # a batch was observed since the last end_epoch
        self._warned: set[str] = set()  # the misuse warnings already given (each once)

    @property
    def active(self) -> bool:
        """Whether batches were observed (and hold class scores): the watch then decides."""
        return self.no_class_output is None and self.counter.tokens is not None

    def observe(self, outputs: Any, indices: Any) -> None:
        """Store one training batch's predictions under its samples' dataset indices (see the class docstring)."""
        if self.no_class_output is not None:
            return
        try:
            predictions = class_predictions(outputs)
        except NoClassOutput as err:
            self.no_class_output = str(err)
            warnings.warn(
                f"NeVe.observe(): {err}; there is no memorisation signal for this model, so NeVe will not stop"
                " for memorization (its velocity rule is unchanged). Stop calling observe() to silence this.",
                stacklevel=3,
            )
            return
        self.counter.add(predictions, as_indices(indices, predictions.shape[0]))
        self.classes = num_classes(outputs)
        self._observed = True
        if not self.model.training:
            self._warn_once(
                "eval",
                "NeVe.observe() was called while the model is in eval mode: the memorisation signal is the"
                " predictions of the forward that trains on each batch (in train mode); predictions read in eval"
                " mode (a pass over the training set after the epoch, a validation loop) only fall, and NeVe"
                " never stops for memorization on them. Call observe(outputs, indices) right after the training"
                " forward, before model.eval().",
            )

    def end_epoch(self, epoch: int, train_loss: float | None = None) -> WatchStep:
        """Close epoch ``epoch``: count its flips, smooth them, and keep the weights at a new minimum.

        ``train_loss`` (the epoch's training loss, when known) enables the falling-loss test of
        :class:`WaveTracker` and its warm-up guard (against the chance-level loss ``log C``, ``C`` the number
        of classes of the observed outputs). Once :attr:`frozen` (NeVe decided), only the flips are counted.
        """
        flips = self.counter.end_epoch() if self._observed else None
        repeats = self.counter.repeats if self._observed else None
        if self._observed and flips is None and self.counter.epochs >= 2:
            self._warn_once(
                "disjoint",
                f"NeVe.observe() saw no sample in step {epoch} that it saw in the step before, so there is no flip"
                " to count: the memorisation watch compares each sample's prediction from one epoch to the next,"
                " so NeVe must step once per epoch (not every N batches, e.g. NeVeCallback(every_n_steps=None)),"
                " and each sample keep its dataset index.",
            )
        self._observed = False
        if repeats is not None and repeats[0] > 2 * repeats[1]:
            self._warn_once(
                "repeats",
                f"NeVe.observe() was given {repeats[0]} samples in epoch {epoch} but only {repeats[1]} distinct"
                " indices: each index came about"
                f" {repeats[0] / repeats[1]:.0f} times. They look like positions within the batch (0..B-1), not"
                " dataset indices, so the flip count compares unrelated samples. Pass each sample's index in the"
                " training set, the same in every epoch (e.g. a Dataset that returns (x, y, index)).",
            )
        fraction = None if flips is None else flips.fraction
        t = self.tracker
        if self.frozen:
            return WatchStep(None if flips is None else flips.flips, fraction, t.smoothed, t.best_epoch, False)
        chance = math.log(self.classes) if self.classes else None
        new_min = flips is not None and t.step(epoch, flips.flips, flips.observed, train_loss, chance)
        if flips is None:
            t.epoch = epoch
        if new_min and self.settings.restore_best_weights:
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        return WatchStep(
            None if flips is None else flips.flips, fraction, t.smoothed, t.best_epoch, self.active and t.memorizing
        )

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, UserWarning, stacklevel=4)

    def restore(self) -> bool:
        """Load the kept weights of the minimum into the model; False when none are kept."""
        if self.best_state is None:
            return False
        self.model.load_state_dict(self.best_state)
        return True

    def state_dict(self) -> dict[str, Any]:
        return {
            "counter": self.counter.state_dict(),
            "tracker": self.tracker.state_dict(),
            "best_state": None if self.best_state is None else {k: v.clone() for k, v in self.best_state.items()},
            "no_class_output": self.no_class_output,
            "classes": self.classes,
            "frozen": self.frozen,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counter.load_state_dict(state["counter"])
        self.tracker.load_state_dict(state["tracker"])
        self.settings = self.tracker.settings
        best = state["best_state"]
        self.best_state = None if best is None else {k: torch.as_tensor(v).clone() for k, v in best.items()}
        self.no_class_output = state["no_class_output"]
        self.classes = None if state["classes"] is None else int(state["classes"])
        self.frozen = bool(state["frozen"])
        self._observed = False
