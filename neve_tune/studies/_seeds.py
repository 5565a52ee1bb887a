"""A study over several seeds: each seed's comparison, and each arm's mean and spread over the seeds.

``run_study(..., seeds=(0, 1, 2))`` repeats the whole study once per seed (its own sampled configurations
and trial seeds); the table over seeds reports, per arm, the mean, sample standard deviation and min-max
of each seed's picked test accuracy, trial-epochs and wall time. ``neve-tune study compare`` rebuilds it
from MLflow with the same functions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ._compare import ArmSummary, _r, comparison_markdown, rows_csv
from ._records import ArmResult

if TYPE_CHECKING:
    from rich.table import Table


@dataclass(frozen=True)
class SeedRun:
    """One seed of a study: each arm's records and its comparison row (the table of that seed)."""

    seed: int
    arms: dict[str, ArmResult]
    summaries: list[ArmSummary]


@dataclass(frozen=True)
class Spread:
    """One quantity over seeds: the per-seed values, their mean, sample std (ddof 1) and range.

    NaN policy: non-finite values are left out; NaN where no finite value is left (std: fewer than two).
    """

    values: tuple[float, ...]

    @property
    def _finite(self) -> np.ndarray:
        return np.array([v for v in self.values if math.isfinite(v)], dtype=float)

    @property
    def mean(self) -> float:
        f = self._finite
        return float(f.mean()) if len(f) else math.nan

    @property
    def std(self) -> float:
        f = self._finite
        return float(f.std(ddof=1)) if len(f) > 1 else math.nan

    @property
    def min(self) -> float:
        f = self._finite
        return float(f.min()) if len(f) else math.nan

    @property
    def max(self) -> float:
        f = self._finite
        return float(f.max()) if len(f) else math.nan

    def text(self, digits: int) -> str:
        """``mean ± std`` with ``digits`` decimals (``nan`` where not finite)."""

        def fmt(x: float) -> str:
            return "nan" if not math.isfinite(x) else f"{x:.{digits}f}"

        return f"{fmt(self.mean)} ± {fmt(self.std)}"

    def range_text(self, digits: int) -> str:
        def fmt(x: float) -> str:
            return "nan" if not math.isfinite(x) else f"{x:.{digits}f}"

        return f"{fmt(self.min)}-{fmt(self.max)}"


@dataclass(frozen=True)
class ArmOverSeeds:
    """One arm's row of the table over seeds: the picked test accuracy, trial-epochs and wall time of each
    seed's comparison row, and their spread (immutable)."""

    arm: str
    seeds: tuple[int, ...]
    trials: int
    picked_test_acc: Spread
    median_test_acc: Spread
    trial_epochs: Spread
    wall_time_s: Spread
    train_fraction: float
    compute_reference: bool = False

    def as_row(self, reference_epochs: float | None = None) -> dict[str, Any]:
        """The row as plain values (CSV/markdown); ``compute_vs_fifo``: mean trial-epochs over the reference's."""
        p, m, e, w = self.picked_test_acc, self.median_test_acc, self.trial_epochs, self.wall_time_s
        ratio = "-" if not reference_epochs or not math.isfinite(e.mean) else f"{e.mean / reference_epochs:.2f}"
        return {
            "arm": self.arm,
            "seeds": len(self.seeds),
            "trials": self.trials,
            "picked_test_acc_mean": _r(p.mean),
            "picked_test_acc_std": _r(p.std),
            "picked_test_acc_min_max": p.range_text(3),
            "median_test_acc_mean": _r(m.mean),
            "trial_epochs_mean": _f1(e.mean),
            "trial_epochs_std": _f1(e.std),
            "trial_epochs_min_max": e.range_text(0),
            "compute_vs_fifo": ratio,
            "wall_time_s_mean": _f1(w.mean),
            "wall_time_s_std": _f1(w.std),
            "wall_time_s_min_max": w.range_text(1),
            "train_fraction": round(self.train_fraction, 3),
            "picked_test_acc_per_seed": " ".join(_r(v) for v in p.values),
            "trial_epochs_per_seed": " ".join(str(int(v)) for v in e.values),
        }


def _f1(x: float) -> str:
    return "nan" if not math.isfinite(x) else f"{x:.1f}"


def summarize_over_seeds(runs: Sequence[SeedRun]) -> list[ArmOverSeeds]:
    """Each arm's spread over the seeds of ``runs`` (arms in the first seed's order; an arm missing from a
    seed contributes nothing for that seed)."""
    order: list[str] = []
    for run in runs:
        order += [s.arm for s in run.summaries if s.arm not in order]
    out = []
    for arm in order:
        rows = [(run.seed, s) for run in runs for s in run.summaries if s.arm == arm]
        out.append(
            ArmOverSeeds(
                arm=arm,
                seeds=tuple(seed for seed, _ in rows),
                trials=max(s.trials for _, s in rows),
                picked_test_acc=Spread(tuple(s.picked_test_acc for _, s in rows)),
                median_test_acc=Spread(tuple(s.median_test_acc for _, s in rows)),
                trial_epochs=Spread(tuple(float(s.trial_epochs) for _, s in rows)),
                wall_time_s=Spread(tuple(s.wall_time_s for _, s in rows)),
                train_fraction=rows[0][1].train_fraction,
                compute_reference=rows[0][1].compute_reference,
            )
        )
    return out


def seeds_rows(over: Sequence[ArmOverSeeds]) -> list[dict[str, Any]]:
    ref = next((a.trial_epochs.mean for a in over if a.compute_reference), None)
    return [a.as_row(ref if ref and math.isfinite(ref) else None) for a in over]


_SEED_HEADERS = {
    "arm": "arm",
    "seeds": "seeds",
    "trials": "trials",
    "picked_test_acc": "test acc (picked) mean ± std",
    "picked_test_acc_min_max": "min-max",
    "median_test_acc_mean": "test acc median (mean)",
    "trial_epochs": "trial-epochs mean ± std",
    "trial_epochs_min_max": "min-max",
    "compute_vs_fifo": "vs fifo",
    "wall_time_s": "wall s mean ± std",
    "wall_time_s_min_max": "min-max",
    "picked_test_acc_per_seed": "test acc (picked) per seed",
}


def _seed_cell(row: dict[str, Any], key: str) -> str:
    if key in ("picked_test_acc", "trial_epochs", "wall_time_s"):
        return f"{row[key + '_mean']} ± {row[key + '_std']}"
    return str(row[key])


def seeds_markdown(runs: Sequence[SeedRun]) -> str:
    """The table over seeds, then each seed's own table (:func:`comparison_markdown`), as GitHub markdown."""
    over = summarize_over_seeds(runs)
    seeds = ", ".join(str(r.seed) for r in runs)
    lines = [
        f"Over {len(runs)} seeds ({seeds}): mean ± sample std and min-max of each seed's row.",
        "",
        "| " + " | ".join(_SEED_HEADERS.values()) + " |",
        "|" + "|".join("---" for _ in _SEED_HEADERS) + "|",
    ]
    for row in seeds_rows(over):
        lines.append("| " + " | ".join(_seed_cell(row, k) for k in _SEED_HEADERS) + " |")
    for run in runs:
        lines += ["", f"### seed {run.seed}", "", comparison_markdown(run.summaries).rstrip("\n")]
    return "\n".join(lines) + "\n"


def seeds_csv(runs: Sequence[SeedRun]) -> str:
    """The table over seeds as CSV (one row per arm, every column)."""
    return rows_csv(seeds_rows(summarize_over_seeds(runs)))


def seeds_table(runs: Sequence[SeedRun], *, title: str | None = None) -> Table:
    """The table over seeds for a terminal (rich); the same numbers as :func:`seeds_markdown`."""
    from rich.table import Table

    table = Table(title=title, header_style="bold", title_style="bold")
    columns = [
        ("arm", "left"),
        ("seeds x\ntrials", "right"),
        ("test acc (picked)\nmean ± std", "right"),
        ("test acc (picked)\nmin-max", "right"),
        ("trial-epochs\nmean ± std (vs fifo)", "right"),
        ("trial-epochs\nmin-max", "right"),
        ("wall time s\nmean ± std", "right"),
        ("wall time s\nmin-max", "right"),
        ("train\ndata", "right"),
    ]
    for header, justify in columns:
        table.add_column(header, justify=justify)  # type: ignore[arg-type]
    for row in seeds_rows(summarize_over_seeds(runs)):
        ratio = "" if row["compute_vs_fifo"] == "-" else f" ({row['compute_vs_fifo']}x)"
        table.add_row(
            str(row["arm"]),
            f"{row['seeds']} x {row['trials']}",
            _seed_cell(row, "picked_test_acc"),
            str(row["picked_test_acc_min_max"]),
            _seed_cell(row, "trial_epochs") + ratio,
            str(row["trial_epochs_min_max"]),
            _seed_cell(row, "wall_time_s"),
            str(row["wall_time_s_min_max"]),
            f"{100 * float(row['train_fraction']):.0f}%",
        )
    return table


__all__ = [
    "ArmOverSeeds",
    "SeedRun",
    "Spread",
    "seeds_csv",
    "seeds_markdown",
    "seeds_rows",
    "seeds_table",
    "summarize_over_seeds",
]
