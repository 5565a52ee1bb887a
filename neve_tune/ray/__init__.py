"""NeVe for Ray Tune: a scheduler that stops trials on their own NeVe's decision, and helpers for trainables.

* :class:`NeVeScheduler` stops each trial on the decision its NeVe reports (``"converged"``,
  ``"stalled"``, ``"collapsed"``, ``"diverged"``), or at ``"max_t"``, and records why in the trial's last
  result (``neve_tune.keys.STOP_REASON`` / ``STOP_EPOCH``, read back with :meth:`StopInfo.from_metrics`);
  with ``base_scheduler=`` (Tune's own ``ASHAScheduler``/``HyperBandScheduler``, ranking a
  validation-free signal such as the training loss) the trials that base cuts stop as ``"pruned"``;
* :func:`report_epoch` / :func:`restore_from_checkpoint` report NeVe's metrics (``train_loss=`` steps NeVe
  with the epoch's training loss first) with a checkpoint of the model, optimizer and NeVe state, and
  resume from it with identical velocities and learning rates; :func:`save_training_state` /
  :func:`load_training_state` write and read that state in any directory;
* :func:`trial_device` picks the trial's device (its GPU when Ray gave it one).

Example:
    >>> from ray import tune
    >>> from neve_tune.ray import NeVeScheduler
    >>> tuner = tune.Tuner(  # doctest: +SKIP
    ...     train_fn,
    ...     tune_config=tune.TuneConfig(scheduler=NeVeScheduler(max_t=100), metric="loss", mode="min"),
    ... )
    >>> from ray.tune.schedulers import ASHAScheduler
    >>> scheduler = NeVeScheduler(  # NeVe inside each trial, ASHA across trials on the training loss
    ...     max_t=100, grace_period=3,
    ...     base_scheduler=ASHAScheduler(metric="train_loss", mode="min", max_t=100, grace_period=3),
    ... )
"""

from __future__ import annotations

try:
    import ray.tune  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised only without ray installed
    raise ImportError(
        "ray was not found - please install with `pip install neve_tune[ray]` (it needs `ray[tune]`)."
    ) from err

from ._composite import StopInfo
from ._scheduler import NeVeScheduler
from ._trainable import load_training_state, report_epoch, restore_from_checkpoint, save_training_state, trial_device

__all__ = [
    "NeVeScheduler",
    "StopInfo",
    "load_training_state",
    "report_epoch",
    "restore_from_checkpoint",
    "save_training_state",
    "trial_device",
]
