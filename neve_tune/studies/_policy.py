"""How an arm's trial adapts its training: NeVe's policy or a fixed LR schedule, behind one set of hooks.

:func:`~neve_tune.studies.run_trial` owns the epoch loop (train, evaluate, log, report) and calls the
arm's :class:`TrialPolicy` at fixed points of it, the way Ray Tune calls a ``TrialScheduler``:

* ``__init__(model, optimizer, aux, budget)``: once, after the model and optimizer are built and before
  the first epoch (a policy that measures velocity takes its baseline snapshot here);
* :meth:`TrialPolicy.load_state_dict`: only when the trial resumes from a checkpoint, after the backend
  restored the model, the optimizer and :attr:`TrialPolicy.neve`;
* :meth:`TrialPolicy.after_epoch`: after each epoch's training (with that epoch's mean training loss)
  and before its evaluation; it may change the learning rate and say the trial should stop;
* :meth:`TrialPolicy.state_dict`: after an epoch whose report saves a checkpoint;
* :meth:`TrialPolicy.close`: always, once, when the trial ends (removes hooks).
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from neve_tune import Anneal, NeVe, VelocityMonitor

from ._keys import MONITOR_CHANGE, MONITOR_VELOCITY
from ._spec import Budget, BuildOptimizer, StudyError

if TYPE_CHECKING:
    from neve_tune._measure.inputs import AuxInput


@dataclass
class EpochDecision:
    """What a policy did after one epoch.

    Attributes:
        velocity: the model velocity measured this epoch (``None``: not measured).
        layer_velocity: module name -> mean ``|v_i|`` (for the MLflow metrics and plots).
        lr_decayed: whether the policy decayed the learning rate this epoch.
        stop_reason: why the trial should end now (a ``StopReason`` value), or ``None`` to go on.
        reported: metrics added to the epoch's result (reported to the backend).
        logged: metrics logged to MLflow and kept in the records, but not added to the result (the
            backend's report adds them itself, e.g. ``NeVe.metrics()``).
    """

    velocity: float | None = None
    layer_velocity: dict[str, float] = field(default_factory=dict)
    lr_decayed: bool = False
    stop_reason: str | None = None
    reported: dict[str, float] = field(default_factory=dict)
    logged: dict[str, float] = field(default_factory=dict)


class TrialPolicy(ABC):
    """The per-epoch hooks of an arm's training policy (see the module docstring for when each is called).

    NaN policy: a policy reports what it measures as it is; the NeVe policy stops a trial whose velocity is
    not finite (``diverged``), the fixed schedule never stops one (the loop stops any trial whose training
    loss is not finite). State: :meth:`state_dict` holds what a checkpoint needs beyond the model, the
    optimizer and :attr:`neve`, which the backend saves itself.
    """

    #: The NeVe controller the backend reports and checkpoints (``None``: this policy has none).
    neve: NeVe | None = None

    @abstractmethod
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, aux: AuxInput, budget: Budget) -> None:
        """Set the policy up for a fresh trial (before the first epoch)."""

    @abstractmethod
    def after_epoch(self, train_loss: float | None = None) -> EpochDecision:
        """Act after one epoch's training (``train_loss``: its mean training loss): measure, step the LR,
        and say whether to stop."""

    def state_dict(self) -> dict[str, Any]:
        """Extra checkpoint entries (merged into the trial's checkpoint ``extra`` state)."""
        return {}

    def load_state_dict(self, extra: Mapping[str, Any]) -> None:  # noqa: B027 - a hook, empty by default
        """Restore from the checkpoint's ``extra`` state (entries this policy did not write are absent)."""

    def close(self) -> None:  # noqa: B027 - a hook, empty by default
        """Release hooks and buffers (called once, however the trial ended)."""

    # -- optimizer hooks: a policy that brings its own optimizer (e.g. Schedule-Free) overrides these ----------

    @classmethod  # noqa: B027 - a hook, empty by default
    def check_available(cls) -> None:
        """Raise ``StudyError`` (saying what to install) when a package the policy needs is missing; the
        runner calls it before anything starts."""

    @classmethod
    def build_optimizer(
        cls,
        model: nn.Module,
        hp: Mapping[str, Any],
        budget: Budget,
        steps_per_epoch: int,
        build: BuildOptimizer | None = None,
    ) -> torch.optim.Optimizer:
        """The trial's optimizer, built before the policy: ``build(params, hp)`` (the study's
        ``build_optimizer``, given the model's parameters as a list), or SGD with the budget's momentum and the
        trial's ``lr`` and ``weight_decay``. ``steps_per_epoch``: optimizer steps in one epoch (for a policy
        that brings its own optimizer).

        Raises:
            StudyError: ``build`` raised, returned no optimizer, or one holding parameters that are not the
                model's (the message names the fix). An optimizer that trains at none of the config's ``lr``
                warns (every trial would train at the same LR).
        """
        if build is None:
            return torch.optim.SGD(
                model.parameters(),
                lr=float(hp["lr"]),
                momentum=budget.momentum,
                weight_decay=float(hp.get("weight_decay", 0)),
            )
        return checked_optimizer(build, model, hp)

    def before_train(self) -> None:  # noqa: B027 - a hook, empty by default
        """Called before each epoch's training (e.g. put a schedule-free optimizer in train mode)."""

    def before_eval(self, train_batches: Iterable[tuple[Tensor, Tensor]], device: torch.device) -> None:  # noqa: B027
        """Called after each epoch's training, before :meth:`after_epoch` and the evaluation (e.g. put a
        schedule-free optimizer in eval mode). ``train_batches``: a fresh pass over the training split, in
        an order of its own (the trial's data order is not touched), drawn only if iterated."""


def checked_optimizer(build: BuildOptimizer, model: nn.Module, hp: Mapping[str, Any]) -> torch.optim.Optimizer:
    """``build(params, hp)`` with the model's parameters as a list, checked (see ``TrialPolicy.build_optimizer``)."""
    params = list(model.parameters())
    name = getattr(build, "__qualname__", repr(build))
    try:
        optimizer = build(params, hp)
    except Exception as err:
        raise StudyError(
            f"build_optimizer={name} raised {type(err).__name__}: {err}. It is called as build_optimizer(params,"
            f" config) with the model's parameters (a list) and the trial's config, whose keys are {sorted(hp)}"
            " (the search space's names and config_id): read only those, e.g."
            " torch.optim.AdamW(params, lr=config['lr'])."
        ) from err
    if not isinstance(optimizer, torch.optim.Optimizer):
        hint = " (return only the optimizer: the arm owns the LR schedule)" if isinstance(optimizer, tuple) else ""
        raise StudyError(
            f"build_optimizer must return a torch.optim.Optimizer, but returned {type(optimizer).__name__}{hint}."
            " Return e.g. torch.optim.AdamW(params, lr=config['lr'])."
        )
    own = {id(p) for p in params}
    held = [p for group in optimizer.param_groups for p in group["params"]]
    foreign = sum(id(p) not in own for p in held)
    if foreign or not held:
        raise StudyError(
            f"build_optimizer={name} returned an optimizer over {len(held)} tensor(s), {foreign} of them not"
            f" parameters of the trial's model ({len(params)} parameters): the model would not train. Build the"
            " optimizer on the params it is given (build_optimizer(params, config)), not on another model's."
        )
    lrs = [float(g["lr"]) for g in optimizer.param_groups]
    if "lr" in hp and not any(math.isclose(lr, float(hp["lr"]), rel_tol=1e-6) for lr in lrs):
        warnings.warn(
            f"build_optimizer={name} built an optimizer at lr={lrs} for a trial whose config has lr={hp['lr']}:"
            " it ignores the sampled lr, so every trial trains at the same LR. Pass lr=config['lr'] (a group may"
            " scale it, but one group at config['lr'] silences this).",
            UserWarning,
            stacklevel=2,
        )
    return optimizer


class NeVePolicy(TrialPolicy):
    """NeVe decays the learning rate (plateau on the velocity change) and stops the trial: converged,
    stalled, collapsed or diverged, judged with the epoch's mean training loss (``neve.step(train_loss)``).
    The paper's rule (the ``neve-pure`` arm): the trial ends at its first convergence.

    Built from ``budget.neve``; :attr:`neve` takes its baseline snapshot here. Its state is the NeVe
    state, which the backend checkpoints with the model.
    """

    #: Anneal on convergence (``NeVe(anneal=Anneal(fraction=..., max_epochs=budget.max_epochs))``), or
    #: ``None``: the paper's rule.
    anneal_fraction: float | None = None

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, aux: AuxInput, budget: Budget) -> None:
        s = budget.neve
        fraction = self.anneal_fraction
        anneal = None if fraction is None else Anneal(fraction=fraction, max_epochs=budget.max_epochs)
        self.neve = NeVe(
            model,
            optimizer,
            aux,
            momentum=s.momentum,
            factor=s.factor,
            patience=s.patience,
            stop_threshold=s.stop_threshold,
            anneal=anneal,
        )

    def after_epoch(self, train_loss: float | None = None) -> EpochDecision:
        assert self.neve is not None
        step = self.neve.step(train_loss)
        return EpochDecision(
            velocity=step.model_velocity,
            layer_velocity=step.layer_velocity,
            lr_decayed=step.lr_decayed,
            stop_reason=None if step.stop_reason is None else str(step.stop_reason),
            logged=self.neve.metrics(),
        )

    def close(self) -> None:
        if self.neve is not None:
            self.neve.close()


class AnnealingNeVePolicy(NeVePolicy):
    """:class:`NeVePolicy` with anneal on convergence (the ``neve`` arm): the first convergence starts a
    linear LR cooldown of ``max(3, ceil(t / 10))`` epochs instead of ending the trial at its high LR, and a
    trial that has not converged is annealed into the epoch cap over its last 20% (see
    :class:`neve_tune.Anneal`; measured against the paper's rule and the cosine schedule in
    ``studies/ranking_signals.md``).
    """

    anneal_fraction = 0.1


def monitored_epoch(monitor: VelocityMonitor | None) -> EpochDecision:
    """The decision of an arm that only *watches* its velocity: measured (for plots), never acted on."""
    decision = EpochDecision()
    if monitor is not None:
        m = monitor.measure()
        if m is not None:
            decision.velocity, decision.layer_velocity = m.model_velocity, m.layer_velocity
            decision.reported[MONITOR_VELOCITY] = m.model_velocity
            if m.velocity_change is not None:
                decision.reported[MONITOR_CHANGE] = m.velocity_change
    return decision


def fixed_lr_schedule(budget: Budget, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """The baselines' schedule: cosine to 0 at ``max_epochs``, or x0.1 at 50% and 75% of it (``step``)."""
    if budget.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=budget.max_epochs)
    milestones = [max(1, budget.max_epochs // 2), max(1, (3 * budget.max_epochs) // 4)]
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=sorted(set(milestones)), gamma=0.1)


class FixedSchedulePolicy(TrialPolicy):
    """A fixed LR schedule (``budget.lr_schedule``); never stops a trial (its backend may, e.g. ASHA).

    With ``budget.monitor_baselines`` it also *measures* velocity (``monitor/*`` metrics, for the plots);
    no decision uses it. State: the schedule's and the monitor's ``state_dict``.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, aux: AuxInput, budget: Budget) -> None:
        self.schedule = fixed_lr_schedule(budget, optimizer)
        self.monitor: VelocityMonitor | None = None
        if budget.monitor_baselines:
            self.monitor = VelocityMonitor(model, aux, momentum=budget.neve.momentum)
            try:
                self.monitor.measure()  # baseline snapshot
            except BaseException:
                self.monitor.close()
                raise

    def after_epoch(self, train_loss: float | None = None) -> EpochDecision:
        decision = monitored_epoch(self.monitor)
        self.schedule.step()
        return decision

    def state_dict(self) -> dict[str, Any]:
        # Only when checkpointing: a monitor's state holds its whole snapshot.
        state: dict[str, Any] = {"schedule": self.schedule.state_dict()}
        if self.monitor is not None:
            state["monitor"] = self.monitor.state_dict()
        return state

    def load_state_dict(self, extra: Mapping[str, Any]) -> None:
        if "schedule" in extra:
            self.schedule.load_state_dict(extra["schedule"])
        if self.monitor is not None and "monitor" in extra:
            self.monitor.load_state_dict(extra["monitor"])

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.close()


__all__ = [
    "AnnealingNeVePolicy",
    "EpochDecision",
    "FixedSchedulePolicy",
    "NeVePolicy",
    "TrialPolicy",
    "fixed_lr_schedule",
]
