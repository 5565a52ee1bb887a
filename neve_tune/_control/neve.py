"""``NeVe``: the velocity monitor plus the decision rule, applied to an optimizer's learning rates.

:meth:`NeVe.step` is the one decision flow (measure, let the rule decide, apply its LRs) and returns the
rule's :class:`~neve_tune.StepResult` with the per-layer velocities added; :meth:`NeVe.report_step` is the
one report path the Ray and Optuna ``report_epoch`` share.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from .._decide.anneal import Anneal
from .._decide.result import StepResult, flat_metrics
from .._decide.rule import NeVeRule, PlateauOn
from .._decide.stopping import StopCriteria
from .._measure.inputs import AuxInput
from .._measure.monitor import LayerSelection, Measurement, VelocityMonitor
from .._measure.state import SnapshotInState
from .._memorize.watch import MemorizationWatch
from .._memorize.wave import Memorization
from ..keys import StopReason
from .arguments import as_loss, infer_num_classes
from .callers import refuse_per_step_loops, warn_if_decay_undone
from .memorizing import MemorizationStop, load_memorization, warn_if_value_predates_restore


class NeVe(LRScheduler):
    """Validation-free LR decay and early stopping from neural velocity, for a plain PyTorch loop.

    ``NeVe`` takes its baseline snapshot when constructed. Call :meth:`step` once after every training
    epoch, with the epoch's training loss when you have it (``neve.step(loss)``, as with
    ``ReduceLROnPlateau``): it measures the velocity on the aux set, lowers the learning rates like
    ``ReduceLROnPlateau`` when the velocity change plateaus, and says when to stop and why
    (:attr:`should_stop`, :attr:`stop_reason`):

    * **converged**: the network moved, learned, and stopped moving (V under ``stop_threshold`` after the
      ``min_epochs`` warm-up, its peak V at least ``peak_ratio`` times higher, and with a loss at least
      ``learned`` of the chance-level loss removed);
    * **stalled**: it stopped moving without having learned (e.g. an LR far too small), or, with a loss,
      it sat at chance for ``chance_epochs`` epochs while still moving (an LR far too large);
    * **collapsed**: its aux responses froze abruptly (every ReLU dead, say);
    * **memorizing**: fed the training pass's outputs (:meth:`observe`), the count of training samples whose
      predicted class changes between epochs rose after its minimum (LabelWave, :class:`~neve_tune.Memorization`):
      it started to fit its wrong labels. The minimum's weights come back, then a short LR cooldown runs;
    * **diverged**: V, D or the loss is NaN/inf (at any epoch, even in the warm-up).

    The thresholds are :class:`~neve_tune.StopCriteria`. Without a loss, a trial stuck at chance whose
    velocity never settles cannot be told from one still learning: it runs until the loop's epoch cap.

    It follows PyTorch's LR-scheduler conventions (it is an ``LRScheduler``, with ``get_last_lr()`` and a
    ``state_dict()`` that excludes the optimizer), so Lightning can drive it as an epoch-interval
    scheduler.

    NaN policy: a NaN or infinite model velocity, velocity change or training loss means the model
    diverged. The step reports ``diverged=True`` with ``StopReason.DIVERGED``; it never decays the LR on
    it and never counts it as a quiet bad epoch.

    State: :meth:`state_dict` holds the rule's counters, the memorisation watch's prediction tables and kept
    weights, and the monitor's velocities and snapshot (not
    the optimizer, not the model). Restoring it, with the model and optimizer restored from the same
    checkpoint, continues with identical velocities and decisions.

    Args:
        model: the network being trained.
        optimizer: its optimizer; every param group's ``lr`` is decayed.
        aux: the aux set (see :func:`neve_tune.noise_aux`).
        momentum: velocity momentum ``mu``, in ``[0, 1)``.
        factor: LR multiplier on a plateau, ``0 < factor < 1``.
        patience: bad epochs tolerated before a decay.
        stop_threshold: "not moving" once the model velocity is under this (``> 0``).
        min_lr: LR floor, a scalar or one per param group.
        plateau_on: ``"velocity_change"`` (default) or ``"model_velocity"``.
        min_epochs: the warm-up (``>= 0``): nothing but divergence is decided before this epoch.
        num_classes: the number of classes of a cross-entropy training loss, for the chance-level loss
            ``log C``. ``None`` (default): inferred when the model's last module with parameters is an
            ``nn.Linear`` with at least 2 outputs, else unknown. ``0``: unknown (use it for a loss that
            is not a classification cross-entropy). When unknown, the first reported loss is the
            reference (a trial that blew up in its first epoch then looks like it learned; pass
            ``num_classes``).
        criteria: the thresholds of the stalled/collapsed tests (:class:`~neve_tune.StopCriteria`).
        anneal: opt-in anneal on convergence (:class:`~neve_tune.Anneal`): the first convergence starts
            a short LR cooldown instead of ending the trial, which then ends as converged. ``None``
            (default): the paper's rule, which stops at the first convergence.
        memorization: the memorisation watch's settings (:class:`~neve_tune.Memorization`); it acts only
            once :meth:`observe` feeds it. ``None`` turns it off (``observe`` then refuses).
        layers, batch_size, max_positions, state_snapshot: passed to :class:`VelocityMonitor`
            (``state_snapshot="half"`` halves the checkpoint size; ``"none"`` re-baselines on resume).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> neve = NeVe(model, opt, torch.randn(32, 4), min_epochs=1)
        >>> result = neve.step()  # after an epoch of training (the model did not move)
        >>> result.epoch, result.stop_reason, neve.should_stop, result.lrs
        (1, <StopReason.STALLED: 'stalled'>, True, [0.1])
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
        min_epochs: int = 5,
        num_classes: int | None = None,
        criteria: StopCriteria | None = None,
        state_snapshot: SnapshotInState = "full",
        anneal: Anneal | None = None,
        memorization: Memorization | None = Memorization(),  # noqa: B008 (frozen: a shared default is safe)
    ) -> None:
        # Deliberately no super().__init__(): LRScheduler's would take a step and wrap optimizer.step.
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"{type(optimizer).__name__} is not an Optimizer")
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), but got {momentum=}.")
        if num_classes is None:
            num_classes = infer_num_classes(model)
        self.rule = NeVeRule(
            factor=factor,
            patience=patience,
            stop_threshold=stop_threshold,
            min_lr=min_lr,
            plateau_on=plateau_on,
            min_epochs=min_epochs,
            num_classes=num_classes,
            criteria=criteria,
            anneal=anneal,
        )
        self.rule.check_num_groups(len(optimizer.param_groups))
        self.optimizer = optimizer
        self.monitor = VelocityMonitor(
            model,
            aux,
            momentum=momentum,
            layers=layers,
            batch_size=batch_size,
            max_positions=max_positions,
            state_snapshot=state_snapshot,
        )
        self._memorization = None if memorization is None else MemorizationStop(MemorizationWatch(model, memorization))
        self.last_epoch = 0
        self._lrs: list[float] = [float(g["lr"]) for g in optimizer.param_groups]
        self._last: StepResult | None = None
        self._signed_mean = 0.0  # mean_i v_i of the latest measurement, for u_t = mean_i (v_i^t + mu v_i^{t-1})
        self._unreported_steps = 0  # steps since the last report_step() (see there)
        self.monitor.measure()  # the baseline snapshot, before the first training epoch

    @property
    def last_result(self) -> StepResult | None:
        """The result of the latest :meth:`step`, or ``None`` before the first."""
        return self._last

    @property
    def stop_reason(self) -> StopReason | None:
        """Why training should stop after the latest step (a :class:`StopReason`), or ``None``."""
        return None if self._last is None else self._last.stop_reason

    @property
    def should_stop(self) -> bool:
        """True when the latest step says to stop (converged, stalled, collapsed, memorizing or diverged)."""
        return self.stop_reason is not None

    @property
    def watch(self) -> MemorizationWatch | None:
        """The memorisation watch :meth:`observe` feeds (``None`` with ``memorization=None``)."""
        return None if self._memorization is None else self._memorization.watch

    def observe(self, outputs: Any, indices: Any) -> None:
        """Watch one training batch for memorisation (once per batch; no label is read).

        Each sample's predicted class, from the forward that trains on the batch, is stored under its dataset
        index; :meth:`step` counts how many changed since the previous epoch (the ``memorizing`` decision).

        Args:
            outputs: class logits ``(N, C)``, token logits ``(N, T, C)`` (a sample flips by the share of its
                tokens that changed), a dict with ``"logits"`` or a Hugging Face ``ModelOutput``, on any
                device (only the argmax comes to the CPU). Outputs with no class scores (``(N, 1)``, integers)
                warn once and give no signal.
            indices: the samples' dataset indices (``N`` integers >= 0; a subset of the dataset works).

        Raises:
            ValueError: ``NeVe(memorization=None)`` turned the watch off, or ``indices`` is not one integer
                >= 0 per sample.
        """
        if self.watch is None:
            raise ValueError(
                "NeVe.observe() feeds the memorisation watch, but this NeVe was built with memorization=None;"
                " pass memorization=neve_tune.Memorization() (the default) or drop the observe() call."
            )
        self.watch.observe(outputs, indices)

    @property
    def converged(self) -> bool:
        """True when the latest step says the trial converged (a success; stalled/collapsed are not)."""
        return self.stop_reason is StopReason.CONVERGED

    def get_last_lr(self) -> list[float]:  # type: ignore[override]
        """The optimizer's learning rates (as the latest step or a loaded state left them), one per group."""
        return self.get_lr()

    def get_lr(self) -> list[float]:  # type: ignore[override]
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def step(self, train_loss: float | torch.Tensor | None = None) -> StepResult:  # type: ignore[override]
        """Measure after an epoch, decay the LR on a plateau, and say whether to stop (and why).

        Args:
            train_loss: the epoch's training loss (preferably its mean over the epoch; the last batch's
                loss works too), a number or a one-element tensor. Optional: it sharpens the decision
                (see the class docstring). A NaN/inf loss means the trial diverged.
        """
        refuse_per_step_loops()  # e.g. Trainer(optimizers=(opt, neve)): a step per batch, not per epoch
        warn_if_decay_undone(self.get_lr(), self._lrs, self.rule.factor, self.rule.num_decays)
        loss = as_loss(train_loss)
        self.last_epoch += 1  # before measuring: a measurement that raises still counts its epoch
        measurement = self.monitor.measure()
        self._unreported_steps += 1
        lrs = self.get_lr()
        rule = self.rule
        seen = None if self.watch is None else self.watch.end_epoch(self.last_epoch, loss)
        if measurement is None:  # a fresh baseline after a failed measurement: nothing to decide
            result = StepResult(
                epoch=self.last_epoch,
                model_velocity=None,
                velocity_change=None,
                lr_decayed=False,
                lrs=lrs,
                stop_reason=None,
                num_decays=rule.num_decays,
                train_loss=loss,
                stop_threshold=rule.stop_threshold,
                min_epochs=rule.min_epochs,
            )
        else:
            decided = rule.step(
                measurement.model_velocity,
                measurement.velocity_change,
                lrs,
                raw_change=self._raw_change(measurement),
                train_loss=loss,
            )
            result = dataclasses.replace(decided, epoch=self.last_epoch, layer_velocity=measurement.layer_velocity)
            if seen is not None and self._memorization is not None:
                result = self._memorization.decide(seen, rule, result)
            if result.lr_decayed:
                for group, lr in zip(self.optimizer.param_groups, result.lrs, strict=True):
                    group["lr"] = lr
        self._lrs = list(result.lrs)
        self._last = result
        return result

    def report_step(
        self, train_loss: float | torch.Tensor | None = None, *, who: str = "NeVe.report_step"
    ) -> dict[str, float]:
        """The metrics to report for this epoch (:meth:`metrics`), stepping NeVe first when given a loss.

        The one report path of the integrations: ``neve_tune.ray.report_epoch`` and
        ``neve_tune.optuna.report_epoch`` call it once per epoch, and so can any other reporter. With
        ``train_loss``, it calls :meth:`step` with it before reading the metrics; without, the loop called
        :meth:`step` itself. Stepping twice in one epoch would measure an unchanged model (V near 0) and
        read it as convergence, so a ``train_loss`` passed here after the loop already called :meth:`step`
        since the last report raises ``ValueError``.

        Args:
            train_loss: the epoch's training loss (a number or a one-element tensor), or ``None``.
            who: the caller's name, for the error message (e.g. ``"report_epoch"``).

        Returns:
            :meth:`metrics` after this epoch's step: a flat dict of plain floats.

        Raises:
            ValueError: ``train_loss`` was given, but :meth:`step` was already called since the last report.
        """
        if train_loss is not None:
            if self._unreported_steps > 0:
                raise ValueError(
                    f"{who}(..., train_loss=...) steps NeVe itself, but neve.step() was already called for this"
                    " epoch. Either drop the neve.step() call, or pass the loss there (`neve.step(loss)`) and"
                    f" not to {who}."
                )
            warn_if_value_predates_restore(self.step(train_loss), who)
        self._unreported_steps = 0
        return self.metrics()

    def _raw_change(self, measurement: Measurement) -> float:
        """``u_t = mean_i (1 - rho_i^t)``, from this and the previous measurement's per-neuron velocities."""
        total = 0.0
        count = 0
        for v in measurement.layers.values():
            total += float(v.sum())
            count += v.numel()
        signed = total / count if count else math.nan
        previous = 0.0 if measurement.index == 0 else self._signed_mean
        self._signed_mean = signed
        return signed + self.monitor.momentum * previous

    def metrics(self) -> dict[str, float]:
        """The latest step as a flat dict of plain floats, keyed by :mod:`neve_tune.keys`.

        Keys: ``neve/epoch``, ``neve/model_velocity`` (absent before the first step and on a re-baseline
        step), ``neve/velocity_change`` (absent until the second step), ``neve/lr`` (group 0) and
        ``neve/lr_<i>`` for every group when there are several, ``neve/lr_decayed``,
        ``neve/num_decays``; the decision flags ``neve/converged``, ``neve/stalled``, ``neve/collapsed``,
        ``neve/memorizing``, ``neve/diverged`` (1.0 or 0.0); once :meth:`observe` fed the memorisation
        watch, ``neve/flip_fraction``, ``neve/flip_fraction_smoothed`` and ``neve/flip_min_epoch`` (each when
        it exists); the settings behind them, ``neve/stop_threshold`` and
        ``neve/min_epochs``; and ``neve/train_loss`` when the latest step was given one.
        """
        rule = self.rule
        last, lrs = self._last, self.get_lr()  # what the optimizer trains at, also after a load
        return flat_metrics(self.last_epoch, lrs, rule.num_decays, last, rule.stop_threshold, rule.min_epochs)

    def state_dict(self) -> dict[str, Any]:
        """Rule counters, monitor state (velocities and snapshot) and the last result; no optimizer."""
        last = self._last
        return {
            "last_epoch": self.last_epoch,
            "last_lr": list(self._lrs),
            "rule": self.rule.state_dict(),
            "monitor": self.monitor.state_dict(),
            "signed_mean": self._signed_mean,
            "memorization": None if self._memorization is None else self._memorization.state_dict(),
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
                "train_loss": last.train_loss,
                "detail": last.detail,
                "annealing": last.annealing,
                "flips": [last.flip_fraction, last.flip_fraction_smoothed, last.flip_min_epoch, last.restored_epoch],
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (load the optimizer's own state separately)."""
        load_memorization(self._memorization, state_dict["memorization"])  # first: it refuses another setting
        self.rule.load_state_dict(state_dict["rule"])
        self.rule.check_num_groups(len(self.optimizer.param_groups))
        self.monitor.load_state_dict(state_dict["monitor"])
        self.last_epoch = int(state_dict["last_epoch"])
        self._lrs = self.get_lr()  # the optimizer's (a state may come from another optimizer)
        self._signed_mean = float(state_dict["signed_mean"])
        self._unreported_steps = 0
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
                train_loss=last["train_loss"],
                detail=str(last["detail"]),
                stop_threshold=self.rule.stop_threshold,
                min_epochs=self.rule.min_epochs,
                annealing=bool(last["annealing"]),
                flip_fraction=last["flips"][0],
                flip_fraction_smoothed=last["flips"][1],
                flip_min_epoch=last["flips"][2],
                restored_epoch=last["flips"][3],
            )

    def close(self) -> None:
        """Release the monitor's hooks and snapshot."""
        self.monitor.close()

    def __repr__(self) -> str:
        v = None if self._last is None else self._last.model_velocity
        return f"NeVe(epoch={self.last_epoch}, model_velocity={v}, lrs={self._lrs}, rule={self.rule!r})"
