"""Run a study: every arm on the same sampled configurations, on Ray Tune (or Optuna), tracked in MLflow.

Everything that can fail without training is checked first (study name, arms, backend, resources,
tracking store, data), so a bad option loses nothing.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._arms import Arm, get_arm, is_builtin, list_arms
from ._backend import BACKENDS, ArmJob, Backend
from ._collect import Collector, Progress
from ._compare import (
    ArmSummary,
    comparison_csv,
    comparison_markdown,
    comparison_table,
    pick_trial,
    summarize_arm,
)
from ._options import StudyOptions
from ._records import ArmResult
from ._registry import BUILTIN_STUDIES, get_study
from ._spec import Budget, StudyDefinition, StudyError, search_space_params
from ._trial import TrialSpec

if TYPE_CHECKING:
    from rich.table import Table

    from ._tracking import ArmRun, StudyTracker


@dataclass
class StudyResult:
    """What :func:`run_study` returns: per-arm records, the comparison rows and where things were logged.

    NaN policy: as :func:`summarize_arm` (NaN where no trial qualifies). State: plain data; the same table is
    rebuilt from MLflow by ``neve-tune study compare``.
    """

    study: str
    arms: dict[str, ArmResult]
    summaries: list[ArmSummary]
    budget: Budget
    seed: int
    output_dir: Path
    tracking_uri: str | None = None
    experiment_id: str | None = None
    study_run_id: str | None = None
    files: dict[str, Path] = field(default_factory=dict)

    def table(self) -> Table:
        """The comparison as a rich table."""
        return comparison_table(self.summaries, title=self.title)

    def markdown(self) -> str:
        return comparison_markdown(self.summaries)

    def csv(self) -> str:
        return comparison_csv(self.summaries)

    @property
    def title(self) -> str:
        b = self.budget
        return f"{self.study}: {b.trials} trials x <= {b.max_epochs} epochs per arm, seed {self.seed}"


# ---------------------------------------------------------------------------- the study


def _resolve(study: str | StudyDefinition) -> tuple[StudyDefinition, str | StudyDefinition]:
    if isinstance(study, StudyDefinition):
        return study, (study.name if study.name in BUILTIN_STUDIES else study)
    definition = get_study(study)
    return definition, study


def check_arms(arms: Sequence[str]) -> list[Arm]:
    """The registered arms of these names (order kept, duplicates dropped); ``UnknownArmError`` otherwise."""
    out: list[Arm] = []
    for name in arms:
        arm = get_arm(name)
        if arm.name not in [a.name for a in out]:
            out.append(arm)
    if not out:
        raise StudyError(f"Give at least one arm ({', '.join(list_arms())}).")
    return out


def _budget(definition: StudyDefinition, options: StudyOptions) -> Budget:
    budget = definition.budget.with_overrides(
        trials=options.trials,
        max_epochs=options.max_epochs,
        cpus_per_trial=options.cpus_per_trial,
        gpus_per_trial=options.gpus_per_trial,
    )
    if budget.cpus_per_trial <= 0 or budget.gpus_per_trial < 0:
        raise StudyError(
            f"cpus_per_trial must be > 0 and gpus_per_trial >= 0, but got {budget.cpus_per_trial} and "
            f"{budget.gpus_per_trial}."
        )
    return budget


@dataclass(frozen=True)
class _Plan:
    """One study run, as checked before any training."""

    definition: StudyDefinition
    spec_study: str | StudyDefinition
    arms: list[Arm]
    budget: Budget
    configs: list[dict[str, Any]]
    options: StudyOptions
    output: Path
    stamp: str

    @property
    def fallback_dir(self) -> Path:
        return self.output / "mlflow-unsent"


def run_study(study: str | StudyDefinition, options: StudyOptions | None = None, **changes: Any) -> StudyResult:
    """Run ``study``'s arms on the same sampled configurations and compare them (see the package docstring).

    Args:
        study: a registered study name (``digits``, ``cifar10``, ...), ``module:DEFINITION``, or a
            :class:`StudyDefinition`.
        options: how to run it (:class:`StudyOptions`; default: its defaults).
        **changes: :class:`StudyOptions` fields to change, e.g. ``run_study("digits", trials=4)``.

    Raises:
        UnknownStudyError, StudyError, TrackingUnavailableError: before any training.
    """
    options = replace(options or StudyOptions(), **changes)
    definition, spec_study = _resolve(study)
    arms = check_arms(options.arms)
    check_backend(options.backend)
    budget = _budget(definition, options)
    plan = _Plan(
        definition=definition,
        spec_study=spec_study,
        arms=arms,
        budget=budget,
        configs=definition.configs(budget.trials, options.seed),
        options=options,
        output=Path(options.output_dir).resolve(),
        stamp=time.strftime("%Y%m%d-%H%M%S"),
    )
    resolved_uri = None
    if options.track:
        from neve_tune.mlflow import check_tracking_uri

        resolved_uri = check_tracking_uri(options.tracking_uri)
    if definition.prepare is not None:
        definition.prepare(options.data_root)
    backend = create_backend(options)
    backend.open(budget)
    tracker: StudyTracker | None = None
    try:
        if options.track:
            tracker = _open_tracker(plan, resolved_uri)
        result = _run_arms(plan, backend, tracker)
        result.tracking_uri = resolved_uri
        if tracker is not None:
            result.experiment_id = tracker.experiment_id
            result.study_run_id = tracker.study_run_id
            _log_comparison(tracker, result)
            tracker.end("FINISHED")
        return result
    except KeyboardInterrupt:
        _abort(tracker, "KILLED")
        raise
    except BaseException:
        _abort(tracker, "FAILED")
        raise
    finally:
        backend.close()


def _open_tracker(plan: _Plan, tracking_uri: str | None) -> StudyTracker:
    from ._tracking import StudyTracker

    definition, budget, options = plan.definition, plan.budget, plan.options
    return StudyTracker(
        tracking_uri,
        options.experiment or f"neve-tune-{definition.name}",
        study=definition.name,
        arms=[arm.name for arm in plan.arms],
        params={
            "study": definition.name,
            "backend": options.backend,
            "seed": options.seed,
            "trials": budget.trials,
            "max_epochs": budget.max_epochs,
            "batch_size": budget.batch_size,
            "momentum": budget.momentum,
            **search_space_params(definition.search_space),
        },
        arm_params={arm.name: arm.params(budget) for arm in plan.arms},
        run_name=f"{definition.name}-{plan.stamp}",
        fallback_dir=plan.fallback_dir,
        drain_timeout_s=options.mlflow_drain_timeout_s,
    )


def _abort(tracker: StudyTracker | None, status: str) -> None:
    """End every open run of the study with ``status`` (KILLED on Ctrl-C, FAILED on an error)."""
    if tracker is None:
        return
    for arm_run in tracker.arms.values():
        arm_run.close_open_trials(status)
    tracker.end(status)


def _run_arms(plan: _Plan, backend: Backend, tracker: StudyTracker | None) -> StudyResult:
    arm_results: dict[str, ArmResult] = {}
    summaries: list[ArmSummary] = []
    options, budget = plan.options, plan.budget
    with Progress(options.progress, options.console) as bars:
        for arm in plan.arms:
            arm_run = tracker.arm(arm.name) if tracker is not None else None
            spec = TrialSpec(
                study=plan.spec_study,
                arm=arm.name if is_builtin(arm) else arm,  # an arm of your own travels to the workers itself
                budget=budget,
                seed=options.seed,
                data_root=options.data_root,
                num_workers=options.num_workers,
            )
            job = ArmJob(
                arm=arm,
                spec=spec,
                configs=plan.configs,
                collector=Collector(arm, budget, arm_run, bars, len(plan.configs)),
                name=f"{plan.definition.name}-{arm.name}-{plan.stamp}",
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
                _log_arm(arm_run, arm, arm_result, summary)
            if options.on_arm_done is not None:
                options.on_arm_done(arm_result, summary)
    result = StudyResult(
        study=plan.definition.name,
        arms=arm_results,
        summaries=summaries,
        budget=budget,
        seed=options.seed,
        output_dir=plan.output / f"{plan.definition.name}-{plan.stamp}",
    )
    result.files = write_outputs(result.output_dir, list(arm_results.values()), summaries)
    return result


def _log_arm(arm_run: ArmRun, arm: Arm, arm_result: ArmResult, summary: ArmSummary) -> None:
    arm_run.log_metrics(
        {
            "picked_test_acc": summary.picked_test_acc,
            "median_test_acc": summary.median_test_acc,
            "q1_test_acc": summary.q1_test_acc,
            "q3_test_acc": summary.q3_test_acc,
            "min_test_acc": summary.min_test_acc,
            "max_test_acc": summary.max_test_acc,
            "trial_epochs": summary.trial_epochs,
            "wall_time_s": summary.wall_time_s,
            "train_fraction": summary.train_fraction,
            "trials": summary.trials,
        }
    )
    picked = pick_trial(arm, arm_result.records)
    arm_run.set_tags(
        {
            "picked_config": "-" if picked is None else picked.config_id,
            "stop_reasons": summary.stop_reasons_text,
            "stop_epochs": ",".join(str(e) for e in summary.stop_epochs),
        }
    )
    if picked is not None and picked.trial_id is not None:
        arm_run.tag_trial(picked.trial_id, {"picked": "true"})
    arm_run.close_open_trials("KILLED")  # a last sweep: no trial run stays RUNNING after its arm
    arm_run.end("FINISHED")


def write_outputs(folder: Path, results: list[ArmResult], summaries: list[ArmSummary]) -> dict[str, Path]:
    """Write comparison.md/.csv and the two study plots into ``folder``; returns the paths."""
    from neve_tune.mlflow._plots import PLOT_LOCK

    from ._plots import plot_compute, plot_test_acc_vs_epochs

    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "comparison.md": folder / "comparison.md",
        "comparison.csv": folder / "comparison.csv",
        "test_acc_vs_epochs.png": folder / "test_acc_vs_epochs.png",
        "compute_per_arm.png": folder / "compute_per_arm.png",
    }
    files["comparison.md"].write_text(comparison_markdown(summaries))
    files["comparison.csv"].write_text(comparison_csv(summaries))
    with PLOT_LOCK:
        plot_test_acc_vs_epochs(results).savefig(files["test_acc_vs_epochs.png"])
        plot_compute(summaries).savefig(files["compute_per_arm.png"])
    return files


def _log_comparison(tracker: StudyTracker, result: StudyResult) -> None:
    tracker.log_text(result.markdown(), "comparison.md")
    tracker.log_text(result.csv(), "comparison.csv")
    for name in ("test_acc_vs_epochs.png", "compute_per_arm.png"):
        path = result.files.get(name)
        if path is not None:
            tracker.log_artifact(path, "plots")
    metrics: dict[str, float] = {}
    for s in result.summaries:
        metrics[f"{s.arm}.picked_test_acc"] = s.picked_test_acc
        metrics[f"{s.arm}.median_test_acc"] = s.median_test_acc
        metrics[f"{s.arm}.trial_epochs"] = s.trial_epochs
        metrics[f"{s.arm}.wall_time_s"] = s.wall_time_s
    tracker.log_metrics(metrics)


def check_backend(name: str) -> None:
    """Raise ``StudyError`` unless ``name`` is a backend whose packages are installed (imports nothing heavy)."""
    if name not in BACKENDS:
        raise StudyError(f"Unknown backend {name!r}; the backends are: {', '.join(BACKENDS)}.")
    if name == "optuna":
        try:
            import neve_tune.optuna  # noqa: F401
        except ImportError as err:
            raise StudyError(
                f"The optuna backend is not available ({err}). Use --backend ray, or install `neve_tune[optuna]`."
            ) from err


def create_backend(options: StudyOptions) -> Backend:
    """The backend ``options.backend`` names, configured from ``options`` (imports Ray or Optuna)."""
    check_backend(options.backend)
    if options.backend == "ray":
        from ._ray_backend import RayBackend

        return RayBackend(address=options.ray_address, callbacks=options.callbacks)
    from ._optuna_backend import OptunaBackend

    return OptunaBackend()
