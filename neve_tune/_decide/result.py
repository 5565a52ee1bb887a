"""What one epoch measured and decided: :class:`~neve_tune.StepResult`, and the flat metrics built from it.

One result type for one concept: the rule (:class:`~neve_tune.NeVeRule`) returns it, the controller
(:class:`~neve_tune.NeVe`) adds the per-layer velocities and returns it, and :func:`flat_metrics` is the one
builder of the flat metrics dict every integration reports (``NeVe.metrics()``, ``StepResult.metrics()``).
Standard library only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .. import keys
from ..keys import StopReason


@dataclass(frozen=True)
class StepResult:
    """What one epoch's step measured and decided (returned by :meth:`NeVe.step` and :meth:`NeVeRule.step`).

    Attributes:
        epoch: the number of steps so far (1 after the first epoch).
        model_velocity: V (NaN/inf when the model diverged); ``None`` only for a re-baseline step,
            which happens after a measurement failed half-way (no decision is taken then).
        velocity_change: D, ``None`` at the first epoch (and on a re-baseline step).
        lr_decayed: whether this step lowered at least one learning rate.
        lrs: the learning rates after this step, one per param group.
        stop_reason: ``StopReason.CONVERGED``, ``STALLED``, ``COLLAPSED``, ``MEMORIZING``, ``DIVERGED`` or
            ``None``.
        layer_velocity: module name -> mean ``|v_i|`` over its neurons (empty from the rule alone).
        num_decays: how many LR decays happened up to and including this step.
        train_loss: the training loss of this epoch, ``None`` when none was passed.
        detail: why, in words, for a stalled/collapsed/diverged decision ("" otherwise).
        stop_threshold: the ``stop_threshold`` behind the decision (reported in the metrics).
        min_epochs: the warm-up behind the decision (reported in the metrics).
        annealing: whether an anneal-on-convergence cooldown (``anneal=Anneal(...)``) is under way.
        flip_fraction: the share of observed training samples whose prediction changed since the previous
            epoch (``NeVe.observe``), ``None`` when nothing was compared.
        flip_fraction_smoothed: its moving average (``None`` until ``Memorization.window`` epochs are in).
        flip_min_epoch: the epoch of the smoothed flip fraction's minimum.
        restored_epoch: the epoch whose weights this step put back into the model (on ``memorizing``).
    """

    epoch: int
    model_velocity: float | None
    velocity_change: float | None
    lr_decayed: bool
    lrs: list[float]
    stop_reason: StopReason | None
    layer_velocity: dict[str, float] = field(default_factory=dict, repr=False)
    num_decays: int = 0
    train_loss: float | None = None
    detail: str = ""
    stop_threshold: float = 1e-3
    min_epochs: int = 0
    annealing: bool = False
    flip_fraction: float | None = None
    flip_fraction_smoothed: float | None = None
    flip_min_epoch: int | None = None
    restored_epoch: int | None = None

    @property
    def converged(self) -> bool:
        """True when the network moved, learned and stopped moving (a success)."""
        return self.stop_reason is StopReason.CONVERGED

    @property
    def stalled(self) -> bool:
        """True when it stopped moving (or thrashes at chance) without having learned."""
        return self.stop_reason is StopReason.STALLED

    @property
    def collapsed(self) -> bool:
        """True when its aux responses froze abruptly (dead units)."""
        return self.stop_reason is StopReason.COLLAPSED

    @property
    def diverged(self) -> bool:
        """True when V, D or the training loss was not finite."""
        return self.stop_reason is StopReason.DIVERGED

    @property
    def memorizing(self) -> bool:
        """True when the network started to memorise its training labels (a success: the minimum's weights)."""
        return self.stop_reason is StopReason.MEMORIZING

    @property
    def should_stop(self) -> bool:
        """True when training should end here (converged, stalled, collapsed, memorizing or diverged)."""
        return self.stop_reason is not None

    def metrics(self) -> dict[str, float]:
        """This step as a flat dict of plain floats: what :meth:`NeVe.metrics` returned right after it."""
        return flat_metrics(self.epoch, self.lrs, self.num_decays, self, self.stop_threshold, self.min_epochs)

    @property
    def message(self) -> str:
        """A one-line, human explanation of the decision."""
        if self.model_velocity is None:
            return f"epoch {self.epoch}: the previous measurement failed half-way; took a fresh baseline."
        if self.diverged and self.detail:
            return f"epoch {self.epoch}: diverged: {self.detail}. Lower the learning rate or check the loss."
        if self.diverged:
            return (
                f"epoch {self.epoch}: diverged: model velocity {self.model_velocity}, velocity change"
                f" {self.velocity_change}. The aux set produced NaN/inf activations (a NaN loss or exploding"
                " weights); lower the learning rate or check the loss."
            )
        head = f"epoch {self.epoch}: V={self.model_velocity:.3g}" + (
            "" if self.velocity_change is None else f", D={self.velocity_change:.3g}"
        )
        if self.converged:
            return f"{head}: converged (velocity under the stop threshold); stop training."
        if self.stalled:
            return f"{head}: stalled ({self.detail}); stop training: it is not learning (check the learning rate)."
        if self.collapsed:
            return f"{head}: collapsed ({self.detail}); stop training: lower the learning rate."
        if self.memorizing or self.restored_epoch is not None:
            return _memorizing_message(self, head)
        if self.annealing:
            return f"{head}: annealing after convergence; learning rate {self.lrs}."
        if self.lr_decayed:
            return f"{head}: velocity change plateaued; learning rate decayed to {self.lrs}."
        return head


def _memorizing_message(result: StepResult, head: str) -> str:
    kept = "" if result.restored_epoch is None else f"; the weights of epoch {result.restored_epoch} are back"
    what = f"{head}: memorizing (the training-pass flip count rose after its minimum at epoch {result.flip_min_epoch})"
    if result.memorizing:
        return f"{what}{kept}; stop training."
    return f"{what}{kept}; annealing the learning rate to {result.lrs} before stopping."


def flat_metrics(
    epoch: int,
    lrs: Sequence[float],
    num_decays: int,
    last: StepResult | None,
    stop_threshold: float,
    min_epochs: int,
) -> dict[str, float]:
    """The one builder of NeVe's flat metrics (``NeVe.metrics()``, ``StepResult.metrics()``)."""
    out: dict[str, float] = {keys.EPOCH: float(epoch)}
    if last is not None and last.model_velocity is not None:
        out[keys.MODEL_VELOCITY] = float(last.model_velocity)
    if last is not None and last.velocity_change is not None:
        out[keys.VELOCITY_CHANGE] = float(last.velocity_change)
    if last is not None and last.train_loss is not None:
        out[keys.TRAIN_LOSS] = float(last.train_loss)
    out[keys.LR] = float(lrs[0])
    if len(lrs) > 1:
        for i, lr in enumerate(lrs):
            out[keys.lr_key(i)] = float(lr)
    out[keys.LR_DECAYED] = float(bool(last and last.lr_decayed))
    out[keys.NUM_DECAYS] = float(num_decays)
    reason = None if last is None else last.stop_reason
    for flag_reason, flag in keys.DECISION_FLAGS.items():
        out[flag] = float(reason is flag_reason)
    out[keys.STOP_THRESHOLD] = float(stop_threshold)
    out[keys.MIN_EPOCHS] = float(min_epochs)
    if last is not None:
        for key, value in (
            (keys.FLIP_FRACTION, last.flip_fraction),
            (keys.FLIP_FRACTION_SMOOTHED, last.flip_fraction_smoothed),
            (keys.FLIP_MIN_EPOCH, last.flip_min_epoch),
        ):
            if value is not None:
                out[key] = float(value)
    return out


__all__ = ["StepResult", "flat_metrics"]
