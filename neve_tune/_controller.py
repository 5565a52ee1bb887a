"""``NeVe``: the velocity monitor plus the decision rule, applied to an optimizer's learning rates."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from . import keys
from ._rule import NeVeRule, PlateauOn, StopFlags
from ._velocity import AuxInput, LayerSelection, VelocityMonitor
from .keys import StopReason


@dataclass(frozen=True)
class StepResult(StopFlags):
    """What one :meth:`NeVe.step` measured and decided.

    Attributes:
        epoch: the number of steps so far (1 after the first epoch).
        model_velocity: V (NaN/inf when the model diverged); ``None`` only for a re-baseline step,
            which happens after a measurement failed half-way (no decision is taken then).
        velocity_change: D, ``None`` at the first epoch (and on a re-baseline step).
        lr_decayed: whether this step lowered at least one learning rate.
        lrs: the learning rates after this step, one per param group.
        stop_reason: ``StopReason.CONVERGED``, ``StopReason.DIVERGED`` or ``None``.
        layer_velocity: module name -> mean ``|v_i|`` over its neurons.
        num_decays: how many LR decays happened up to and including this step.
    """

    epoch: int
    model_velocity: float | None
    velocity_change: float | None
    lr_decayed: bool
    lrs: list[float]
    stop_reason: StopReason | None
    layer_velocity: dict[str, float] = field(default_factory=dict, repr=False)
    num_decays: int = 0

    def metrics(self) -> dict[str, float]:
        """This step as a flat dict of plain floats: what :meth:`NeVe.metrics` returned right after it."""
        return _flat_metrics(self.epoch, self.lrs, self.num_decays, self)

    @property
    def message(self) -> str:
        """A one-line, human explanation of the decision."""
        if self.model_velocity is None:
            return f"epoch {self.epoch}: the previous measurement failed half-way; took a fresh baseline."
        if self.diverged:
            return (
                f"epoch {self.epoch}: diverged: model velocity {self.model_velocity}, velocity change"
                f" {self.velocity_change}. The aux set produced NaN/inf activations (a NaN loss or exploding"
                " weights); lower the learning rate or check the loss."
            )
        head = f"epoch {self.epoch}: V={self.model_velocity:.3g}" + (
            "" if self.velocity_change is None else f", D={self.velocity_change:.3g}"
        )
        if self.converged:
            return f"{head}: converged (velocity under the stop threshold); stop training."
        if self.lr_decayed:
            return f"{head}: velocity change plateaued; learning rate decayed to {self.lrs}."
        return head


class NeVe(LRScheduler):
    """Validation-free LR decay and early stopping from neural velocity, for a plain PyTorch loop.

    ``NeVe`` takes its baseline snapshot when constructed. Call :meth:`step` once after every training
    epoch: it measures the velocity on the aux set, lowers the learning rates like ``ReduceLROnPlateau``
    when the velocity change plateaus, and reports when the trial converged (model velocity under
    ``stop_threshold``) or diverged.

    It follows PyTorch's LR-scheduler conventions (it is an ``LRScheduler``, with ``get_last_lr()`` and a
    ``state_dict()`` that excludes the optimizer), so Lightning can drive it as an epoch-interval
    scheduler.

    NaN policy: a NaN or infinite model velocity or velocity change means the model diverged. The step
    reports ``diverged=True`` with ``StopReason.DIVERGED``; it never decays the LR on it and never counts
    it as a quiet bad epoch.

    State: :meth:`state_dict` holds the rule's counters and the monitor's velocities and snapshot (not
    the optimizer, not the model). Restoring it, with the model and optimizer restored from the same
    checkpoint, continues with identical velocities and decisions.

    Args:
        model: the network being trained.
        optimizer: its optimizer; every param group's ``lr`` is decayed.
        aux: the aux set (see :func:`neve_tune.noise_aux`).
        momentum: velocity momentum ``mu``.
        factor: LR multiplier on a plateau, ``0 < factor < 1``.
        patience: bad epochs tolerated before a decay.
        stop_threshold: converged once the model velocity is under this.
        min_lr: LR floor, a scalar or one per param group.
        plateau_on: ``"velocity_change"`` (default) or ``"model_velocity"``.
        layers, batch_size, max_positions: passed to :class:`VelocityMonitor`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> neve = NeVe(model, opt, torch.randn(32, 4))
        >>> result = neve.step()  # after an epoch of training
        >>> result.epoch, result.converged, result.lrs
        (1, True, [0.1])
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Optimizer,
        aux: AuxInput,
        *,
        momentum: float = 0.5,
        factor: float = 0.5,
        patience: int = 10,
        stop_threshold: float = 1e-3,
        min_lr: float | Sequence[float] = 0.0,
        plateau_on: PlateauOn = "velocity_change",
        layers: LayerSelection = None,
        batch_size: int | None = None,
        max_positions: int | None = None,
    ) -> None:
        # Deliberately no super().__init__(): LRScheduler's would take a step and wrap optimizer.step.
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"{type(optimizer).__name__} is not an Optimizer")
        self.rule = NeVeRule(
            factor=factor, patience=patience, stop_threshold=stop_threshold, min_lr=min_lr, plateau_on=plateau_on
        )
        self.rule.check_num_groups(len(optimizer.param_groups))
        self.optimizer = optimizer
        self.monitor = VelocityMonitor(
            model, aux, momentum=momentum, layers=layers, batch_size=batch_size, max_positions=max_positions
        )
        self.last_epoch = 0
        self._lrs: list[float] = [float(g["lr"]) for g in optimizer.param_groups]
        self._last: StepResult | None = None
        self.monitor.measure()  # the baseline snapshot, before the first training epoch

    @property
    def last_result(self) -> StepResult | None:
        """The result of the latest :meth:`step`, or ``None`` before the first."""
        return self._last

    def get_last_lr(self) -> list[float]:  # type: ignore[override]
        """The learning rates after the latest step, one per param group."""
        return list(self._lrs)

    def get_lr(self) -> list[float]:  # type: ignore[override]
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def step(self) -> StepResult:  # type: ignore[override]
        """Measure after an epoch, decay the LR on a plateau, and say whether to stop."""
        measurement = self.monitor.measure()
        self.last_epoch += 1
        lrs = self.get_lr()
        if measurement is None:
            result = StepResult(self.last_epoch, None, None, False, lrs, None, num_decays=self.rule.num_decays)
        else:
            decision = self.rule.step(measurement.model_velocity, measurement.velocity_change, lrs)
            if decision.lr_decayed:
                for group, lr in zip(self.optimizer.param_groups, decision.lrs, strict=True):
                    group["lr"] = lr
            result = StepResult(
                epoch=self.last_epoch,
                model_velocity=measurement.model_velocity,
                velocity_change=measurement.velocity_change,
                lr_decayed=decision.lr_decayed,
                lrs=list(decision.lrs),
                stop_reason=decision.stop_reason,
                layer_velocity=measurement.layer_velocity,
                num_decays=self.rule.num_decays,
            )
        self._lrs = list(result.lrs)
        self._last = result
        return result

    def metrics(self) -> dict[str, float]:
        """The latest step as a flat dict of plain floats, keyed by :mod:`neve_tune.keys`.

        Keys: ``neve/epoch``, ``neve/model_velocity`` (absent before the first step and on a re-baseline
        step), ``neve/velocity_change`` (absent until the second step), ``neve/lr`` (group 0) and
        ``neve/lr_<i>`` for every group when there are several, ``neve/lr_decayed``,
        ``neve/num_decays``, ``neve/converged``, ``neve/diverged`` (1.0 or 0.0).
        """
        return _flat_metrics(self.last_epoch, self._lrs, self.rule.num_decays, self._last)

    def state_dict(self) -> dict[str, Any]:
        """Rule counters, monitor state (velocities and snapshot) and the last result; no optimizer."""
        last = self._last
        return {
            "last_epoch": self.last_epoch,
            "last_lr": list(self._lrs),
            "rule": self.rule.state_dict(),
            "monitor": self.monitor.state_dict(),
            "last_result": None
            if last is None
            else {
                "epoch": last.epoch,
                "model_velocity": last.model_velocity,
                "velocity_change": last.velocity_change,
                "lr_decayed": last.lr_decayed,
                "lrs": list(last.lrs),
                "stop_reason": None if last.stop_reason is None else last.stop_reason.value,
                "layer_velocity": dict(last.layer_velocity),
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (load the optimizer's own state separately)."""
        self.rule.load_state_dict(state_dict["rule"])
        self.rule.check_num_groups(len(self.optimizer.param_groups))
        self.monitor.load_state_dict(state_dict["monitor"])
        self.last_epoch = int(state_dict["last_epoch"])
        self._lrs = [float(x) for x in state_dict["last_lr"]]
        last = state_dict["last_result"]
        if last is None:
            self._last = None
        else:
            reason = last["stop_reason"]
            self._last = StepResult(
                epoch=int(last["epoch"]),
                model_velocity=last["model_velocity"],
                velocity_change=last["velocity_change"],
                lr_decayed=bool(last["lr_decayed"]),
                lrs=[float(x) for x in last["lrs"]],
                stop_reason=None if reason is None else StopReason(reason),
                layer_velocity=dict(last["layer_velocity"]),
                num_decays=self.rule.num_decays,  # the last result is the rule's latest step
            )

    def close(self) -> None:
        """Release the monitor's hooks and snapshot."""
        self.monitor.close()

    def __repr__(self) -> str:
        v = None if self._last is None else self._last.model_velocity
        return f"NeVe(epoch={self.last_epoch}, model_velocity={v}, lrs={self._lrs}, rule={self.rule!r})"



def _flat_metrics(epoch: int, lrs: Sequence[float], num_decays: int, last: StepResult | None) -> dict[str, float]:
    """The one builder of NeVe's flat metrics (``NeVe.metrics()``, ``StepResult.metrics()``)."""
    out: dict[str, float] = {keys.EPOCH: float(epoch)}
    if last is not None and last.model_velocity is not None:
        out[keys.MODEL_VELOCITY] = float(last.model_velocity)
    if last is not None and last.velocity_change is not None:
        out[keys.VELOCITY_CHANGE] = float(last.velocity_change)
    out[keys.LR] = float(lrs[0])
    if len(lrs) > 1:
        for i, lr in enumerate(lrs):
            out[keys.lr_key(i)] = float(lr)
    out[keys.LR_DECAYED] = float(bool(last and last.lr_decayed))
    out[keys.NUM_DECAYS] = float(num_decays)
    out[keys.CONVERGED] = float(bool(last and last.converged))
    out[keys.DIVERGED] = float(bool(last and last.diverged))
    return out
