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
#: 1.0 when V fell under ``stop_threshold`` at this step (the trial converged), else 0.0.
CONVERGED = "neve/converged"
#: 1.0 when V or D was not finite at this step (the trial diverged), else 0.0.
DIVERGED = "neve/diverged"

#: Why a trial stopped (a :class:`StopReason` value): a result key in Ray, a tag in MLflow.
STOP_REASON = "neve/stop_reason"
#: The epoch at which a trial stopped (with STOP_REASON).
STOP_EPOCH = "neve/stop_epoch"


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


def lr_key(group: int) -> str:
    """The metric key of param group ``group``'s learning rate when an optimizer has several groups."""
    return f"{LR}_{group}"


__all__ = [
    "CONVERGED",
    "DIVERGED",
    "EPOCH",
    "LR",
    "LR_DECAYED",
    "MODEL_VELOCITY",
    "NUM_DECAYS",
    "PREFIX",
    "STOP_EPOCH",
    "STOP_REASON",
    "VELOCITY_CHANGE",
    "StopReason",
    "lr_key",
]
