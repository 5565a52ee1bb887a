"""What a study logs to MLflow in the driver: the study run, each arm's summary, the comparison."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._arm import Arm
from ._compare import ArmSummary, pick_trial
from ._records import ArmResult
from ._spec import search_space_params

if TYPE_CHECKING:
    from ._plan import Plan
    from ._result import StudyResult
    from ._tracking import ArmRun, StudyTracker


def open_tracker(plan: Plan, tracking_uri: str | None) -> StudyTracker:
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
            "backend": plan.backend_name,
            "seed": plan.seeds[0],
            "seeds": ",".join(map(str, plan.seeds)),
            "trials": budget.trials,
            "max_epochs": budget.max_epochs,
            "batch_size": budget.batch_size,
            "momentum": budget.momentum,
            "aux": _described(definition.make_aux, "noise shaped like input_shape"),
            "optimizer": _described(definition.build_optimizer, "SGD (budget momentum, config lr and weight_decay)"),
            **search_space_params(definition.search_space),
        },
        arm_params={arm.name: arm.params(budget) for arm in plan.arms},
        run_name=f"{definition.name}-{plan.stamp}",
        fallback_dir=plan.fallback_dir,
        drain_timeout_s=options.mlflow_drain_timeout_s,
    )


def _described(function: object, default: str) -> str:
    """A study's ``make_aux`` / ``build_optimizer`` as an MLflow param: its qualified name, or the default."""
    if function is None:
        return default
    return f"{getattr(function, '__module__', '?')}.{getattr(function, '__qualname__', repr(function))}"


def abort(tracker: StudyTracker | None, status: str) -> None:
    """End every open run of the study with ``status`` (KILLED on Ctrl-C, FAILED on an error)."""
    if tracker is None:
        return
    for arm_run in tracker.arms.values():
        arm_run.close_open_trials(status)
    tracker.end(status)


def log_arm(arm_run: ArmRun, arm: Arm, arm_result: ArmResult, summary: ArmSummary) -> None:
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
    if arm_result.failure is not None:
        arm_run.set_tags({"error": arm_result.failure[:5000]})
    arm_run.end("FAILED" if arm_result.failure is not None else "FINISHED")


def log_comparison(tracker: StudyTracker, result: StudyResult) -> None:
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


__all__ = ["abort", "log_arm", "log_comparison", "open_tracker"]
