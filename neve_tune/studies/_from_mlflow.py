"""Rebuild a study's comparison from its MLflow runs (``neve-tune study compare``).

It reads the run tree :func:`run_study` writes: the study run (tag ``role=study``), its arm runs (params
``train_fraction``, ``max_epochs``; metric ``wall_time_s``) and their trial runs (params = config, tags
``neve/stop_reason``/``neve/stop_epoch``, metric histories). The table is computed by the same code as
at the end of ``study run``. With several seeds the arm runs are grouped by their ``seed`` tag, in the
order of the study run's ``seeds`` param.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._keys import EPOCH, ERROR, STOPPED, TEST_ACC, TEST_LOSS, TRAIN_ACC, TRAIN_LOSS, TRAIN_TSE_EMA, VAL_ACC, VAL_LOSS
from ._options import check_tracking_scheme
from ._records import ArmResult, TrialRecord
from ._seeds import SeedRun
from ._spec import StudyError

_PICK_KEYS = (TEST_ACC, TEST_LOSS, TRAIN_LOSS, TRAIN_ACC, TRAIN_TSE_EMA, VAL_ACC, VAL_LOSS)


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
    by_seed: dict[int, list[ArmResult]] | None = None

    @property
    def runs(self) -> list[SeedRun]:
        """Each seed's records and comparison rows (:func:`summarize_arm`), in the study's seed order."""
        from ._compare import summarize_arm

        groups = self.by_seed or {int(self.seed or 0): self.arms}
        return [
            SeedRun(seed, {a.arm: a for a in arms}, [summarize_arm(a) for a in arms]) for seed, arms in groups.items()
        ]


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

    from neve_tune.mlflow import check_tracking_uri
    from neve_tune.mlflow._logger import (
        TAG_ARM,
        TAG_PARENT,
        TAG_ROLE,
        TAG_STOP_EPOCH,
        TAG_STOP_REASON,
        TAG_STUDY,
        TAG_TRIAL_ID,
    )
    from neve_tune.mlflow._uri import resolve_tracking_uri

    check_tracking_scheme(tracking_uri)
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
        study_run = _study_run(client, exp, study_run_id, uri)
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
    seeds_of: dict[int, int] = {}
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
        seeds_of[id(arm_run)] = seed = int(arm_run.data.tags.get("seed", study_run.data.params.get("seed", 0)))
        arms.append(
            ArmResult(
                arm=arm,
                records=sorted(records, key=lambda r: r.config_id),
                wall_time_s=float(arm_run.data.metrics.get("wall_time_s", math.nan)),
                train_fraction=float(params.get("train_fraction", "nan")),
                max_epochs=int(params.get("max_epochs", max((r.epochs for r in records), default=0))),
                seed=seed,
            )
        )
    by_seed: dict[int, list[ArmResult]] = {}
    order_seeds = [int(x) for x in (study_run.data.params.get("seeds") or "").split(",") if x.strip()]
    for seed in order_seeds:
        by_seed[seed] = []
    for arm_run, result in zip(arm_runs, arms, strict=True):
        by_seed.setdefault(seeds_of[id(arm_run)], []).append(result)
    by_seed = {seed: results for seed, results in by_seed.items() if results}
    first = next(iter(by_seed.values()), [])
    return StoredStudy(
        tracking_uri=uri,
        experiment_id=exp.experiment_id,
        experiment=experiment,
        study_run_id=study_run.info.run_id,
        study_run_name=study_run.info.run_name,
        study=study_run.data.tags.get(TAG_STUDY, "?"),
        status=study_run.info.status,
        arms=first,
        seed=study_run.data.params.get("seed"),
        by_seed=by_seed,
    )


def _study_run(client: Any, exp: Any, run_id: str, uri: str) -> Any:
    """The study run ``run_id`` of ``exp``; ``StudyError`` listing the latest study runs when there is none."""
    from mlflow.exceptions import MlflowException

    from neve_tune.mlflow._logger import TAG_ROLE

    try:
        run = client.get_run(run_id)
    except MlflowException:
        run = None
    if run is not None and run.info.experiment_id == exp.experiment_id and run.data.tags.get(TAG_ROLE) == "study":
        return run
    latest = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.{TAG_ROLE} = 'study'",
        order_by=["attributes.start_time DESC"],
        max_results=5,
    )
    listed = "; ".join(f"{r.info.run_id} ({r.info.run_name}, {r.info.status})" for r in latest) or "none"
    if run is None:
        what = f"No MLflow run has the id {run_id!r} at {uri}."
    else:
        role = run.data.tags.get(TAG_ROLE)
        role = f"an {role}" if role == "arm" else f"a {role}" if role else "not a neve-tune"
        where = "" if run.info.experiment_id == exp.experiment_id else f" of experiment id {run.info.experiment_id}"
        what = f"The run {run_id!r} is not a study run of the experiment {exp.name!r} (it is {role} run{where})."
    raise StudyError(
        f"{what} The latest study runs of {exp.name!r}: {listed}. Leave out --run-id for the latest one, or "
        "pass one of these ids (--experiment and --tracking-uri choose where to look)."
    )
