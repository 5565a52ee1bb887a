"""The optional ``schedulefree`` arm: Schedule-Free SGD at the fixed budget, what people use to have no schedule.

Schedule-Free SGD (Defazio et al. 2024, "The Road Less Scheduled"; the ``schedulefree`` package) replaces
momentum with interpolation and averaging, so no LR schedule is needed. The arm trains every configuration
for the whole budget (``max_epochs``) on 100% of the training split, with no validation data and no early
stopping, and picks by the lowest final training loss (the validation-free rule of the ``neve-pure`` arm,
:func:`~neve_tune.studies._records.pick_lowest_train_loss`).

Following the package's README: the optimizer is put in train mode before each epoch's training and in
eval mode before anything is measured or evaluated (and it stays in eval mode for the checkpoint); a
linear warm-up over about 5% of the budget's steps; and, for a model with BatchNorm, the running
statistics are recomputed at the evaluation weights (a pass over up to :data:`BN_BATCHES` training
minibatches, in eval mode of the optimizer and train mode of the model) before each evaluation.

Not in the default ``--arms``: ``neve-tune study run digits --arms neve,asha,fifo,schedulefree``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from neve_tune import VelocityMonitor

from ._arm import Arm
from ._keys import TRAIN_LOSS
from ._policy import EpochDecision, TrialPolicy, monitored_epoch
from ._records import TrialRecord, pick_lowest_train_loss
from ._schedulers import fifo_optuna_pruner, fifo_ray_scheduler
from ._spec import Budget, BuildOptimizer, StudyError

if TYPE_CHECKING:
    from neve_tune._measure.inputs import AuxInput

#: Fraction of the budget's optimizer steps spent in the linear warm-up.
WARMUP_FRACTION = 0.05
#: Training minibatches that recompute the BatchNorm statistics at the evaluation weights.
BN_BATCHES = 50


def warmup_steps(budget: Budget, steps_per_epoch: int) -> int:
    """About :data:`WARMUP_FRACTION` of the budget's optimizer steps (at least one)."""
    return max(1, round(WARMUP_FRACTION * budget.max_epochs * steps_per_epoch))


def _batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recompute_batch_norm(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], device: torch.device) -> int:
    """Recompute every BatchNorm's running mean and variance as the plain average over ``batches`` at the
    model's current weights (PreciseBN); returns the batches used (0, touching nothing, without BatchNorm).

    The model's train/eval mode and each layer's momentum are restored afterwards.
    """
    norms = _batch_norms(model)
    if not norms:
        return 0
    was_training = model.training
    momenta = [bn.momentum for bn in norms]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average over the pass
    model.train()
    used = 0
    try:
        for x, _ in itertools.islice(batches, BN_BATCHES):
            model(x.to(device, non_blocking=True))
            used += 1
    finally:
        for bn, momentum in zip(norms, momenta, strict=True):
            bn.momentum = momentum
        model.train(was_training)
    return used


class ScheduleFreePolicy(TrialPolicy):
    """Schedule-Free SGD at a constant LR: no schedule, never stops a trial (it runs to ``max_epochs``).

    The optimizer (:meth:`build_optimizer`) is ``schedulefree.SGDScheduleFree`` with the trial's ``lr`` and
    ``weight_decay``, the budget's momentum and a warm-up of :func:`warmup_steps`: this arm keeps its own
    optimizer (it is the method compared), so a study's ``build_optimizer`` does not apply to it.
    :meth:`before_train` and :meth:`before_eval` switch it between its training and evaluation points (see
    the module docstring).
    With ``budget.monitor_baselines`` it also *measures* velocity (``monitor/*``, for the plots only).

    NaN policy: it reports what it measures as it is; the loop stops a trial whose training loss is not
    finite. State: the optimizer's own (saved in eval mode) and the monitor's ``state_dict``.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, aux: AuxInput, budget: Budget) -> None:
        self.model, self.optimizer = model, optimizer
        self.monitor: VelocityMonitor | None = None
        if budget.monitor_baselines:
            self.monitor = VelocityMonitor(model, aux, momentum=budget.neve.momentum)
            try:
                self.monitor.measure()  # baseline snapshot, at the evaluation weights (x) of a fresh optimizer
            except BaseException:
                self.monitor.close()
                raise

    @classmethod
    def check_available(cls) -> None:
        try:
            import schedulefree  # noqa: F401
        except ImportError as err:
            raise StudyError(
                f"The schedulefree arm needs the schedulefree package ({err}): pip install 'neve_tune[studies]' "
                "(or pip install schedulefree), or leave it out of --arms."
            ) from err

    @classmethod
    def build_optimizer(
        cls,
        model: nn.Module,
        hp: Mapping[str, Any],
        budget: Budget,
        steps_per_epoch: int,
        build: BuildOptimizer | None = None,
    ) -> torch.optim.Optimizer:
        """Schedule-Free SGD, whatever ``build`` (the study's ``build_optimizer``) says: the arm's method."""
        cls.check_available()
        from schedulefree import SGDScheduleFree

        optimizer: torch.optim.Optimizer = SGDScheduleFree(
            model.parameters(),
            lr=float(hp["lr"]),
            momentum=budget.momentum,
            weight_decay=float(hp.get("weight_decay", 0)),
            warmup_steps=warmup_steps(budget, steps_per_epoch),
        )
        return optimizer

    def before_train(self) -> None:
        self.optimizer.train()  # type: ignore[attr-defined]  # the parameters move to the gradient point y

    def before_eval(self, train_batches: Iterable[tuple[Tensor, Tensor]], device: torch.device) -> None:
        self.optimizer.eval()  # type: ignore[attr-defined]  # the parameters move to the averaged point x
        recompute_batch_norm(self.model, train_batches, device)

    def after_epoch(self, train_loss: float | None = None) -> EpochDecision:
        return monitored_epoch(self.monitor)

    def state_dict(self) -> dict[str, Any]:
        return {} if self.monitor is None else {"monitor": self.monitor.state_dict()}

    def load_state_dict(self, extra: Mapping[str, Any]) -> None:
        if self.monitor is not None and "monitor" in extra:
            self.monitor.load_state_dict(extra["monitor"])

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.close()


def describe_schedulefree(budget: Budget) -> dict[str, Any]:
    return {
        "scheduler": "FIFOScheduler",
        "optimizer": "schedulefree.SGDScheduleFree",
        "lr_schedule": "none (schedule-free), linear warm-up",
        "warmup_fraction": WARMUP_FRACTION,
        "momentum": budget.momentum,
        "bn_recompute_batches": BN_BATCHES,
    }


#: The schedule-free arm's pick rule, in words (the table's footnote).
SCHEDULEFREE_PICK_RULE = "lowest final train loss at the fixed budget (validation-free)"


def describe_schedulefree_pick(records: Sequence[TrialRecord]) -> str:
    """The pick-rule line: every trial ran the fixed budget, so it is the lowest final train loss of those."""
    if pick_lowest_train_loss(records) is None:
        return "lowest final train loss at the fixed budget: no trial qualifies (all diverged or failed)"
    return SCHEDULEFREE_PICK_RULE


SCHEDULEFREE = Arm(
    name="schedulefree",
    display_name="sched-free",
    color="C5",
    policy=ScheduleFreePolicy,
    holds_out_validation=False,
    objective=TRAIN_LOSS,
    direction="minimize",
    pick_rule=SCHEDULEFREE_PICK_RULE,
    pick=pick_lowest_train_loss,
    describe_pick=describe_schedulefree_pick,
    ray_scheduler=fifo_ray_scheduler,
    optuna_pruner=fifo_optuna_pruner,
    describe=describe_schedulefree,
)

__all__ = [
    "BN_BATCHES",
    "SCHEDULEFREE",
    "WARMUP_FRACTION",
    "ScheduleFreePolicy",
    "recompute_batch_norm",
    "warmup_steps",
]
