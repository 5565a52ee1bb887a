"""A study's files: the comparison table (Markdown, CSV) and its plots, per seed and over the seeds."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ._compare import ArmSummary, comparison_csv, comparison_markdown
from ._records import ArmResult
from ._seeds import SeedRun, seeds_csv, seeds_markdown, summarize_over_seeds


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


__all__ = ["write_outputs", "write_study_outputs"]
