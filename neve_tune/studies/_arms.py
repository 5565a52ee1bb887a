"""The arms of a study: what each holds out, optimises, picks by, and how each backend runs it.

An :class:`Arm` is one frozen definition, and everything that differs between arms reads it: the trial
loop (its :class:`~neve_tune.studies.TrialPolicy` and validation hold-out), the Ray Tune backend (its
scheduler), the Optuna backend (its pruner, objective and direction), the comparison (its pick rule) and
the plots (its colour). A new arm is one :func:`register_arm` call.

Built-in arms:

* ``neve``: trains on 100% of the training split (validation-free): NeVe decays its LR, anneals it on
  convergence and stops it, ASHA (Ray) / successive halving (Optuna) prunes trials on their TSE-EMA
  (training-speed estimate, ``train/tse_ema``), and it picks the lowest mean training loss (TSE / epochs);
* ``neve-pure`` (optional, not in the default ``--arms``): the paper's rule alone: NeVe decays the LR
  and stops each trial at its first convergence, no cross-trial pruning, picks the lowest final train loss;
* ``asha``: holds out ``budget.val_fraction`` for validation, a fixed LR schedule, ASHA prunes on
  validation accuracy;
* ``fifo``: ``asha`` without pruning, the compute reference of the table's "vs fifo" column.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from ._keys import PRUNED, STOPPED, TRAIN_LOSS, TRAIN_TSE_EMA, VAL_ACC
from ._policy import AnnealingNeVePolicy, FixedSchedulePolicy, NeVePolicy, TrialPolicy
from ._records import (
    TrialRecord,
    describe_mean_loss_pick,
    describe_train_loss_pick,
    pick_highest_val_acc,
    pick_lowest_mean_loss,
    pick_lowest_train_loss,
)  # fmt: skip
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


# ---------------------------------------------------------------------------- the built-in arms' pieces


def neve_pure_ray_scheduler(budget: Budget) -> Any:
    """:class:`neve_tune.ray.NeVeScheduler` with the budget's cap and stop threshold."""
    from neve_tune.ray import NeVeScheduler

    return NeVeScheduler(max_t=budget.max_epochs, grace_period=1, stop_threshold=budget.neve.stop_threshold)


def neve_ray_scheduler(budget: Budget) -> Any:
    """:class:`neve_tune.ray.NeVeScheduler` composed with Ray's ``ASHAScheduler`` ranking TSE-EMA (lower is
    better), with the budget's cap, grace period and reduction factor (ASHA's, on a validation-free signal)."""
    from ray.tune.schedulers import ASHAScheduler

    from neve_tune.ray import NeVeScheduler

    base = ASHAScheduler(
        time_attr="training_iteration",
        metric=TRAIN_TSE_EMA,
        mode="min",
        max_t=budget.max_epochs,
        grace_period=min(budget.grace_period, budget.max_epochs),
        reduction_factor=budget.reduction_factor,
    )
    return NeVeScheduler(
        max_t=budget.max_epochs, grace_period=1, stop_threshold=budget.neve.stop_threshold, base_scheduler=base
    )


def asha_ray_scheduler(budget: Budget) -> Any:
    """Ray's ``ASHAScheduler`` on validation accuracy, with the budget's grace period and reduction factor."""
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr="training_iteration",
        metric=VAL_ACC,
        mode="max",
        max_t=budget.max_epochs,
        grace_period=min(budget.grace_period, budget.max_epochs),
        reduction_factor=budget.reduction_factor,
    )


def fifo_ray_scheduler(budget: Budget) -> Any:
    """Ray's ``FIFOScheduler``: every trial runs to its end."""
    from ray.tune.schedulers import FIFOScheduler

    return FIFOScheduler()


def neve_pure_optuna_pruner(budget: Budget) -> Any:
    """:class:`neve_tune.optuna.NeVePruner`, following each trial's own NeVe (converged trials COMPLETE)."""
    from neve_tune.optuna import NeVePruner

    return NeVePruner(stop_threshold=budget.neve.stop_threshold)  # the trials' own value: warns on a mismatch


def neve_optuna_pruner(budget: Budget) -> Any:
    """:class:`neve_tune.optuna.NeVePruner` over Optuna's ``SuccessiveHalvingPruner`` on the reported value
    (the arm's objective, TSE-EMA), with the budget's grace period and reduction factor."""
    import optuna

    from neve_tune.optuna import NeVePruner

    base = optuna.pruners.SuccessiveHalvingPruner(
        min_resource=budget.grace_period, reduction_factor=budget.reduction_factor
    )
    return NeVePruner(stop_threshold=budget.neve.stop_threshold, base_pruner=base)


def asha_optuna_pruner(budget: Budget) -> Any:
    """Optuna's ``SuccessiveHalvingPruner`` (asynchronous successive halving) on the reported value."""
    import optuna

    return optuna.pruners.SuccessiveHalvingPruner(
        min_resource=budget.grace_period, reduction_factor=budget.reduction_factor
    )


def fifo_optuna_pruner(budget: Budget) -> Any:
    """Optuna's ``NopPruner``."""
    import optuna

    return optuna.pruners.NopPruner()


def describe_neve_pure(budget: Budget) -> dict[str, Any]:
    n = budget.neve
    return {
        "scheduler": "NeVeScheduler",
        "lr_schedule": "NeVe (plateau on velocity change)",
        "patience": n.patience,
        "factor": n.factor,
        "stop_threshold": n.stop_threshold,
        "velocity_momentum": n.momentum,
        "aux": "noise",
        "aux_samples": n.aux_samples,
    }


def describe_asha(budget: Budget) -> dict[str, Any]:
    return {
        "scheduler": "ASHAScheduler",
        "metric": VAL_ACC,
        "lr_schedule": budget.lr_schedule,
        "grace_period": budget.grace_period,
        "reduction_factor": budget.reduction_factor,
        "val_fraction": budget.val_fraction,
    }


def describe_fifo(budget: Budget) -> dict[str, Any]:
    return {"scheduler": "FIFOScheduler", "lr_schedule": budget.lr_schedule, "val_fraction": budget.val_fraction}


def describe_neve(budget: Budget) -> dict[str, Any]:
    return {
        **describe_neve_pure(budget),
        "scheduler": "NeVeScheduler + ASHAScheduler",
        "lr_schedule": (
            "NeVe (plateau on velocity change), anneal on convergence (linear, max(3, t/10) epochs;"
            " into the cap over its last 20%)"
        ),
        "metric": TRAIN_TSE_EMA,
        "grace_period": budget.grace_period,
        "reduction_factor": budget.reduction_factor,
    }


_VALIDATION_PICK_RULE = "highest validation accuracy at the trial's last epoch"

NEVE = Arm(
    name="neve",
    display_name="neve",
    color="C0",
    policy=AnnealingNeVePolicy,
    holds_out_validation=False,
    objective=TRAIN_TSE_EMA,
    direction="minimize",
    pick_rule="lowest mean training loss (TSE / epochs) among converged / max_t trials (validation-free)",
    pick=pick_lowest_mean_loss,
    describe_pick=describe_mean_loss_pick,
    ray_scheduler=neve_ray_scheduler,
    optuna_pruner=neve_optuna_pruner,
    describe=describe_neve,
    external_stop_reason=PRUNED,
)
# The paper's rule alone (the neve arm before issue 14): no anneal, no cross-trial pruning, lowest train loss.
NEVE_PURE = replace(
    NEVE,
    name="neve-pure",
    display_name="neve-pure",
    color="C4",
    policy=NeVePolicy,
    objective=TRAIN_LOSS,
    pick_rule="lowest final train loss among converged trials (validation-free)",
    pick=pick_lowest_train_loss,
    describe_pick=describe_train_loss_pick,
    ray_scheduler=neve_pure_ray_scheduler,
    optuna_pruner=neve_pure_optuna_pruner,
    describe=describe_neve_pure,
    external_stop_reason=STOPPED,
)
ASHA = Arm(
    name="asha",
    display_name="asha",
    color="C1",
    policy=FixedSchedulePolicy,
    holds_out_validation=True,
    objective=VAL_ACC,
    direction="maximize",
    pick_rule=_VALIDATION_PICK_RULE,
    pick=pick_highest_val_acc,
    ray_scheduler=asha_ray_scheduler,
    optuna_pruner=asha_optuna_pruner,
    describe=describe_asha,
    external_stop_reason=PRUNED,
)
# FIFO is ASHA's validation arm without the pruning: the same hold-out, objective and pick rule.
FIFO = replace(
    ASHA,
    name="fifo",
    display_name="fifo",
    color="C2",
    ray_scheduler=fifo_ray_scheduler,
    optuna_pruner=fifo_optuna_pruner,
    describe=describe_fifo,
    external_stop_reason=STOPPED,
    compute_reference=True,
)

#: The built-in arms' names, in their default order (``neve-tune study run --arms``).
ARMS: tuple[str, ...] = (NEVE.name, ASHA.name, FIFO.name)
_BUILTIN: dict[str, Arm] = {arm.name: arm for arm in (NEVE, ASHA, FIFO, NEVE_PURE)}
_REGISTERED: dict[str, Arm] = dict(_BUILTIN)

#: Arm name -> its pick rule in words (kept in step with the registry).
PICK_RULES: dict[str, str] = {name: arm.pick_rule for name, arm in _REGISTERED.items()}


def register_arm(arm: Arm, *, replace: bool = False) -> None:
    """Make ``arm`` available by its name (``run_study(arms=...)``, ``--arms``).

    A trial runs in another process under Ray: the runner sends it the :class:`Arm` itself when it is not
    a built-in one, so define its callables at module level (they pickle by reference).
    """
    if not isinstance(arm, Arm):
        raise TypeError(f"{type(arm).__name__} is not an Arm")
    if not replace and arm.name in _REGISTERED:
        raise ValueError(f"An arm named {arm.name!r} exists already; pass replace=True to override it.")
    _REGISTERED[arm.name] = arm
    PICK_RULES[arm.name] = arm.pick_rule


def list_arms() -> list[str]:
    """The names of every known arm (built-in ones first, then in registration order)."""
    return list(_REGISTERED)


def find_arm(name: str) -> Arm | None:
    """The arm called ``name``, or ``None`` (e.g. an arm of a stored study this process does not know)."""
    return _REGISTERED.get(name)


def get_arm(arm: str | Arm) -> Arm:
    """The arm called ``arm`` (case and surrounding spaces ignored); an :class:`Arm` is returned as is.

    Raises:
        UnknownArmError: no such arm (the message lists the known ones).
    """
    if isinstance(arm, Arm):
        return arm
    name = str(arm).strip().lower()
    found = _REGISTERED.get(name)
    if found is None:
        raise UnknownArmError(f"Unknown arm {name!r}. The arms are: {', '.join(_REGISTERED)}.")
    return found


def is_builtin(arm: Arm) -> bool:
    """Whether ``arm`` is one of the built-in arms (which every process knows by name)."""
    return _BUILTIN.get(arm.name) is arm


__all__ = [
    "ARMS",
    "ASHA",
    "FIFO",
    "NEVE",
    "NEVE_PURE",
    "PICK_RULES",
    "Arm",
    "UnknownArmError",
    "find_arm",
    "get_arm",
    "is_builtin",
    "list_arms",
    "register_arm",
]

# The optional arms (not in ARMS, the default --arms): defined on the pieces above, registered by name.
from ._schedulefree import SCHEDULEFREE  # noqa: E402 - needs Arm and the FIFO schedulers defined above

register_arm(SCHEDULEFREE)
