"""One NeVe for all of a Trainer's optimizers, and LR decays that the Trainer's LR schedulers keep."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch.optim import Optimizer


class JointOptimizer(Optimizer):
    """A read-only view of several optimizers' param groups, in order, for one ``NeVe``.

    ``NeVe`` decays every param group of the optimizer it is given. With several optimizers (a GAN, or
    manual optimisation with one optimizer per sub-network) the callback gives it this view: its
    ``param_groups`` are the groups of ``optimizers[0]``, then of ``optimizers[1]``, and so on, read anew
    at every access (Lightning's checkpoint restore replaces an optimizer's group dicts), so a decay of
    group ``i`` writes into the real optimizer's group. ``neve/lr_<i>`` reports group ``i`` of that
    concatenation, and ``min_lr`` (one value per group) follows the same order. It is never stepped.
    """

    def __init__(self, optimizers: Sequence[Optimizer]) -> None:  # no super().__init__(): it owns no params
        self.optimizers = list(optimizers)
        self.defaults: dict[str, Any] = {}

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for opt in self.optimizers for group in opt.param_groups]

    @param_groups.setter
    def param_groups(self, value: Any) -> None:
        raise AttributeError("JointOptimizer.param_groups is a view of its optimizers' groups; set those instead.")

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        raise RuntimeError("JointOptimizer is NeVe's view of several optimizers; step the optimizers themselves.")

    def __getstate__(self) -> dict[str, Any]:
        return {"optimizers": self.optimizers, "defaults": self.defaults}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.optimizers = list(state["optimizers"])
        self.defaults = dict(state["defaults"])

    def __repr__(self) -> str:
        return f"JointOptimizer({', '.join(type(o).__name__ for o in self.optimizers)})"


def current_lrs(optimizers: Sequence[Optimizer]) -> list[float]:
    """Every param group's ``lr``, optimizer after optimizer."""
    return [float(g["lr"]) for opt in optimizers for g in opt.param_groups]


#: Schedulers that keep their LR targets outside ``base_lrs`` and overwrite any decay at their next step.
_OVERWRITING = (torch.optim.lr_scheduler.OneCycleLR, torch.optim.lr_scheduler.CyclicLR)


def carry_decay_into_schedulers(
    optimizers: Sequence[Optimizer], schedulers: Sequence[Any], before: Sequence[float]
) -> None:
    """Scale the ``base_lrs`` (and ``initial_lr``) of the schedulers of every group NeVe just decayed.

    A chainable scheduler (``StepLR``, ``ExponentialLR``, ``CosineAnnealingLR``, ``ReduceLROnPlateau``)
    multiplies the current ``lr`` and keeps NeVe's decay anyway; one that recomputes the LR from its base
    LRs (``LambdaLR``, ``MultiplicativeLR``'s base, a warm-up) would undo it at its next step. Scaling the
    base LRs by the same ratio makes both kinds keep the decay.

    Args:
        optimizers: the Trainer's optimizers, in the order :func:`current_lrs` read ``before``.
        schedulers: the Trainer's LR schedulers (any object with ``optimizer`` and ``base_lrs``).
        before: the LRs before NeVe's step.
    """
    index = 0
    for opt in optimizers:
        for j, group in enumerate(opt.param_groups):
            old, new = before[index], float(group["lr"])
            index += 1
            if old <= 0.0 or new == old:
                continue
            ratio = new / old
            if "initial_lr" in group:
                group["initial_lr"] = float(group["initial_lr"]) * ratio
            for sched in schedulers:
                base = getattr(sched, "base_lrs", None)
                if getattr(sched, "optimizer", None) is opt and isinstance(base, list) and j < len(base):
                    base[j] = float(base[j]) * ratio
                if getattr(sched, "optimizer", None) is opt and isinstance(sched, _OVERWRITING):
                    warnings.warn(
                        f"NeVe decayed the LR of param group {j} from {old:.4g} to {new:.4g}, but the Trainer's"
                        f" {type(sched).__name__} recomputes every LR from its own targets (max_lr / base_lr) at"
                        " its next step and overwrites the decay: NeVe's decays have no effect with it. Use a"
                        " chainable scheduler (StepLR, CosineAnnealingLR, ExponentialLR), LambdaLR for a warm-up,"
                        " or no scheduler with NeVeCallback.",
                        UserWarning,
                        stacklevel=2,
                    )
