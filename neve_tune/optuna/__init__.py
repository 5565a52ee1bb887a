"""NeVe for Optuna: a pruner where converged trials COMPLETE and diverged, stalled, collapsed ones are PRUNED.

* :class:`NeVePruner` — an ``optuna.pruners.BasePruner``; optionally wraps another pruner
  (``wrapped_pruner``, alias ``base_pruner``), e.g. Optuna's
  ``SuccessiveHalvingPruner`` or ``HyperbandPruner`` ranking a validation-free signal (the training loss
  the objective reports), whose cuts end ``PRUNED`` with ``neve_stop_reason="pruned"``.
* :func:`report_epoch` — the one call per epoch in the objective: reports, stores NeVe's metrics in the
  trial's user attributes, and says whether to stop (raising ``optuna.TrialPruned`` when the trial's NeVe
  says diverged, stalled or collapsed, or on a pruner's rejection); ``train_loss=`` steps NeVe with the
  epoch's training loss first.
* :class:`NeVeMLflowCallback` — a study callback that logs every trial, with every epoch's NeVe
  metrics, to MLflow.

Trial user attributes written (see :mod:`neve_tune.optuna._attrs` for the encoding): ``"neve"`` (the
latest step's metrics), ``"neve_history"`` (all steps), ``"neve_stop_reason"`` (a
:class:`neve_tune.StopReason` value) and ``"neve_stop_epoch"``.

Example:
    >>> import optuna
    >>> from neve_tune.optuna import NeVePruner
    >>> study = optuna.create_study(direction="maximize", pruner=NeVePruner())
    >>> halving = NeVePruner(optuna.pruners.SuccessiveHalvingPruner(reduction_factor=3))
    >>> study = optuna.create_study(direction="minimize", pruner=halving)  # report the training loss
"""

from __future__ import annotations

try:
    import optuna as _optuna  # noqa: F401
except ImportError as _err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "optuna was not found - please install with `pip install neve_tune[optuna]` (or `pip install optuna`)."
    ) from _err

from neve_tune.optuna._mlflow import NeVeMLflowCallback
from neve_tune.optuna._pruner import NeVePruner
from neve_tune.optuna._report import report_epoch

__all__ = ["NeVeMLflowCallback", "NeVePruner", "report_epoch"]
