"""The contract between the study runner and a tuning backend (Ray Tune, Optuna): run one arm's job.

The runner calls, in the driver process:

* :meth:`Backend.open` once, before the first arm (after every check that needs no training passed);
* :meth:`Backend.run_arm` once per arm, in the arms' order: run every configuration of the :class:`ArmJob`
  under the arm's scheduler or pruner, feed ``job.collector`` as trials start
  (``collector.started``), report (``collector.result``) and end (``collector.completed``), and return the
  arm's records (:meth:`ArmJob.result`). It raises ``KeyboardInterrupt`` when the arm was interrupted;
* :meth:`Backend.close` once, however the study ended.

Every trial runs :func:`~neve_tune.studies.run_trial` with a backend-specific ``Reporter``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ._arms import Arm
from ._records import ArmResult
from ._spec import Budget
from ._trial import TrialSpec

if TYPE_CHECKING:
    from ._collect import Collector

#: The backends `run_study` knows (``StudyOptions.backend``, ``--backend``).
BACKENDS = ("ray", "optuna")


@dataclass(frozen=True)
class ArmJob:
    """One arm's job: every configuration of one arm, where to write and whom to tell.

    Attributes:
        arm: the arm.
        spec: what every trial needs besides its config (study, arm, budget, seed, data).
        configs: the sampled configurations (the same ones for every arm), each with its ``config_id``.
        collector: the driver-side records and progress of this arm's trials.
        name: the job's name (Ray experiment, Optuna study): ``<study>-<arm>-<stamp>``.
        output: the study's output folder; a backend writes under ``output / <backend name>``.
        link: the MLflow arm run's link, added to every trial config (``None``: not tracked).
        fallback_dir: where trials save MLflow records they could not send.
    """

    arm: Arm
    spec: TrialSpec
    configs: list[dict[str, Any]]
    collector: Collector
    name: str
    output: Path
    link: Mapping[str, Any] | None = None
    fallback_dir: str | None = None

    @property
    def budget(self) -> Budget:
        return self.spec.budget

    def result(self, wall_time_s: float) -> ArmResult:
        """The arm's records, as collected, with its wall time."""
        return ArmResult(
            arm=self.arm.name,
            records=self.collector.records(),
            wall_time_s=wall_time_s,
            train_fraction=self.arm.train_fraction(self.budget),
            max_epochs=self.budget.max_epochs,
            seed=self.spec.seed,
        )


class Backend(ABC):
    """A tuning backend of the study runner (see the module docstring for when each method is called).

    State: a backend holds what it started (e.g. a local Ray) between :meth:`open` and :meth:`close`;
    results live in the collector and in the backend's own storage under the output folder.
    """

    #: The name ``--backend`` and :attr:`StudyOptions.backend` use.
    name: ClassVar[str]

    def open(self, budget: Budget) -> None:  # noqa: B027 - a hook, empty by default
        """Start or connect to what the arms run on, and check that one trial fits (raise ``StudyError``)."""

    @abstractmethod
    def run_arm(self, job: ArmJob) -> ArmResult:
        """Run every configuration of ``job`` and return the arm's records (:meth:`ArmJob.result`)."""

    def close(self) -> None:  # noqa: B027 - a hook, empty by default
        """Release what :meth:`open` started."""


__all__ = ["BACKENDS", "ArmJob", "Backend"]
