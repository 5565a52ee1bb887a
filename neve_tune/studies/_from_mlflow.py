"""Rebuild a study's comparison from its MLflow runs (``neve-tune study compare``).

It reads the run tree :func:`run_study` writes: the study run (tag ``role=study``), its arm runs (params
``train_fraction``, ``max_epochs``; metric ``wall_time_s``) and their trial runs (params = config, tags
``neve/stop_reason``/``neve/stop_epoch``, metric histories). The table is computed by the same code as
at the end of ``study run``. With several seeds the arm runs are grouped by their ``seed`` tag, in the
order of the study run's ``seeds`` param.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neve_tune.mlflow._logger import (
    TAG_ARM,
    TAG_PARENT,
    TAG_ROLE,
    TAG_STOP_EPOCH,
    TAG_STOP_REASON,
    TAG_STUDY,
    TAG_TRIAL_ID,
)

from ._keys import (
    EPOCH,
    ERROR,
    STOPPED,
    TEST_ACC,
    TEST_LOSS,
    TRAIN_ACC,
    TRAIN_LOSS,
    TRAIN_TSE,
    TRAIN_TSE_EMA,
    VAL_ACC,
    VAL_LOSS,
)
from ._options import check_tracking_scheme
from ._records import ArmResult, TrialRecord
from ._seeds import SeedRun
from ._spec import StudyError

_PICK_KEYS = (TEST_ACC, TEST_LOSS, TRAIN_LOSS, TRAIN_ACC, TRAIN_TSE, TRAIN_TSE_EMA, VAL_ACC, VAL_LOSS)


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
    #: ``(seed, arm)`` of arm runs that hold no trial (a study stopped before they trained): left out of
    #: every table and mean, so that a seed that never ran does not count as 0 trial-epochs.
    missing: list[tuple[int, str]] = field(default_factory=list)

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


def load_study(
    tracking_uri: str | None,
    experiment: str,
    *,
    study_run_id: str | None = None,
    page_size: int | None = None,
) -> StoredStudy:
    """Read the latest study run of ``experiment`` (or ``study_run_id``) and its arms and trials.

    Every run is read, however many: the runs are searched page by page (``page_size`` runs per request;
    ``None``: MLflow's default page) and the metric histories the table needs are fetched for up to
    MLflow's bulk limit of runs per request (``get-history-bulk-interval``), one request per metric key.
    A run whose history reaches MLflow's per-run limit of a bulk request is read whole on its own.

    Raises:
        StudyError: no such experiment, or no study run in it (the message lists what exists).
        TrackingUnavailableError: the store cannot be reached.
    """
    from mlflow import MlflowClient

    from neve_tune.mlflow import check_tracking_uri
    from neve_tune.mlflow._uri import resolve_tracking_uri

    check_tracking_scheme(tracking_uri)
    resolved = resolve_tracking_uri(tracking_uri)
    if resolved.startswith("sqlite:///") and not Path(resolved[len("sqlite:///") :]).exists():
        raise StudyError(
            f"There is no MLflow store at {resolved} (the file does not exist). Run `neve-tune study run` in this "
            "folder first, or pass the --tracking-uri the study was logged to."
        )
    uri = check_tracking_uri(resolved)
    reader = _Reader(MlflowClient(tracking_uri=uri), uri, page_size)
    exp = reader.experiment(experiment)
    study_run = _study_run(reader.client, exp, study_run_id, uri) if study_run_id else reader.latest_study_run(exp)
    arm_runs = _in_arm_order(reader.children(exp.experiment_id, study_run.info.run_id, role="arm"), study_run)
    default_seed = study_run.data.params.get("seed", 0)
    arms = [reader.arm_result(exp.experiment_id, arm_run, default_seed) for arm_run in arm_runs]
    by_seed: dict[int, list[ArmResult]] = {
        int(x): [] for x in (study_run.data.params.get("seeds") or "").split(",") if x.strip()
    }
    missing = [(result.seed, result.arm) for result in arms if not result.records]
    for result in arms:
        if result.records:
            by_seed.setdefault(result.seed, []).append(result)
    by_seed = {seed: results for seed, results in by_seed.items() if results}
    return StoredStudy(
        tracking_uri=uri,
        experiment_id=exp.experiment_id,
        experiment=experiment,
        study_run_id=study_run.info.run_id,
        study_run_name=study_run.info.run_name,
        study=study_run.data.tags.get(TAG_STUDY, "?"),
        status=study_run.info.status,
        arms=next(iter(by_seed.values()), []),
        seed=study_run.data.params.get("seed"),
        by_seed=by_seed,
        missing=missing,
    )


def _in_arm_order(arm_runs: list[Any], study_run: Any) -> list[Any]:
    """The arm runs in the arms' order of ``study run`` (the study run's ``arms`` tag), then by start time."""
    order = (study_run.data.tags.get("arms") or "").split(",")

    def position(run: Any) -> int:
        arm = run.data.tags.get(TAG_ARM)
        return order.index(arm) if arm is not None and arm in order else len(order)

    return sorted(arm_runs, key=position)


class _Reader:
    """Reads a study's runs from one MLflow store: every page of a search, metric histories in bulk."""

    def __init__(self, client: Any, uri: str, page_size: int | None) -> None:
        from mlflow.store.tracking import SEARCH_MAX_RESULTS_DEFAULT

        self.client, self.uri = client, uri
        self.page_size = SEARCH_MAX_RESULTS_DEFAULT if page_size is None else int(page_size)
        if self.page_size < 1:
            raise ValueError(f"page_size must be >= 1, but got page_size={page_size}.")

    def experiment(self, name: str) -> Any:
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            names = sorted(e.name for e in self.client.search_experiments())
            raise StudyError(
                f"No MLflow experiment named {name!r} at {self.uri}. Experiments there: {', '.join(names) or 'none'}. "
                "Pass --experiment (and --tracking-uri) of a study you ran."
            )
        return exp

    def latest_study_run(self, exp: Any) -> Any:
        runs = self.client.search_runs(
            [exp.experiment_id],
            filter_string=f"tags.{TAG_ROLE} = 'study'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if not runs:
            raise StudyError(
                f"The experiment {exp.name!r} holds no neve-tune study run; run `neve-tune study run` first."
            )
        return runs[0]

    def search(self, experiment_id: str, filter_string: str) -> list[Any]:
        """Every run matching ``filter_string``, oldest first, read page by page."""
        runs: list[Any] = []
        token: str | None = None
        while True:
            page = self.client.search_runs(
                [experiment_id],
                filter_string=filter_string,
                order_by=["attributes.start_time ASC"],
                max_results=self.page_size,
                page_token=token,
            )
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def children(self, experiment_id: str, parent_run_id: str, *, role: str | None = None) -> list[Any]:
        where = f"tags.`{TAG_PARENT}` = '{parent_run_id}'" + (f" and tags.{TAG_ROLE} = '{role}'" if role else "")
        return self.search(experiment_id, where)

    def histories(self, run_ids: list[str], key: str) -> dict[str, list[tuple[int, float]]]:
        """``run id -> [(step, value), ...]`` of ``key``, sorted by step, last value per step (a restarted
        trial logs its replayed epochs again)."""
        from mlflow.server.handlers import MAX_RESULTS_PER_RUN, MAX_RUNS_GET_METRIC_HISTORY_BULK

        store = self.client._tracking_client.store  # the bulk read MLflow's UI uses; MlflowClient has no wrapper
        points: dict[str, list[Any]] = {run_id: [] for run_id in run_ids}
        for i in range(0, len(run_ids), MAX_RUNS_GET_METRIC_HISTORY_BULK):
            batch = run_ids[i : i + MAX_RUNS_GET_METRIC_HISTORY_BULK]
            for row in store.get_metric_history_bulk_interval(batch, key, MAX_RESULTS_PER_RUN, None, None):
                points[row.run_id].append(row)  # a Metric with its run_id
        for run_id, metrics in points.items():
            if len(metrics) >= MAX_RESULTS_PER_RUN:  # sampled by the bulk read: read this one whole
                points[run_id] = list(self.client.get_metric_history(run_id, key))
        out: dict[str, list[tuple[int, float]]] = {}
        for run_id, metrics in points.items():
            last = {m.step: m.value for m in sorted(metrics, key=lambda m: (m.step, m.timestamp))}
            out[run_id] = sorted(last.items())
        return out

    def arm_result(self, experiment_id: str, arm_run: Any, default_seed: Any) -> ArmResult:
        """One arm run's :class:`ArmResult`, its trials' records rebuilt from their runs."""
        arm = arm_run.data.tags.get(TAG_ARM, arm_run.info.run_name)
        trial_runs = self.children(experiment_id, arm_run.info.run_id)
        histories = {
            key: self.histories([r.info.run_id for r in trial_runs if key in r.data.metrics], key) for key in _PICK_KEYS
        }
        records = [_record(arm, run, histories) for run in trial_runs]
        params = arm_run.data.params
        return ArmResult(
            arm=arm,
            records=sorted(records, key=lambda r: r.config_id),
            wall_time_s=float(arm_run.data.metrics.get("wall_time_s", math.nan)),
            train_fraction=float(params.get("train_fraction", "nan")),
            max_epochs=int(params.get("max_epochs", max((r.epochs for r in records), default=0))),
            seed=int(arm_run.data.tags.get("seed", default_seed)),
        )


def _record(arm: str, run: Any, histories: dict[str, dict[str, list[tuple[int, float]]]]) -> TrialRecord:
    """A trial run's record: its values at its stop epoch (a trial stopped from outside may have logged one
    more epoch) and its test-accuracy curve."""
    tags, metrics = run.data.tags, run.data.metrics
    config = {k: _number(v) for k, v in run.data.params.items()}
    epoch_tag = tags.get(TAG_STOP_EPOCH)
    epochs = int(epoch_tag) if epoch_tag else int(metrics.get(EPOCH, 0))
    reason = tags.get(TAG_STOP_REASON) or (ERROR if run.info.status == "FAILED" else STOPPED)
    final = dict(metrics)
    curve: list[tuple[int, float]] = []
    tse_curve: list[tuple[int, float]] = []
    for key, by_run in histories.items():
        history = [p for p in by_run.get(run.info.run_id, []) if not epochs or p[0] <= epochs]
        if history:
            final[key] = history[-1][1]
        if key == TEST_ACC:
            curve = history
        elif key == TRAIN_TSE:
            tse_curve = history
    return TrialRecord(
        arm=arm,
        config_id=int(config.get("config_id", -1)),
        config=config,
        epochs=epochs,
        stop_reason=reason,
        final=final,
        test_acc_curve=curve,
        tse_curve=tse_curve,
        trial_id=tags.get(TAG_TRIAL_ID),
        run_id=run.info.run_id,
    )


def _study_run(client: Any, exp: Any, run_id: str, uri: str) -> Any:
    """The study run ``run_id`` of ``exp``; ``StudyError`` listing the latest study runs when there is none."""
    from mlflow.exceptions import MlflowException

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
