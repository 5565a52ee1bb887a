"""Study-level figures: test accuracy per epoch for each arm, the compute each arm used, and (several seeds)
each arm's mean and spread over the seeds."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ._arms import find_arm
from ._compare import ArmSummary, pick_trial
from ._records import ArmResult
from ._seeds import ArmOverSeeds

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: Colour of an arm this process does not know (e.g. read back from MLflow).
OTHER_COLOR = "C3"


def _style(arm_name: str) -> tuple[str, str]:
    """(display name, colour) of an arm."""
    arm = find_arm(arm_name)
    return (arm_name, OTHER_COLOR) if arm is None else (arm.display_name, arm.color)


def plot_test_acc_vs_epochs(results: Sequence[ArmResult]) -> Figure:
    """One panel per arm: every trial's test accuracy per epoch (thin), the arm's picked trial in bold.

    The test accuracy is shown for reporting only; no arm ever sees it.
    """
    from matplotlib.figure import Figure

    n = max(1, len(results))
    fig = Figure(figsize=(4.2 * n, 3.6), dpi=100)
    axes = fig.subplots(1, n, sharey=True, squeeze=False)[0]
    for ax, result in zip(axes, results, strict=False):
        picked = pick_trial(result.arm, result.records)
        label, color = _style(result.arm)
        for record in result.records:
            if not record.test_acc_curve:
                continue
            epochs = [e for e, _ in record.test_acc_curve]
            accs = [a if math.isfinite(a) else math.nan for _, a in record.test_acc_curve]
            ax.plot(epochs, accs, color=color, alpha=0.35, lw=1)
            ax.plot(epochs[-1:], accs[-1:], "o", color=color, alpha=0.6, ms=3)
        if picked is not None and picked.test_acc_curve:
            ax.plot(
                [e for e, _ in picked.test_acc_curve],
                [a for _, a in picked.test_acc_curve],
                color="black",
                lw=2,
                label=f"picked: config {picked.config_id} ({picked.test_acc:.3f})",
            )
            ax.legend(fontsize=8, loc="lower right")
        ax.set_title(f"{label} ({len(result.records)} trials)")
        ax.set_xlabel("epoch")
        ax.set_xlim(0, result.max_epochs + 1)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (reported only)")
    fig.tight_layout()
    return fig


def plot_compute(summaries: Sequence[ArmSummary]) -> Figure:
    """Trial-epochs and wall time per arm (bars), with the picked trial's test accuracy on top."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3.6), dpi=100)
    ax1, ax2 = fig.subplots(1, 2)
    styles = [_style(s.arm) for s in summaries]
    arms = [label for label, _ in styles]
    colors = [color for _, color in styles]
    bars = ax1.bar(arms, [s.trial_epochs for s in summaries], color=colors)
    for bar, s in zip(bars, summaries, strict=True):
        label = "n/a" if not math.isfinite(s.picked_test_acc) else f"acc {s.picked_test_acc:.3f}"
        ax1.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax1.set_ylabel("total trial-epochs")
    ax1.set_title("compute (epochs trained)")
    ax2.bar(arms, [s.wall_time_s for s in summaries], color=colors)
    ax2.set_ylabel("wall time (s)")
    ax2.set_title("wall time")
    for ax in (ax1, ax2):
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_over_seeds(over: Sequence[ArmOverSeeds]) -> Figure:
    """Per arm, the mean over seeds (bar) with a sample-std error bar and each seed's value (dots): picked
    test accuracy, trial-epochs and wall time."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 3.6), dpi=100)
    axes = fig.subplots(1, 3)
    styles = [_style(a.arm) for a in over]
    labels = [label for label, _ in styles]
    colors = [color for _, color in styles]
    panels = (
        ("picked_test_acc", "test accuracy of the picked trial", "picked trial (reported only)"),
        ("trial_epochs", "total trial-epochs", "compute (epochs trained)"),
        ("wall_time_s", "wall time (s)", "wall time"),
    )
    seeds = max((len(a.seeds) for a in over), default=0)
    for ax, (key, ylabel, title) in zip(axes, panels, strict=True):
        stats = [getattr(a, key) for a in over]
        means = [s.mean if math.isfinite(s.mean) else 0.0 for s in stats]
        errors = [s.std if math.isfinite(s.std) else 0.0 for s in stats]
        x = list(range(len(over)))
        ax.bar(x, means, yerr=errors, color=colors, alpha=0.75, capsize=6)
        for i, s in enumerate(stats):
            values = [v for v in s.values if math.isfinite(v)]
            ax.plot([i] * len(values), values, "o", color="black", ms=3, alpha=0.7)
        ax.set_xticks(x, labels, rotation=30 if len(over) > 3 else 0, ha="right" if len(over) > 3 else "center")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}\nmean ± std over {seeds} seeds", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        if key == "picked_test_acc":  # zoom on the accuracies (seeds and error bars), not on 0-1
            lows = [v for s in stats for v in (*s.values, s.mean - s.std) if math.isfinite(v)]
            if lows:
                ax.set_ylim(bottom=max(0.0, min(lows) - 0.02))
    fig.tight_layout()
    return fig
