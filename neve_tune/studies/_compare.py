"""The comparison of study arms, from plain per-trial records (Ray results or MLflow runs alike).

Each arm picks the trial it would deploy by its own rule (:attr:`Arm.pick`), using only what that arm is
allowed to see:

* ``neve``: no validation data exists. Among the trials that converged or ran to the epoch cap (stalled,
  collapsed, diverged and pruned trials are never picked), the one with the lowest mean training loss over
  its epochs (``train/tse`` / epochs: a training-speed estimate; ``studies/ranking_signals.md`` measures
  it against the others). Ties:
  fewer epochs, then lower config id. The pick-rule line says which trials qualified.
* ``neve-pure`` (the paper's rule alone): among the *converged* trials, the lowest final training loss; if
  none converged, among those that ran to the cap, and the pick-rule line says so. A fit criterion, not a
  generalisation estimate.
* ``schedulefree``: the lowest final training loss at the fixed budget.
* ``asha`` and ``fifo``: the highest validation accuracy at the trial's last epoch (ties: lower
  validation loss, fewer epochs, lower config id), i.e. ``ResultGrid.get_best_result(scope="last")``.

The test accuracy is only reported: it never picks a trial or stops one.
"""

from __future__ import annotations

import csv
import io
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ._arms import Arm, find_arm
from ._records import ArmResult, TrialRecord, pick_highest_val_acc

if TYPE_CHECKING:
    from rich.table import Table


@dataclass(frozen=True)
class ArmSummary:
    """One row of the comparison table (NaN where no trial qualifies, e.g. no pick; immutable)."""

    arm: str
    trials: int
    picked_config_id: int | None
    picked_test_acc: float
    median_test_acc: float
    q1_test_acc: float
    q3_test_acc: float
    min_test_acc: float
    max_test_acc: float
    trial_epochs: int
    wall_time_s: float
    train_fraction: float
    stop_epochs: tuple[int, ...]
    stop_reasons: dict[str, int]
    pick_rule: str
    compute_reference: bool = False

    @property
    def stop_epochs_text(self) -> str:
        if not self.stop_epochs:
            return "-"
        e = sorted(self.stop_epochs)
        [median] = _quantiles([float(x) for x in e], (0.5,))
        return f"{e[0]}-{e[-1]} (med {median:g})"

    @property
    def stop_reasons_text(self) -> str:
        return ", ".join(f"{reason} {n}" for reason, n in sorted(self.stop_reasons.items(), key=lambda kv: -kv[1]))

    def as_row(self, reference_epochs: int | None = None) -> dict[str, Any]:
        """The row as plain values (for CSV/markdown)."""
        return {
            "arm": self.arm,
            "trials": self.trials,
            "picked_config": "-" if self.picked_config_id is None else self.picked_config_id,
            "picked_test_acc": _r(self.picked_test_acc),
            "median_test_acc": _r(self.median_test_acc),
            "iqr_test_acc": f"{_r(self.q1_test_acc)}-{_r(self.q3_test_acc)}",
            "min_max_test_acc": f"{_r(self.min_test_acc)}-{_r(self.max_test_acc)}",
            "trial_epochs": self.trial_epochs,
            "compute_vs_fifo": "-" if not reference_epochs else f"{self.trial_epochs / reference_epochs:.2f}",
            "wall_time_s": "nan" if not math.isfinite(self.wall_time_s) else round(self.wall_time_s, 1),
            "train_fraction": round(self.train_fraction, 3),
            "stop_epochs": self.stop_epochs_text,
            "stop_reasons": self.stop_reasons_text,
            "pick_rule": self.pick_rule,
        }


def _r(x: float) -> str:
    return "nan" if not math.isfinite(x) else f"{x:.3f}"


def _quantiles(values: Sequence[float], qs: Sequence[float]) -> list[float]:
    """``numpy.nanquantile`` (linear interpolation) over the finite values; NaN for each q when none is."""
    finite = np.array([v if math.isfinite(v) else math.nan for v in values], dtype=float)
    if not np.isfinite(finite).any():
        return [math.nan] * len(qs)
    return [float(x) for x in np.nanquantile(finite, qs)]


def pick_trial(arm: str | Arm, records: Sequence[TrialRecord]) -> TrialRecord | None:
    """The trial ``arm`` would pick, by its rule (never by test accuracy); ``None`` if none qualifies.

    An arm this process does not know (e.g. read back from MLflow) picks by validation accuracy.
    """
    found = arm if isinstance(arm, Arm) else find_arm(arm)
    return (found.pick if found is not None else pick_highest_val_acc)(records)


def summarize_arm(result: ArmResult, arm: Arm | None = None) -> ArmSummary:
    """The comparison row of one arm (``arm``: its definition, default: the registered arm of that name).

    NaN policy: NaN test accuracies are left out of the quantiles and the min-max; NaN where none is left.
    """
    records = result.records
    arm = arm or find_arm(result.arm)
    picked = pick_trial(arm or result.arm, records)
    accs = [r.test_acc for r in records]
    finite = [a for a in accs if math.isfinite(a)]
    q1, median, q3 = _quantiles(accs, (0.25, 0.5, 0.75))
    return ArmSummary(
        arm=result.arm,
        trials=len(records),
        picked_config_id=None if picked is None else picked.config_id,
        picked_test_acc=math.nan if picked is None else picked.test_acc,
        median_test_acc=median,
        q1_test_acc=q1,
        q3_test_acc=q3,
        min_test_acc=min(finite) if finite else math.nan,
        max_test_acc=max(finite) if finite else math.nan,
        trial_epochs=sum(r.epochs for r in records),
        wall_time_s=result.wall_time_s,
        train_fraction=result.train_fraction,
        stop_epochs=tuple(sorted(r.epochs for r in records)),
        stop_reasons=dict(Counter(r.stop_reason for r in records)),
        pick_rule="-" if arm is None else (arm.describe_pick or (lambda _: arm.pick_rule))(records),
        compute_reference=arm is not None and arm.compute_reference,
    )


def _reference_epochs(summaries: Sequence[ArmSummary]) -> int | None:
    for s in summaries:
        if s.compute_reference:
            return s.trial_epochs or None
    return None


def comparison_rows(summaries: Sequence[ArmSummary]) -> list[dict[str, Any]]:
    ref = _reference_epochs(summaries)
    return [s.as_row(ref) for s in summaries]


_HEADERS = {
    "arm": "arm",
    "trials": "trials",
    "picked_config": "picked",
    "picked_test_acc": "test acc (picked)",
    "median_test_acc": "test acc median",
    "iqr_test_acc": "IQR",
    "min_max_test_acc": "min-max",
    "trial_epochs": "trial-epochs",
    "compute_vs_fifo": "vs fifo",
    "wall_time_s": "wall s",
    "train_fraction": "train data",
    "stop_epochs": "stop epochs",
    "stop_reasons": "stop reasons",
}


def comparison_markdown(summaries: Sequence[ArmSummary]) -> str:
    """The table as GitHub markdown, followed by the pick rules."""
    rows = comparison_rows(summaries)
    lines = [
        "| " + " | ".join(_HEADERS.values()) + " |",
        "|" + "|".join("---" for _ in _HEADERS) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(str(row[k]) for k in _HEADERS) + " |")
    lines.append("")
    for s in summaries:
        lines.append(f"- pick rule, {s.arm}: {s.pick_rule}")
    return "\n".join(lines) + "\n"


def comparison_csv(summaries: Sequence[ArmSummary]) -> str:
    """The table as CSV (every column, including the pick rule)."""
    return rows_csv(comparison_rows(summaries))


def rows_csv(rows: Sequence[dict[str, Any]]) -> str:
    """Table rows (dicts with the same keys) as CSV text with a header; empty text for no rows."""
    out = io.StringIO()
    if rows:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return out.getvalue()


def comparison_table(summaries: Sequence[ArmSummary], *, title: str | None = None) -> Table:
    """The table for a terminal (rich); compacter than the markdown/CSV (same numbers)."""
    from rich.table import Table

    table = Table(title=title, header_style="bold", title_style="bold")
    columns = [
        ("arm", "left"),
        ("trials", "right"),
        ("picked\nconfig", "right"),
        ("test acc\n(picked)", "right"),
        ("test acc\nmedian [IQR]", "right"),
        ("test acc\nmin-max", "right"),
        ("trial-epochs\n(vs fifo)", "right"),
        ("wall\ntime s", "right"),
        ("train\ndata", "right"),
        ("stop epochs", "left"),
        ("stop reasons", "left"),
    ]
    for header, justify in columns:
        table.add_column(header, justify=justify)  # type: ignore[arg-type]
    for row in comparison_rows(summaries):
        ratio = "" if row["compute_vs_fifo"] == "-" else f" ({row['compute_vs_fifo']}x)"
        table.add_row(
            str(row["arm"]),
            str(row["trials"]),
            str(row["picked_config"]),
            str(row["picked_test_acc"]),
            f"{row['median_test_acc']} [{row['iqr_test_acc']}]",
            str(row["min_max_test_acc"]),
            f"{row['trial_epochs']}{ratio}",
            str(row["wall_time_s"]),
            f"{100 * float(row['train_fraction']):.0f}%",
            str(row["stop_epochs"]),
            str(row["stop_reasons"]),
        )
    return table
