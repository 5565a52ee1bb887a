"""The built-in arms' pieces: each backend's scheduler or pruner and the MLflow params of each arm.

Each is a module-level function of the budget (it pickles by reference to Ray workers) and imports Ray or
Optuna only when called.
"""

from __future__ import annotations

from typing import Any

from ._keys import TRAIN_TSE_EMA, VAL_ACC
from ._spec import Budget


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


__all__ = [
    "asha_optuna_pruner",
    "asha_ray_scheduler",
    "describe_asha",
    "describe_fifo",
    "describe_neve",
    "describe_neve_pure",
    "fifo_optuna_pruner",
    "fifo_ray_scheduler",
    "neve_optuna_pruner",
    "neve_pure_optuna_pruner",
    "neve_pure_ray_scheduler",
    "neve_ray_scheduler",
]
