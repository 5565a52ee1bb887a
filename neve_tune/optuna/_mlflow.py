"""An Optuna study callback that logs each finished trial, with every epoch's NeVe metrics, to MLflow."""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Mapping
from pathlib import Path

import optuna
from optuna.trial import TrialState

from neve_tune import StopReason, keys
from neve_tune.mlflow import TrackingUnavailableError, get_or_create_experiment
from neve_tune.mlflow._deps import require_mlflow
from neve_tune.mlflow._experiment import safe_name
from neve_tune.mlflow._logger import TAG_PARENT, stop_tags
from neve_tune.mlflow._outbox import Op, RunOutbox, chunk_batch, millis
from neve_tune.mlflow._replay import UnsentFile, replay_command, replay_files
from neve_tune.mlflow._uri import configure_client_env, resolve_tracking_uri
from neve_tune.optuna._attrs import HISTORY_ATTR, STEP_KEY, STOP_EPOCH_ATTR, STOP_REASON_ATTR, VALUE_KEY, decode

#: MLflow metric of the value passed to ``trial.report`` at each epoch.
INTERMEDIATE_METRIC = "optuna/intermediate_value"

# One convention for every trial run in neve_tune (see neve_tune.mlflow's TrialLogger): a pruned trial
# ended as its tuner decided, so its run is FINISHED, with the reason in the stop-reason tag.
_RUN_STATUS = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "FINISHED", TrialState.FAIL: "FAILED"}


class NeVeMLflowCallback:
    """Optuna study callback that logs each finished trial, with every epoch's NeVe metrics, to MLflow.

    Pass it to ``study.optimize(..., callbacks=[NeVeMLflowCallback()])``. When a trial finishes
    (COMPLETE, PRUNED or FAIL) it creates one MLflow run for it and logs, in batches within MLflow's limits:

    * every epoch of the trial's ``"neve_history"`` user attribute (written by
      :func:`~neve_tune.optuna.report_epoch`): all ``neve/*`` metrics (velocity, velocity change, LRs, ...)
      and the reported value as ``optuna/intermediate_value``, each with ``step=neve/epoch``;
    * the objective's final value as ``metric_name`` (COMPLETE trials);
    * the trial's params as params;
    * tags ``neve/stop_reason`` and ``neve/stop_epoch`` (when the trial stopped early), ``optuna.study_name``,
      ``optuna.trial_number`` and ``optuna.state``; ``mlflow.parentRunId`` when ``parent_run_id`` is given.

    The run ends by neve_tune's one convention for trial runs (as :class:`neve_tune.mlflow.TrialLogger`): a
    COMPLETE trial and a PRUNED one end FINISHED (a pruned trial's ``neve/stop_reason`` says why, ``pruned``
    when nothing more precise was recorded), a failed one FAILED. A new experiment is tagged as model
    training (see :func:`neve_tune.mlflow.get_or_create_experiment`). It logs after the fact, from storage,
    so it works in any worker process of an RDB study and never slows the training loop. Optuna-integration's
    ``MLflowCallback`` logs only the final value (and is deprecated since Optuna 4.9); this one logs the
    per-epoch history too.

    Failure policy: MLflow being unreachable or failing never kills the study. The error becomes one
    ``RuntimeWarning`` naming the trial, and the study goes on. The trial's records are not lost: they are
    saved to ``fallback_dir/mlflow-unsent-optuna-<study>-trial-<n>.jsonl`` and sent before the next trial's
    (or by :meth:`send_unsent`, or later by ``neve-tune mlflow replay FOLDER``).

    NaN policy: NaN metrics are logged as NaN (MLflow stores them); infinities as MLflow's float limits.

    Args:
        tracking_uri: MLflow tracking URI (``sqlite:///mlflow.db``, ``http://host:5000``, ...).
            :obj:`None`: MLflow's default (``mlflow.set_tracking_uri``, ``MLFLOW_TRACKING_URI`` or
            ``sqlite:///mlflow.db``).
        experiment_name: MLflow experiment; created when missing. :obj:`None`: the study's name.
        metric_name: MLflow name of the trial's final objective value.
        parent_run_id: an existing MLflow run (e.g. one per study arm) to nest every trial's run under.
        tags: extra tags on every trial's run.
        fallback_dir: where the records of a trial that could not be sent are saved (default: the working
            directory).

    Example:
        >>> callback = NeVeMLflowCallback("sqlite:///mlflow.db", metric_name="accuracy")  # doctest: +SKIP
        >>> study.optimize(objective, n_trials=20, callbacks=[callback])  # doctest: +SKIP
        >>> callback.send_unsent()  # doctest: +SKIP
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        *,
        experiment_name: str | None = None,
        metric_name: str = "value",
        parent_run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
        fallback_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        require_mlflow("log Optuna trials to MLflow")
        configure_client_env()
        if not isinstance(metric_name, str) or not metric_name:
            raise ValueError(f"metric_name must be a non-empty string, but got {metric_name=}.")
        self._tracking_uri = tracking_uri
        self._experiment_name = experiment_name
        self._metric_name = metric_name
        self._parent_run_id = parent_run_id
        self._tags = {str(k): str(v) for k, v in (tags or {}).items()}
        self.fallback_dir = Path(fallback_dir) if fallback_dir is not None else Path.cwd()
        self._unsent: list[Path] = []
        self._lock = threading.Lock()

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

    @property
    def unsent(self) -> list[Path]:
        """The files of trials whose records could not be sent yet (sent before the next trial's)."""
        with self._lock:
            return list(self._unsent)

    def send_unsent(self) -> list[Path]:
        """Send the records saved while MLflow was unreachable; returns the files still unsent.

        A file MLflow refuses is left on disk (with a ``RuntimeWarning``) and no longer retried.
        """
        with self._lock:
            if not self._unsent:
                return []
            files = [UnsentFile.read(p) for p in self._unsent if p.exists()]
            report = replay_files(files, folder=self.fallback_dir)
            for path in report.refused:
                warnings.warn(
                    f"MLflow refused the saved records {path} ({report.errors[path]}); they stay in that file.",
                    RuntimeWarning,
                    stacklevel=2,
                )
            self._unsent = [f.path for f in report.left if f.path not in report.refused]
            return list(self._unsent)

    def log_trial(self, study: optuna.study.Study, trial: optuna.trial.FrozenTrial) -> str:
        """Log one trial as an MLflow run and return the run id (errors propagate, unlike ``__call__``).

        Raises:
            TrackingUnavailableError: MLflow could not be reached; the records were saved (the message names
                the file) and are sent before the next trial's.
        """
        uri = self._uri()
        name = self._experiment_name or study.study_name
        outbox = RunOutbox(
            uri,
            None,
            experiment_name=name,
            label=f"Optuna trial {trial.number} of {study.study_name!r}",
            warn=False,
        )
        outbox.put(self._ops(study, trial), send=False)
        if not self.send_unsent():  # earlier trials' records first: while they wait, MLflow is still away
            try:
                outbox.experiment_id = get_or_create_experiment(outbox.client, name)
            except TrackingUnavailableError:
                raise  # e.g. a deleted experiment: retrying cannot help
            except Exception as err:
                outbox.last_error = err
            else:
                if outbox.send(force=True):
                    for op, why in outbox.dropped:
                        warnings.warn(
                            f"MLflow refused the '{op.kind}' record of trial {trial.number}: {why}",
                            RuntimeWarning,
                            stacklevel=2,
                        )
                    return outbox.require_run()
        path = outbox.dump(
            self.fallback_dir / f"mlflow-unsent-optuna-{safe_name(study.study_name)}-trial-{trial.number}.jsonl"
        )
        with self._lock:
            if path is not None:
                self._unsent.append(path)
        cause = outbox.last_error
        reason = f"{type(cause).__name__}: {str(cause)[:300]}" if cause is not None else "earlier trials' records wait"
        raise TrackingUnavailableError(
            f"MLflow at {uri} is unreachable ({reason}); the trial's records were saved to {path} and are sent "
            f"with the next trial's, or by `{replay_command(self.fallback_dir)}`"
        ) from cause

    def _uri(self) -> str:
        if self._tracking_uri is not None:
            return resolve_tracking_uri(self._tracking_uri)
        import mlflow

        return resolve_tracking_uri(mlflow.get_tracking_uri())

    def _ops(self, study: optuna.study.Study, trial: optuna.trial.FrozenTrial) -> list[Op]:
        attrs = trial.user_attrs
        tags = {
            **self._tags,
            "optuna.study_name": study.study_name,
            "optuna.trial_number": str(trial.number),
            "optuna.state": trial.state.name,
        }
        if self._parent_run_id is not None:
            tags[TAG_PARENT] = self._parent_run_id
        reason = attrs.get(STOP_REASON_ATTR)
        if reason is None and trial.state is TrialState.PRUNED:
            reason = StopReason.PRUNED
        tags.update(stop_tags(reason, attrs.get(STOP_EPOCH_ATTR)))
        start, stamp = millis(trial.datetime_start), millis(trial.datetime_complete)
        metrics: list[tuple[str, float, int, int]] = []
        last_epoch = 0
        for entry in attrs.get(HISTORY_ATTR, []):
            epoch = int(decode(entry[keys.EPOCH]))
            last_epoch = max(last_epoch, epoch)
            for key, raw in entry.items():
                if key != STEP_KEY:
                    metrics.append((INTERMEDIATE_METRIC if key == VALUE_KEY else key, decode(raw), stamp, epoch))
        if trial.state is TrialState.COMPLETE and trial.values is not None and len(trial.values) == 1:
            metrics.append((self._metric_name, float(trial.values[0]), stamp, last_epoch))
        return [
            Op("create", {"run_name": f"trial-{trial.number}", "tags": tags, "start_time": start}),
            *chunk_batch(metrics, params={k: str(v) for k, v in trial.params.items()}),
            Op("terminate", {"status": _RUN_STATUS.get(trial.state, "FAILED"), "end_time": stamp}),
        ]
