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

from dataclasses import replace

from ._arm import Arm, UnknownArmError
from ._keys import PRUNED, STOPPED, TRAIN_LOSS, TRAIN_TSE_EMA, VAL_ACC
from ._policy import AnnealingNeVePolicy, FixedSchedulePolicy, NeVePolicy
from ._records import (
    describe_mean_loss_pick,
    describe_train_loss_pick,
    pick_highest_val_acc,
    pick_lowest_mean_loss,
    pick_lowest_train_loss,
)
from ._schedulefree import SCHEDULEFREE
from ._schedulers import (
    asha_optuna_pruner,
    asha_ray_scheduler,
    describe_asha,
    describe_fifo,
    describe_neve,
    describe_neve_pure,
    fifo_optuna_pruner,
    fifo_ray_scheduler,
    neve_optuna_pruner,
    neve_pure_optuna_pruner,
    neve_pure_ray_scheduler,
    neve_ray_scheduler,
)

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
# The optional arms (not in ARMS, the default --arms) are built in too: every process knows them by name.
_BUILTIN: dict[str, Arm] = {arm.name: arm for arm in (NEVE, ASHA, FIFO, NEVE_PURE, SCHEDULEFREE)}
_REGISTERED: dict[str, Arm] = dict(_BUILTIN)


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
    "Arm",
    "UnknownArmError",
    "find_arm",
    "get_arm",
    "is_builtin",
    "list_arms",
    "register_arm",
]
