"""Run a study: every arm on the same sampled configurations, on Ray Tune (or Optuna), tracked in MLflow.

Everything that can fail without training is checked first (study name, arms, seeds, backend, resources,
tracking URI scheme, tracking store, data), so a bad option loses nothing. With several seeds the whole
study is repeated once per seed and the result holds each seed's table and the table over seeds.
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
from ._options import StudyOptions, check_resources, check_seeds, check_tracking_scheme
from ._records import ArmResult
from ._registry import BUILTIN_STUDIES, get_study
from ._seeds import ArmOverSeeds, SeedRun, seeds_csv, seeds_markdown, seeds_table, summarize_over_seeds
from ._spec import Budget, StudyDefinition, StudyError, search_space_params
from ._trial import TrialSpec

if TYPE_CHECKING:
    from rich.table import Table

    from ._tracking import ArmRun, StudyTracker


@dataclass
class StudyResult:
    """What :func:`run_study` returns: per-seed, per-arm records, the comparison rows and where things were logged.

    ``runs`` holds one :class:`SeedRun` per seed (records and comparison rows); ``arms``, ``summaries`` and
    ``seed`` are the first seed's (the whole study with one seed). :attr:`over_seeds` is each arm's mean and
    spread over the seeds; ``table``/``markdown``/``csv`` are the table over seeds when there are several.

    NaN policy: as :func:`summarize_arm` (NaN where no trial qualifies). State: plain data; the same tables
    are rebuilt from MLflow by ``neve-tune study compare``.
    """

    study: str
    runs: list[SeedRun]
    budget: Budget
    output_dir: Path
    tracking_uri: str | None = None
    experiment_id: str | None = None
    study_run_id: str | None = None
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def seeds(self) -> tuple[int, ...]:
        return tuple(run.seed for run in self.runs)

    @property
    def seed(self) -> int:
        """The first seed."""
        return self.runs[0].seed

    @property
    def arms(self) -> dict[str, ArmResult]:
        """The first seed's records, by arm."""
        return self.runs[0].arms

    @property
    def summaries(self) -> list[ArmSummary]:
        """The first seed's comparison rows."""
        return self.runs[0].summaries

    @property
    def over_seeds(self) -> list[ArmOverSeeds]:
        """Each arm's mean and spread over the seeds (one value each with one seed)."""
        return summarize_over_seeds(self.runs)

    def table(self) -> Table:
        """The comparison as a rich table (over seeds when there are several)."""
        if len(self.runs) > 1:
            return seeds_table(self.runs, title=self.title)
        return comparison_table(self.summaries, title=self.title)

    def markdown(self) -> str:
        return seeds_markdown(self.runs) if len(self.runs) > 1 else comparison_markdown(self.summaries)

    def csv(self) -> str:
        return seeds_csv(self.runs) if len(self.runs) > 1 else comparison_csv(self.summaries)

    @property
    def title(self) -> str:
        b = self.budget
        seeds = f"seed {self.seed}" if len(self.runs) == 1 else f"seeds {','.join(map(str, self.seeds))}"
        return f"{self.study}: {b.trials} trials x <= {b.max_epochs} epochs per arm, {seeds}"

    def seed_title(self, run: SeedRun) -> str:
        """The title of one seed's table."""
        b = self.budget
        return f"{self.study}: {b.trials} trials x <= {b.max_epochs} epochs per arm, seed {run.seed}"


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
    for arm in out:
        arm.policy.check_available()  # e.g. the schedulefree package
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
    seeds: tuple[int, ...]
    options: StudyOptions
    output: Path
    stamp: str

    @property
    def fallback_dir(self) -> Path:
        return self.output / "mlflow-unsent"


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

    Raises:
        UnknownStudyError, StudyError, TrackingUnavailableError: before any training.
    """
    options = replace(options or StudyOptions(), **changes)
    definition, spec_study = _resolve(study)
    arms = check_arms(options.arms)
    seeds = check_seeds(options)
    check_backend(options.backend)
    budget = _budget(definition, options)
    check_resources(budget, options)
    if options.track:
        check_tracking_scheme(options.tracking_uri)
    plan = _Plan(
        definition=definition,
        spec_study=spec_study,
        arms=arms,
        budget=budget,
        seeds=seeds,
        options=options,
        output=Path(options.output_dir).resolve(),
        stamp=time.strftime("%Y%m%d-%H%M%S"),
    )
    if definition.prepare is not None:  # before the store is touched: a missing package creates no mlflow.db
        definition.prepare(options.data_root)
    resolved_uri = None
    if options.track:
        from neve_tune.mlflow import check_tracking_uri

        resolved_uri = check_tracking_uri(options.tracking_uri)
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
        seeds=plan.seeds,
        params={
            "study": definition.name,
            "backend": options.backend,
            "seed": plan.seeds[0],
            "seeds": ",".join(map(str, plan.seeds)),
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


def _run_seed(plan: _Plan, seed: int, backend: Backend, tracker: StudyTracker | None, bars: Progress) -> SeedRun:
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
            _log_arm(arm_run, arm, arm_result, summary)
        if options.on_arm_done is not None:
            options.on_arm_done(arm_result, summary)
    return SeedRun(seed=seed, arms=arm_results, summaries=summaries)


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


def write_study_outputs(folder: Path, runs: Sequence[SeedRun]) -> dict[str, Path]:
    """The study's files: :func:`write_outputs` for one seed; with several, each seed's in ``seed-S/`` and,
    in ``folder``, the table over seeds (comparison.md/.csv) and its plot (``seeds_per_arm.png``)."""
    if len(runs) == 1:
        return write_outputs(folder, list(runs[0].arms.values()), runs[0].summaries)
    from neve_tune.mlflow._plots import PLOT_LOCK

    from ._plots import plot_over_seeds

    files: dict[str, Path] = {}
    for run in runs:
        for name, path in write_outputs(folder / f"seed-{run.seed}", list(run.arms.values()), run.summaries).items():
            files[f"seed-{run.seed}/{name}"] = path
    files["comparison.md"], files["comparison.csv"] = folder / "comparison.md", folder / "comparison.csv"
    files["comparison.md"].write_text(seeds_markdown(runs))
    files["comparison.csv"].write_text(seeds_csv(runs))
    files["seeds_per_arm.png"] = folder / "seeds_per_arm.png"
    with PLOT_LOCK:
        plot_over_seeds(summarize_over_seeds(runs)).savefig(files["seeds_per_arm.png"])
    return files


def _log_comparison(tracker: StudyTracker, result: StudyResult) -> None:
    tracker.log_text(result.markdown(), "comparison.md")
    tracker.log_text(result.csv(), "comparison.csv")
    for name, path in result.files.items():
        if name.endswith(".png"):
            tracker.log_artifact(path, "/".join(("plots", *name.split("/")[:-1])))
    several = len(result.runs) > 1
    for run in result.runs:
        metrics: dict[str, float] = {}
        for s in run.summaries:
            metrics[f"{s.arm}.picked_test_acc"] = s.picked_test_acc
            metrics[f"{s.arm}.median_test_acc"] = s.median_test_acc
            metrics[f"{s.arm}.trial_epochs"] = s.trial_epochs
            metrics[f"{s.arm}.wall_time_s"] = s.wall_time_s
        tracker.log_metrics(metrics, step=run.seed if several else 0)
    if several:
        spread: dict[str, float] = {}
        for a in result.over_seeds:
            for key in ("picked_test_acc", "trial_epochs", "wall_time_s"):
                stat = getattr(a, key)
                spread[f"{a.arm}.{key}.mean"], spread[f"{a.arm}.{key}.std"] = stat.mean, stat.std
        tracker.log_metrics(spread)


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
