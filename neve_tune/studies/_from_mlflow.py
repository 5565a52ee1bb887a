"""Rebuild a study's comparison from its MLflow runs (``neve-tune study compare``).

It reads the run tree :func:`run_study` writes: the study run (tag ``role=study``), its arm runs (params
``train_fraction``, ``max_epochs``; metric ``wall_time_s``) and their trial runs (params = config, tags
``neve/stop_reason``/``neve/stop_epoch``, metric histories). The table is computed by the same code as
at the end of ``study run``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._keys import EPOCH, ERROR, STOPPED, TEST_ACC, TEST_LOSS, TRAIN_ACC, TRAIN_LOSS, VAL_ACC, VAL_LOSS
from ._records import ArmResult, TrialRecord
from ._spec import StudyError

_PICK_KEYS = (TEST_ACC, TEST_LOSS, TRAIN_LOSS, TRAIN_ACC, VAL_ACC, VAL_LOSS)


@dataclass
class StoredStudy:
    """A study as read back from MLflow."""

    tracking_uri: str
    experiment_id: str
    experiment: str
    study_run_id: str
    study_run_name: str
    study: str
    status: str
    arms: list[ArmResult]
    seed: str | None = None


def _number(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            continue
    return text


def load_study(tracking_uri: str | None, experiment: str, *, study_run_id: str | None = None) -> StoredStudy:
    """Read the latest study run of ``experiment`` (or ``study_run_id``) and its arms and trials.

    Raises:
        StudyError: no such experiment, or no study run in it (the message lists what exists).
        TrackingUnavailableError: the store cannot be reached.
    """
    from mlflow import MlflowClient

    from neve_tune.mlflow import (
        TAG_ARM,
        TAG_PARENT,
        TAG_ROLE,
        TAG_STOP_EPOCH,
        TAG_STOP_REASON,
        TAG_STUDY,
        TAG_TRIAL_ID,
        check_tracking_uri,
        resolve_tracking_uri,
    )

    resolved = resolve_tracking_uri(tracking_uri)
    if resolved.startswith("sqlite:///") and not Path(resolved[len("sqlite:///") :]).exists():
        raise StudyError(
            f"There is no MLflow store at {resolved} (the file does not exist). Run `neve-tune study run` in this "
            "folder first, or pass the --tracking-uri the study was logged to."
        )
    uri = check_tracking_uri(resolved)
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise StudyError(
            f"No MLflow experiment named {experiment!r} at {uri}. Experiments there: {', '.join(names) or 'none'}. "
            "Pass --experiment (and --tracking-uri) of a study you ran."
        )
    if study_run_id is not None:
        study_run = client.get_run(study_run_id)
    else:
        runs = client.search_runs(
            [exp.experiment_id],
            filter_string=f"tags.{TAG_ROLE} = 'study'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if not runs:
            raise StudyError(
                f"The experiment {experiment!r} holds no neve-tune study run; run `neve-tune study run` first."
            )
        study_run = runs[0]
    arm_runs = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`{TAG_PARENT}` = '{study_run.info.run_id}' and tags.{TAG_ROLE} = 'arm'",
        order_by=["attributes.start_time ASC"],
        max_results=100,
    )
    order = (study_run.data.tags.get("arms") or "").split(",")

    def position(run: Any) -> int:  # the arms' order of `study run`
        arm = run.data.tags.get(TAG_ARM)
        return order.index(arm) if arm is not None and arm in order else 99

    arm_runs.sort(key=position)
    arms: list[ArmResult] = []
    for arm_run in arm_runs:
        arm = arm_run.data.tags.get(TAG_ARM, arm_run.info.run_name)
        trial_runs = client.search_runs(
            [exp.experiment_id],
            filter_string=f"tags.`{TAG_PARENT}` = '{arm_run.info.run_id}'",
            max_results=10_000,
        )
        records = []
        for run in trial_runs:
            tags, metrics = run.data.tags, run.data.metrics
            config = {k: _number(v) for k, v in run.data.params.items()}
            epoch_tag = tags.get(TAG_STOP_EPOCH)
            epochs = int(epoch_tag) if epoch_tag else int(metrics.get(EPOCH, 0))
            reason = tags.get(TAG_STOP_REASON) or (ERROR if run.info.status == "FAILED" else STOPPED)
            # The values at the stop epoch: a trial stopped from outside may have logged one more epoch.
            final = dict(metrics)
            curve: list[tuple[int, float]] = []
            for key in _PICK_KEYS:
                if key not in metrics:
                    continue
                history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
                history = [p for p in history if not epochs or p[0] <= epochs]
                if history:
                    final[key] = history[-1][1]
                if key == TEST_ACC:
                    curve = history
            records.append(
                TrialRecord(
                    arm=arm,
                    config_id=int(config.get("config_id", -1)),
                    config=config,
                    epochs=epochs,
                    stop_reason=reason,
                    final=final,
                    test_acc_curve=curve,
                    trial_id=tags.get(TAG_TRIAL_ID),
                    run_id=run.info.run_id,
                )
            )
        params = arm_run.data.params
        arms.append(
            ArmResult(
                arm=arm,
                records=sorted(records, key=lambda r: r.config_id),
                wall_time_s=float(arm_run.data.metrics.get("wall_time_s", math.nan)),
                train_fraction=float(params.get("train_fraction", "nan")),
                max_epochs=int(params.get("max_epochs", max((r.epochs for r in records), default=0))),
            )
        )
    return StoredStudy(
        tracking_uri=uri,
        experiment_id=exp.experiment_id,
        experiment=experiment,
        study_run_id=study_run.info.run_id,
        study_run_name=study_run.info.run_name,
        study=study_run.data.tags.get(TAG_STUDY, "?"),
        status=study_run.info.status,
        arms=arms,
        seed=study_run.data.params.get("seed"),
    )
