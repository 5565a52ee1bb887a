"""What :func:`~neve_tune.studies.run_study` returns: each seed's records and tables, and where they went."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ._compare import ArmSummary, comparison_csv, comparison_markdown, comparison_table
from ._records import ArmResult
from ._seeds import ArmOverSeeds, SeedRun, seeds_csv, seeds_markdown, seeds_table, summarize_over_seeds
from ._spec import Budget

if TYPE_CHECKING:
    from rich.table import Table


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
    def failures(self) -> list[str]:
        """One line per arm (and seed) whose every trial failed: the first error and where the full one is.
        Empty when every arm ran; ``neve-tune study run`` exits 1 otherwise."""
        several = len(self.runs) > 1
        return [
            f"the {arm.arm} arm{f' (seed {run.seed})' if several else ''}: {arm.failure}"
            for run in self.runs
            for arm in run.arms.values()
            if arm.failure is not None
        ]

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


__all__ = ["StudyResult"]
