"""Run a study: every arm on the same sampled configurations, on a backend (Ray Tune, Optuna), tracked in MLflow.

Everything that can fail without training is checked first (:func:`~neve_tune.studies._plan.make_plan`:
study name, arms, seeds, backend, resources, tracking URI scheme; then the tracking store and the data), so
a bad option loses nothing. With several seeds the whole study is repeated once per seed and the result
holds each seed's table and the table over seeds.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ._arms import is_builtin
from ._backend import ArmJob, Backend
from ._collect import Collector, Progress
from ._compare import ArmSummary, summarize_arm
from ._options import StudyOptions
from ._outputs import write_study_outputs
from ._plan import Plan, check_aux_set, make_plan
from ._records import ArmResult
from ._result import StudyResult
from ._seeds import SeedRun
from ._spec import StudyDefinition
from ._study_log import abort, log_arm, log_comparison, open_tracker
from ._trial import TrialSpec

if TYPE_CHECKING:
    from ._tracking import StudyTracker

logger = logging.getLogger(__name__)


def run_study(study: str | StudyDefinition, options: StudyOptions | None = None, **changes: Any) -> StudyResult:
    """Run ``study``'s arms on the same sampled configurations and compare them (see the package docstring).

    With ``seeds=(0, 1, 2)`` the whole study is repeated once per seed (each seed samples its own
    configurations and seeds its trials); the result then holds each seed's table (:attr:`StudyResult.runs`)
    and each arm's mean and spread over the seeds (:attr:`StudyResult.over_seeds`).

    Args:
        study: a registered study name (``digits``, ``cifar10``, ...), ``module:DEFINITION``, or a
            :class:`StudyDefinition`.
        options: how to run it (:class:`StudyOptions`; default: its defaults).
        **changes: :class:`StudyOptions` fields to change, e.g. ``run_study("digits", trials=4)``.

    An arm whose every trial failed does not stop the study: the other arms run, the tables and MLflow
    hold what ran (that arm's run and the study run end FAILED), and :attr:`StudyResult.failures` says
    which arm, its first error and where the full one is (also logged at ERROR level).

    Raises:
        UnknownStudyError, StudyError, TrackingUnavailableError: before any training (``StudyError`` too when
            the study's aux set does not go through its model: see ``StudyDefinition.make_aux``).
    """
    options = replace(options or StudyOptions(), **changes)
    plan, backend = make_plan(study, options)
    definition = plan.definition
    if definition.prepare is not None:  # before the store is touched: a missing package creates no mlflow.db
        definition.prepare(options.data_root)
    check_aux_set(plan)
    resolved_uri = None
    if options.track:
        from neve_tune.mlflow import check_tracking_uri

        resolved_uri = check_tracking_uri(options.tracking_uri)
    backend.open(plan.budget)
    tracker: StudyTracker | None = None
    try:
        if options.track:
            tracker = open_tracker(plan, resolved_uri)
        result = _run_arms(plan, backend, tracker)
        result.tracking_uri = resolved_uri
        if tracker is not None:
            result.experiment_id = tracker.experiment_id
            result.study_run_id = tracker.study_run_id
            log_comparison(tracker, result)
            tracker.end("FAILED" if result.failures else "FINISHED")
        for failure in result.failures:
            logger.error("neve-tune study %s: %s", plan.definition.name, failure)
        return result
    except KeyboardInterrupt:
        abort(tracker, "KILLED")
        raise
    except BaseException:
        abort(tracker, "FAILED")
        raise
    finally:
        backend.close()


def _run_arms(plan: Plan, backend: Backend, tracker: StudyTracker | None) -> StudyResult:
    runs: list[SeedRun] = []
    with Progress(plan.options.progress, plan.options.console) as bars:
        for seed in plan.seeds:
            runs.append(_run_seed(plan, seed, backend, tracker, bars))
    result = StudyResult(
        study=plan.definition.name,
        runs=runs,
        budget=plan.budget,
        output_dir=plan.output / f"{plan.definition.name}-{plan.stamp}",
    )
    result.files = write_study_outputs(result.output_dir, runs)
    return result


def _run_seed(plan: Plan, seed: int, backend: Backend, tracker: StudyTracker | None, bars: Progress) -> SeedRun:
    """Every arm of the study on the configurations and trial seeds of ``seed``."""
    arm_results: dict[str, ArmResult] = {}
    summaries: list[ArmSummary] = []
    options, budget = plan.options, plan.budget
    configs = plan.definition.configs(budget.trials, seed)
    several = len(plan.seeds) > 1
    for arm in plan.arms:
        arm_run = tracker.arm(arm.name, seed) if tracker is not None else None
        spec = TrialSpec(
            study=plan.spec_study,
            arm=arm.name if is_builtin(arm) else arm,  # an arm of your own travels to the workers itself
            budget=budget,
            seed=seed,
            data_root=options.data_root,
            num_workers=options.num_workers,
        )
        label = f"{arm.display_name} s{seed}" if several else arm.display_name
        job = ArmJob(
            arm=arm,
            spec=spec,
            configs=configs,
            collector=Collector(arm, budget, arm_run, bars, len(configs), label=label),
            name=f"{plan.definition.name}-{arm.name}-{plan.stamp}" + (f"-s{seed}" if several else ""),
            output=plan.output,
            link=arm_run.link.to_dict() if arm_run is not None else None,
            fallback_dir=str(plan.fallback_dir),
        )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            arm_result = backend.run_arm(job)
        summary = summarize_arm(arm_result, arm)
        arm_results[arm.name] = arm_result
        summaries.append(summary)
        if arm_run is not None:
            log_arm(arm_run, arm, arm_result, summary)
        if options.on_arm_done is not None:
            options.on_arm_done(arm_result, summary)
    return SeedRun(seed=seed, arms=arm_results, summaries=summaries)


__all__ = ["StudyResult", "run_study"]
