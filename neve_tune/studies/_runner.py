"""Run a study: every arm on the same sampled configurations, on Ray Tune (or Optuna), tracked in MLflow.

Everything that can fail without training is checked first (study name, arms, backend, resources,
tracking store, data), so a bad option loses nothing.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._collect import Collector, Progress
from ._compare import (
    PICK_RULES,
    ArmResult,
    ArmSummary,
    comparison_csv,
    comparison_markdown,
    comparison_table,
    pick_trial,
    summarize_arm,
)
from ._registry import BUILTIN_STUDIES, get_study
from ._spec import Budget, StudyDefinition, StudyError, search_space_params
from ._trial import ARMS, VAL_ACC, TrialSpec

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from neve_tune.mlflow import ArmRun, StudyTracker

BACKENDS = ("ray", "optuna")


def _optuna_available() -> None:
    try:
        import neve_tune.optuna  # noqa: F401
    except ImportError as err:
        raise StudyError(
            f"The optuna backend is not available ({err}). Use --backend ray, or install `neve_tune[optuna]`."
        ) from err


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


def check_arms(arms: Sequence[str]) -> list[str]:
    """Validate the arm names (order kept, duplicates dropped)."""
    out: list[str] = []
    for arm in arms:
        arm = arm.strip().lower()
        if arm not in ARMS:
            raise StudyError(f"Unknown arm {arm!r}. The arms are: {', '.join(ARMS)}.")
        if arm not in out:
            out.append(arm)
    if not out:
        raise StudyError(f"Give at least one arm ({', '.join(ARMS)}).")
    return out


def run_study(
    study: str | StudyDefinition,
    *,
    arms: Sequence[str] = ARMS,
    trials: int | None = None,
    max_epochs: int | None = None,
    seed: int = 0,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    track: bool = True,
    ray_address: str | None = None,
    backend: str = "ray",
    cpus_per_trial: float | None = None,
    gpus_per_trial: float | None = None,
    data_root: str | None = None,
    num_workers: int = 0,
    output_dir: str | os.PathLike[str] = "neve_results",
    progress: bool = True,
    console: Console | None = None,
    callbacks: Sequence[Any] = (),
    on_arm_done: Callable[[ArmResult, ArmSummary], None] | None = None,
) -> StudyResult:
    """Run ``study``'s arms on the same sampled configurations and compare them (see the package docstring).

    Args:
        study: a registered study name (``digits``, ``cifar10``, ...) or a :class:`StudyDefinition`.
        arms: any of ``neve``, ``asha``, ``fifo``, run in this order.
        trials, max_epochs: override the study budget (the same for every arm).
        seed: sampling of the configurations, weight init and data order, splits.
        tracking_uri: MLflow store (``None``: ``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db`` in the
            working directory). Checked before any training.
        experiment: MLflow experiment name (default ``neve-tune-<study>``).
        track: log to MLflow (False: only the returned result and the files in ``output_dir``).
        ray_address: ``None``/``"local"`` starts a local Ray with every CPU; else e.g. ``"auto"``.
        backend: ``"ray"`` or ``"optuna"``.
        cpus_per_trial, gpus_per_trial: resources of one trial (default: the study budget's).
        data_root: where the dataset is (or is downloaded to).
        num_workers: DataLoader workers per trial.
        output_dir: Ray results, comparison table and plots are written under it.
        progress: show progress bars.
        callbacks: extra Ray Tune callbacks (Ray backend).
        on_arm_done: called after each arm with its records and row.

    Raises:
        UnknownStudyError, StudyError, TrackingUnavailableError: before any training.
    """
    definition, spec_study = _resolve(study)
    arms = check_arms(arms)
    if backend not in BACKENDS:
        raise StudyError(f"Unknown backend {backend!r}; the backends are: {', '.join(BACKENDS)}.")
    if backend == "optuna":
        _optuna_available()
    budget = definition.budget.with_overrides(
        trials=trials, max_epochs=max_epochs, cpus_per_trial=cpus_per_trial, gpus_per_trial=gpus_per_trial
    )
    if budget.cpus_per_trial <= 0 or budget.gpus_per_trial < 0:
        raise StudyError(
            f"cpus_per_trial must be > 0 and gpus_per_trial >= 0, but got {budget.cpus_per_trial} and "
            f"{budget.gpus_per_trial}."
        )
    configs = definition.configs(budget.trials, seed)
    output = Path(output_dir).resolve()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    experiment = experiment or f"neve-tune-{definition.name}"

    resolved_uri = None
    if track:
        from neve_tune.mlflow import check_tracking_uri

        resolved_uri = check_tracking_uri(tracking_uri)
    if definition.prepare is not None:
        definition.prepare(data_root)

    started_ray = False
    if backend == "ray":
        from ._ray_backend import init_ray

        started_ray = init_ray(ray_address, budget.cpus_per_trial, budget.gpus_per_trial)

    tracker: StudyTracker | None = None
    try:
        if track:
            from neve_tune.mlflow import StudyTracker

            tracker = StudyTracker(
                resolved_uri,
                experiment,
                study=definition.name,
                arms=arms,
                params={
                    "study": definition.name,
                    "backend": backend,
                    "seed": seed,
                    "trials": budget.trials,
                    "max_epochs": budget.max_epochs,
                    "batch_size": budget.batch_size,
                    "momentum": budget.momentum,
                    **search_space_params(definition.search_space),
                },
                arm_params={arm: _arm_params(arm, budget) for arm in arms},
                run_name=f"{definition.name}-{stamp}",
                fallback_dir=output / "mlflow-unsent",
            )
        result = _run_arms(
            definition=definition,
            spec_study=spec_study,
            arms=arms,
            budget=budget,
            configs=configs,
            seed=seed,
            backend=backend,
            tracker=tracker,
            data_root=data_root,
            num_workers=num_workers,
            output=output,
            stamp=stamp,
            progress=progress,
            console=console,
            callbacks=callbacks,
            on_arm_done=on_arm_done,
        )
        result.tracking_uri = resolved_uri
        if tracker is not None:
            result.experiment_id = tracker.experiment_id
            result.study_run_id = tracker.study_run_id
            _log_comparison(tracker, result)
            tracker.end("FINISHED")
        return result
    except KeyboardInterrupt:
        if tracker is not None:
            for arm_run in tracker.arms.values():
                arm_run.close_open_trials("KILLED")
            tracker.end("KILLED")
        raise
    except BaseException:
        if tracker is not None:
            for arm_run in tracker.arms.values():
                arm_run.close_open_trials("FAILED")
            tracker.end("FAILED")
        raise
    finally:
        if started_ray:
            import ray

            ray.shutdown()


def _arm_params(arm: str, budget: Budget) -> dict[str, Any]:
    params: dict[str, Any] = {
        "arm": arm,
        "max_epochs": budget.max_epochs,
        "train_fraction": 1.0 if arm == "neve" else round(1 - budget.val_fraction, 6),
        "pick_rule": PICK_RULES[arm],
    }
    if arm == "neve":
        n = budget.neve
        params.update(
            scheduler="NeVeScheduler",
            lr_schedule="NeVe (plateau on velocity change)",
            patience=n.patience,
            factor=n.factor,
            stop_threshold=n.stop_threshold,
            velocity_momentum=n.momentum,
            aux="noise",
            aux_samples=n.aux_samples,
        )
    elif arm == "asha":
        params.update(
            scheduler="ASHAScheduler",
            metric=VAL_ACC,
            lr_schedule=budget.lr_schedule,
            grace_period=budget.grace_period,
            reduction_factor=budget.reduction_factor,
            val_fraction=budget.val_fraction,
        )
    else:
        params.update(scheduler="FIFOScheduler", lr_schedule=budget.lr_schedule, val_fraction=budget.val_fraction)
    return params


def _run_arms(
    *,
    definition: StudyDefinition,
    spec_study: str | StudyDefinition,
    arms: list[str],
    budget: Budget,
    configs: list[dict[str, Any]],
    seed: int,
    backend: str,
    tracker: StudyTracker | None,
    data_root: str | None,
    num_workers: int,
    output: Path,
    stamp: str,
    progress: bool,
    console: Console | None,
    callbacks: Sequence[Any],
    on_arm_done: Callable[[ArmResult, ArmSummary], None] | None,
) -> StudyResult:
    arm_results: dict[str, ArmResult] = {}
    summaries: list[ArmSummary] = []
    fallback_dir = str(output / "mlflow-unsent")
    with Progress(progress, console) as bars:
        for arm in arms:
            arm_run = tracker.arm(arm) if tracker is not None else None
            spec = TrialSpec(
                study=spec_study, arm=arm, budget=budget, seed=seed, data_root=data_root, num_workers=num_workers
            )
            collector = Collector(arm, budget, arm_run, bars, len(configs))
            link = arm_run.link.to_dict() if arm_run is not None else None
            name = f"{definition.name}-{arm}-{stamp}"
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=DeprecationWarning)
                if backend == "ray":
                    from ._ray_backend import run_arm

                    wall = run_arm(
                        arm=arm,
                        spec=spec,
                        configs=configs,
                        link=link,
                        collector=collector,
                        storage=output / "ray",
                        name=name,
                        cpus_per_trial=budget.cpus_per_trial,
                        gpus_per_trial=budget.gpus_per_trial,
                        fallback_dir=fallback_dir,
                        callbacks=callbacks,
                    )
                else:
                    from ._optuna_backend import run_arm as run_arm_optuna

                    wall = run_arm_optuna(
                        arm=arm,
                        spec=spec,
                        configs=configs,
                        link=link,
                        collector=collector,
                        storage=output / "optuna",
                        name=name,
                        n_jobs=max(1, int((os.cpu_count() or 1) // max(budget.cpus_per_trial, 1))),
                        fallback_dir=fallback_dir,
                    )
            arm_result = ArmResult(
                arm=arm,
                records=collector.records(),
                wall_time_s=wall,
                train_fraction=1.0 if arm == "neve" else 1 - budget.val_fraction,
                max_epochs=budget.max_epochs,
            )
            summary = summarize_arm(arm_result)
            arm_results[arm] = arm_result
            summaries.append(summary)
            if arm_run is not None:
                _log_arm(arm_run, arm_result, summary)
            if on_arm_done is not None:
                on_arm_done(arm_result, summary)
    result = StudyResult(
        study=definition.name,
        arms=arm_results,
        summaries=summaries,
        budget=budget,
        seed=seed,
        output_dir=output / f"{definition.name}-{stamp}",
    )
    result.files = write_outputs(result.output_dir, list(arm_results.values()), summaries)
    return result


def _log_arm(arm_run: ArmRun, arm_result: ArmResult, summary: ArmSummary) -> None:
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
    picked = pick_trial(arm_result.arm, arm_result.records)
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
