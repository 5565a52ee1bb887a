"""The metric keys NeVe reports. Ray Tune, Optuna and MLflow see exactly these keys.

Every key is flat (already joined with ``/``), so Ray Tune's result flattening leaves it unchanged and
MLflow accepts it as a metric name.
"""

from __future__ import annotations

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

#: Why a trial stopped ("converged", "diverged", "max_t", "pruned"): a result key in Ray, a tag in MLflow.
STOP_REASON = "neve/stop_reason"
#: The epoch at which a trial stopped (with STOP_REASON).
STOP_EPOCH = "neve/stop_epoch"


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
    "lr_key",
]
