"""One arm of a study: what it holds out, optimises, picks by, and how each backend runs it (:class:`Arm`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ._keys import STOPPED
from ._policy import NeVePolicy, TrialPolicy
from ._records import TrialRecord
from ._spec import Budget, StudyError

Direction = Literal["minimize", "maximize"]


class UnknownArmError(StudyError, ValueError):
    """The arm name is not registered; the message lists the known arms."""


@dataclass(frozen=True)
class Arm:
    """One arm of a study (immutable; picklable when its callables are module-level functions).

    Attributes:
        name: registry name (``--arms``), the ``arm`` tag of its MLflow runs.
        display_name: label of its plot panels and progress bar.
        color: its matplotlib colour in the study plots.
        policy: the :class:`~neve_tune.studies.TrialPolicy` class its trials train under
            (:class:`~neve_tune.studies.NeVePolicy` or :class:`~neve_tune.studies.FixedSchedulePolicy`).
        holds_out_validation: whether ``budget.val_fraction`` of the training split is held out for
            validation (``False``: the arm trains on all of it and has no validation data).
        objective: the result key its backend optimises and its pruner reads.
        direction: ``"minimize"`` or ``"maximize"`` the objective.
        pick_rule: how it picks the trial it would deploy, in words (the table's footnote).
        pick: that rule: records -> the picked record, or ``None`` when none qualifies. It never reads
            the test accuracy.
        ray_scheduler: budget -> its Ray Tune ``TrialScheduler``.
        optuna_pruner: budget -> its Optuna pruner.
        describe: budget -> its settings as MLflow params (scheduler, LR schedule, ...).
        external_stop_reason: stop reason of a trial its backend stopped (``pruned`` where the backend
            prunes, ``stopped`` otherwise, e.g. Ctrl-C).
        compute_reference: the arm whose trial-epochs the table's "vs fifo" column divides by.
        describe_pick: records -> the pick-rule line saying what actually happened (e.g. "no trial
            converged: ..."); ``None``: the table shows ``pick_rule``.
    """

    name: str
    display_name: str
    color: str
    policy: type[TrialPolicy]
    holds_out_validation: bool
    objective: str
    direction: Direction
    pick_rule: str
    pick: Callable[[Sequence[TrialRecord]], TrialRecord | None]
    ray_scheduler: Callable[[Budget], Any]
    optuna_pruner: Callable[[Budget], Any]
    describe: Callable[[Budget], dict[str, Any]]
    external_stop_reason: str = STOPPED
    compute_reference: bool = False
    describe_pick: Callable[[Sequence[TrialRecord]], str] | None = None

    def __post_init__(self) -> None:
        if not self.name or self.name != self.name.strip().lower() or "," in self.name:
            raise ValueError(f"An arm name must be lower-case, without spaces or commas, but got {self.name!r}.")
        if self.direction not in ("minimize", "maximize"):
            raise ValueError(f"direction must be 'minimize' or 'maximize', but got direction={self.direction!r}.")
        if not (isinstance(self.policy, type) and issubclass(self.policy, TrialPolicy)):
            raise TypeError(f"policy must be a TrialPolicy subclass, but got {self.policy!r}.")

    @property
    def uses_neve(self) -> bool:
        """Whether its trials train under NeVe's policy (rather than a fixed schedule)."""
        return issubclass(self.policy, NeVePolicy)

    @property
    def mode(self) -> Literal["min", "max"]:
        """The direction in Ray Tune's words."""
        return "min" if self.direction == "minimize" else "max"

    def val_fraction(self, budget: Budget) -> float:
        """The fraction of the training split it holds out (0 when it holds out nothing)."""
        return budget.val_fraction if self.holds_out_validation else 0.0

    def train_fraction(self, budget: Budget) -> float:
        """The fraction of the labelled (non-test) data it trains on."""
        return 1 - budget.val_fraction if self.holds_out_validation else 1.0

    def params(self, budget: Budget) -> dict[str, Any]:
        """Its MLflow arm-run params: the common ones, then :attr:`describe`'s."""
        return {
            "arm": self.name,
            "max_epochs": budget.max_epochs,
            "train_fraction": round(self.train_fraction(budget), 6),
            "pick_rule": self.pick_rule,
            **self.describe(budget),
        }


__all__ = ["Arm", "Direction", "UnknownArmError"]
