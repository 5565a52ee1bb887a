"""The metric keys NeVe reports and the words for why a trial stopped. Every integration uses these.

Every key is flat (already joined with ``/``), so Ray Tune's result flattening leaves it unchanged and
MLflow accepts it as a metric name. :class:`StopReason` is the one spelling of a stop reason: the value
of the Ray result key :data:`STOP_REASON`, of the MLflow tag of the same name, of Optuna's
``neve_stop_reason`` user attribute and of the study tables.
"""

from __future__ import annotations

import enum

PREFIX = "neve/"

#: Number of completed NeVe steps (= training epochs measured), 1 after the first epoch.
EPOCH = "neve/epoch"
#: Model velocity V: the mean over all hooked neurons of |v_i|.
MODEL_VELOCITY = "neve/model_velocity"
#: Velocity change D: mean over modules of the mean squared change of v. Absent at the first epoch.
VELOCITY_CHANGE = "neve/velocity_change"
#: The learning rate of param group 0 after this step (``neve/lr_<i>`` for group i when there are several).
LR = "neve/lr"
#: 1.0 when this step decayed at least one learning rate, else 0.0.
LR_DECAYED = "neve/lr_decayed"
#: How many LR decays happened so far.
NUM_DECAYS = "neve/num_decays"
#: 1.0 when the trial's own NeVe decided at this step that it converged, else 0.0.
CONVERGED = "neve/converged"
#: 1.0 when V, D or the training loss was not finite at this step (the trial diverged), else 0.0.
DIVERGED = "neve/diverged"
#: 1.0 when the trial's NeVe decided at this step that it stalled (stopped moving without learning).
STALLED = "neve/stalled"
#: 1.0 when the trial's NeVe decided at this step that it collapsed (its aux responses froze: dead units).
COLLAPSED = "neve/collapsed"
#: 1.0 when the trial's NeVe decided at this step that the network started to memorise its training labels.
MEMORIZING = "neve/memorizing"
#: The share of observed training samples whose predicted class changed since the previous epoch
#: (``NeVe.observe``; absent when nothing was observed).
FLIP_FRACTION = "neve/flip_fraction"
#: That share's moving average over ``Memorization.window`` epochs (absent until the window is full).
FLIP_FRACTION_SMOOTHED = "neve/flip_fraction_smoothed"
#: The epoch of the smoothed flip fraction's minimum so far: the weights NeVe restores on ``memorizing``.
FLIP_MIN_EPOCH = "neve/flip_min_epoch"
#: The training loss passed to ``NeVe.step(train_loss)`` at this step (absent when none was passed).
TRAIN_LOSS = "neve/train_loss"
#: The trial's own ``stop_threshold`` (so a scheduler or pruner can check it agrees).
STOP_THRESHOLD = "neve/stop_threshold"
#: The trial's own ``min_epochs`` warm-up.
MIN_EPOCHS = "neve/min_epochs"

#: Why a trial stopped (a :class:`StopReason` value): a result key in Ray, a tag in MLflow.
STOP_REASON = "neve/stop_reason"
#: The epoch at which a trial stopped (with STOP_REASON).
STOP_EPOCH = "neve/stop_epoch"


class StopReason(str, enum.Enum):
    """Why a trial stopped. The value is the plain string that tags, attributes and results carry."""

    CONVERGED = "converged"
    """The network moved, learned, and stopped moving: V under ``stop_threshold`` after the warm-up."""
    STALLED = "stalled"
    """It stopped moving (or thrashes at chance) without having learned, e.g. an LR far too small."""
    COLLAPSED = "collapsed"
    """Its aux responses froze abruptly (dead or constant units, e.g. every ReLU dead)."""
    MEMORIZING = "memorizing"
    """The network started to memorise its training labels: the training-pass flip count rose after its
    minimum (``NeVe.observe``). A success: NeVe puts the minimum's weights back (``Memorization``)."""
    DIVERGED = "diverged"
    """The model velocity, the velocity change or the training loss was NaN or infinite."""
    MAX_T = "max_t"
    """The trial reached the epoch/iteration cap of its scheduler."""
    PRUNED = "pruned"
    """A cross-trial ranking or a wrapped pruner (e.g. Optuna's MedianPruner) rejected the trial."""

    @property
    def is_failure(self) -> bool:
        """True for the reasons that end a trial as a failure (Ray STOP, Optuna PRUNED, never picked)."""
        return self in _FAILURES

    def __str__(self) -> str:
        return self.value


_FAILURES = frozenset((StopReason.STALLED, StopReason.COLLAPSED, StopReason.DIVERGED, StopReason.PRUNED))

#: The reasons a trial's own NeVe decides, with the flag key that reports each one.
DECISION_FLAGS: dict[StopReason, str] = {
    StopReason.DIVERGED: DIVERGED,
    StopReason.COLLAPSED: COLLAPSED,
    StopReason.STALLED: STALLED,
    StopReason.MEMORIZING: MEMORIZING,
    StopReason.CONVERGED: CONVERGED,
}


def lr_key(group: int) -> str:
    """The metric key of param group ``group``'s learning rate when an optimizer has several groups."""
    return f"{LR}_{group}"


__all__ = [
    "COLLAPSED",
    "CONVERGED",
    "DECISION_FLAGS",
    "DIVERGED",
    "EPOCH",
    "FLIP_FRACTION",
    "FLIP_FRACTION_SMOOTHED",
    "FLIP_MIN_EPOCH",
    "LR",
    "LR_DECAYED",
    "MEMORIZING",
    "MIN_EPOCHS",
    "MODEL_VELOCITY",
    "NUM_DECAYS",
    "PREFIX",
    "STALLED",
    "STOP_EPOCH",
    "STOP_REASON",
    "STOP_THRESHOLD",
    "TRAIN_LOSS",
    "VELOCITY_CHANGE",
    "StopReason",
    "lr_key",
]
