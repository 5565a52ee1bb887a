"""The result and metric keys of a study trial, and the stop reasons only studies use. Declared once here.

NeVe's own keys (``neve/model_velocity``, ...) and the stop reasons a trial gives itself (``converged``,
``diverged``, ``max_t``, ``pruned``) come from :mod:`neve_tune.keys`; this module adds what the study loop
reports besides them.
"""

from __future__ import annotations

from neve_tune.keys import StopReason

#: The epoch just completed (1 after the first epoch).
EPOCH = "epoch"
#: Ray Tune's own iteration counter (read when a result has no ``epoch``).
TRAINING_ITERATION = "training_iteration"
#: Mean loss and accuracy over the epoch's training minibatches.
TRAIN_LOSS, TRAIN_ACC = "train/loss", "train/acc"
#: Training-speed estimates of the trial so far, from the epochs' mean training losses ``L_1..L_t``
#: (validation-free; ``studies/ranking_signals.md`` measures how they rank trials): TSE, the sum of
#: the losses (Lyle et al. 2020), and TSE-EMA, ``sum_s TSE_EMA_GAMMA^(t-s) L_s`` (Ru et al. 2021), which
#: weights the latest epochs most. The ``neve`` arm prunes and picks on TSE-EMA.
TRAIN_TSE, TRAIN_TSE_EMA = "train/tse", "train/tse_ema"
TSE_EMA_GAMMA = 0.9
#: Loss and accuracy on the held-out validation split (baseline arms only).
VAL_LOSS, VAL_ACC = "val/loss", "val/acc"
#: Loss and accuracy on the test split (reported only, never used for a decision).
TEST_LOSS, TEST_ACC = "test/loss", "test/acc"
#: The learning rate of param group 0 after the epoch.
LR = "lr"
#: Wall time of the epoch (training, measurement, evaluation).
EPOCH_TIME = "time/epoch_s"
#: Velocity measured but not acted on (fixed-schedule arms).
MONITOR_VELOCITY, MONITOR_CHANGE = "monitor/model_velocity", "monitor/velocity_change"
#: Prefix of the per-layer velocity metrics logged to MLflow (``layer_velocity/<module name>``).
LAYER_VELOCITY_PREFIX = "layer_velocity/"
#: Only in a trial's final result: why it ended by itself (a :class:`~neve_tune.keys.StopReason` value).
#: A study's own result key: ``neve_tune.ray.report_epoch`` keeps the ``neve/`` prefix for NeVe's metrics.
STOP_REASON = "stop_reason"

#: Stop reason of a trial that raised.
ERROR = "error"
#: Stop reason of a trial its backend stopped, in an arm that does not prune (e.g. Ctrl-C).
STOPPED = "stopped"

CONVERGED = StopReason.CONVERGED.value
STALLED = StopReason.STALLED.value
COLLAPSED = StopReason.COLLAPSED.value
DIVERGED = StopReason.DIVERGED.value
MAX_T = StopReason.MAX_T.value
PRUNED = StopReason.PRUNED.value
MEMORIZING = StopReason.MEMORIZING.value

__all__ = [
    "COLLAPSED",
    "CONVERGED",
    "DIVERGED",
    "EPOCH",
    "EPOCH_TIME",
    "ERROR",
    "LAYER_VELOCITY_PREFIX",
    "LR",
    "MAX_T",
    "MEMORIZING",
    "MONITOR_CHANGE",
    "MONITOR_VELOCITY",
    "PRUNED",
    "STALLED",
    "STOPPED",
    "STOP_REASON",
    "TEST_ACC",
    "TEST_LOSS",
    "TRAINING_ITERATION",
    "TRAIN_ACC",
    "TRAIN_LOSS",
    "TRAIN_TSE",
    "TRAIN_TSE_EMA",
    "TSE_EMA_GAMMA",
    "VAL_ACC",
    "VAL_LOSS",
]
