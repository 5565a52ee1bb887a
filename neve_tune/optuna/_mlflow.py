from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import TrialState

from neve_tune import keys
from neve_tune.optuna._attrs import HISTORY_ATTR, STEP_KEY, STOP_EPOCH_ATTR, STOP_REASON_ATTR, VALUE_KEY, decode

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

#: MLflow metric of the value passed to ``trial.report`` at each epoch.
INTERMEDIATE_METRIC = "optuna/intermediate_value"
#: MLflow tags of the stop reason and stop epoch (the same names as the Ray scheduler's result keys).
STOP_REASON_TAG = keys.STOP_REASON
STOP_EPOCH_TAG = keys.STOP_EPOCH

_RUN_STATUS = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "KILLED", TrialState.FAIL: "FAILED"}
_BATCH = 1000  # MLflow's limit of metrics per log_batch call
_PARAM_BATCH = 100  # ... and of params/tags


def _require_mlflow() -> Any:
    try:
        import mlflow
    except ImportError as err:  # pragma: no cover - exercised with mlflow hidden from sys.modules
        raise ImportError(
            "mlflow was not found - please install with `pip install neve_tune[mlflow]` (or `pip install mlflow`)"
            " to log Optuna trials to MLflow."
        ) from err
    return mlflow


def _millis(when: Any) -> int:
    return int(when.timestamp() * 1000) if when is not None else int(time.time() * 1000)


class NeVeMLflowCallback:
    """Optuna study callback that logs each finished trial, with every epoch's NeVe metrics, to MLflow.

    Pass it to ``study.optimize(..., callbacks=[NeVeMLflowCallback()])``. When a trial finishes
    (COMPLETE, PRUNED or FAIL) it creates one MLflow run for it and logs, in batches:

    * every epoch of the trial's ``"neve_history"`` user attribute (written by
      :func:`~neve_tune.optuna.report_epoch`): all ``neve/*`` metrics (velocity, velocity change, LRs, ...)
      and the reported value as ``optuna/intermediate_value``, each with ``step=neve/epoch``;
    * the objective's final value as ``metric_name`` (COMPLETE trials);
    * the trial's params as params;
    * tags ``neve/stop_reason`` and ``neve/stop_epoch`` (when the trial stopped early), ``optuna.study_name``,
      ``optuna.trial_number`` and ``optuna.state``; ``mlflow.parentRunId`` when ``parent_run_id`` is given.

    The run ends FINISHED for a COMPLETE trial, KILLED for a PRUNED one and FAILED for a failed one. It
    logs after the fact, from storage, so it works in any worker process of an RDB study and never
    slows the training loop. Optuna-integration's ``MLflowCallback`` logs only the final value (and is
    deprecated since Optuna 4.9); this one logs the per-epoch history too.

    Failure policy: MLflow being unreachable or failing never kills the study. The error becomes a
    ``RuntimeWarning`` naming the trial, and the study goes on.

    NaN policy: NaN metrics are logged as NaN (MLflow stores them); infinities as MLflow's float limits.

    Args:
        tracking_uri: MLflow tracking URI (``sqlite:///mlflow.db``, ``http://host:5000``, ...).
            :obj:`None`: MLflow's default (``MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db``).
        experiment_name: MLflow experiment; created when missing. :obj:`None`: the study's name.
        metric_name: MLflow name of the trial's final objective value.
        parent_run_id: an existing MLflow run (e.g. one per study arm) to nest every trial's run under.
        tags: extra tags on every trial's run.

    Example:
        >>> callback = NeVeMLflowCallback("sqlite:///mlflow.db", metric_name="accuracy")  # doctest: +SKIP
        >>> study.optimize(objective, n_trials=20, callbacks=[callback])  # doctest: +SKIP
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        *,
        experiment_name: str | None = None,
        metric_name: str = "value",
        parent_run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        _require_mlflow()
        if not isinstance(metric_name, str) or not metric_name:
            raise ValueError(f"metric_name must be a non-empty string, but got {metric_name=}.")
        self._tracking_uri = tracking_uri
        self._experiment_name = experiment_name
        self._metric_name = metric_name
        self._parent_run_id = parent_run_id
        self._tags = {str(k): str(v) for k, v in (tags or {}).items()}

    def __call__(self, study: optuna.study.Study, trial: optuna.trial.FrozenTrial) -> None:
        try:
            self.log_trial(study, trial)
        except Exception as err:  # the tracking server going away must not kill the study
            warnings.warn(
                f"NeVeMLflowCallback could not log trial {trial.number} of study {study.study_name!r} to"
                f" MLflow ({type(err).__name__}: {err}); the study goes on without it.",
                RuntimeWarning,
                stacklevel=2,
            )

    def log_trial(self, study: optuna.study.Study, trial: optuna.trial.FrozenTrial) -> str:
        """Log one trial as an MLflow run and return the run id (errors propagate, unlike ``__call__``)."""
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self._tracking_uri)
        experiment_id = self._experiment_id(client, self._experiment_name or study.study_name)
        attrs = trial.user_attrs
        tags = {
            **self._tags,
            "optuna.study_name": study.study_name,
            "optuna.trial_number": str(trial.number),
            "optuna.state": trial.state.name,
        }
        if self._parent_run_id is not None:
            tags["mlflow.parentRunId"] = self._parent_run_id
        if STOP_REASON_ATTR in attrs:
            tags[STOP_REASON_TAG] = str(attrs[STOP_REASON_ATTR])
        if STOP_EPOCH_ATTR in attrs:
            tags[STOP_EPOCH_TAG] = str(attrs[STOP_EPOCH_ATTR])

        run = client.create_run(
            experiment_id, start_time=_millis(trial.datetime_start), tags=tags, run_name=f"trial-{trial.number}"
        )
        run_id = run.info.run_id
        stamp = _millis(trial.datetime_complete)
        status = "FAILED"
        try:
            metrics: list[Metric] = []
            last_epoch = 0
            for entry in attrs.get(HISTORY_ATTR, []):
                epoch = int(decode(entry[keys.EPOCH]))
                last_epoch = max(last_epoch, epoch)
                for key, raw in entry.items():
                    if key == STEP_KEY:
                        continue
                    name = INTERMEDIATE_METRIC if key == VALUE_KEY else key
                    metrics.append(Metric(name, decode(raw), stamp, epoch))
            if trial.state is TrialState.COMPLETE and trial.values is not None and len(trial.values) == 1:
                metrics.append(Metric(self._metric_name, float(trial.values[0]), stamp, last_epoch))
            params = [Param(k, str(v)) for k, v in trial.params.items()]
            for chunk in _chunks(metrics, _BATCH):
                client.log_batch(run_id, metrics=chunk)
            for chunk in _chunks(params, _PARAM_BATCH):
                client.log_batch(run_id, params=chunk)
            status = _RUN_STATUS.get(trial.state, "FAILED")
        finally:
            client.set_terminated(run_id, status=status, end_time=stamp)
        return run_id

    @staticmethod
    def _experiment_id(client: MlflowClient, name: str) -> str:
        from mlflow.exceptions import MlflowException

        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return client.create_experiment(name)
        except MlflowException:  # another worker created it between our two calls
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
            return experiment.experiment_id


def _chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]
