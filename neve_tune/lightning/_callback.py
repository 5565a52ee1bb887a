"""``NeVeCallback``: NeVe inside a PyTorch Lightning ``Trainer``."""

from __future__ import annotations

import copy
import inspect
import pickle
import warnings
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from neve_tune import NeVe, StepResult, StopReason
from neve_tune._measure.monitor import AuxInput

from ._optimizers import JointOptimizer, carry_decay_into_schedulers, current_lrs

#: The loss source that reads the loss ``training_step`` returns (its mean over the epoch's batches).
AUTO = "auto"
_STATE_VERSION = 1
_NEVE_OPTIONS = frozenset(inspect.signature(NeVe.__init__).parameters) - {"self", "model", "optimizer", "aux"}


class NeVeCallback(Callback):
    """Validation-free LR decay and early stopping from neural velocity, for a Lightning ``Trainer``.

    At the start of the fit it builds one :class:`neve_tune.NeVe` for the LightningModule (or its
    ``module`` attribute) and all of the Trainer's optimizers, and takes the baseline snapshot. At the end
    of every training epoch it measures the velocity on ``aux``, passing the epoch's mean training loss,
    decays the learning rates on a plateau, logs ``neve/*`` (``NeVe.metrics()``) with ``pl_module.log_dict``
    (to the Trainer's loggers and ``trainer.callback_metrics``), and sets ``trainer.should_stop`` when
    NeVe says converged, stalled, collapsed or diverged (:attr:`stop_reason` says which).

    * **Loss.** ``loss_key="auto"`` (default): the loss ``training_step`` returns (a tensor, or a dict's
      ``"loss"``; under gradient accumulation un-scaled again), averaged over the epoch's batches.
      ``loss_key="train_loss"``: ``trainer.callback_metrics["train_loss"]``, e.g. what
      ``self.log("train_loss", loss, on_epoch=True)`` aggregated. ``None``: no loss (NeVe then decides
      from the velocity alone; see ``neve_tune.NeVe``).
    * **Several optimizers.** NeVe sees the param groups of every optimizer, in order, as one list
      (:class:`~neve_tune.lightning.JointOptimizer`): one measurement, one decision, and a decay lowers
      every group's LR (``neve/lr_<i>`` per group, ``min_lr`` per group in that order).
    * **LR schedulers.** Yours keep running. A decay also scales the schedulers' ``base_lrs``, so both
      chainable schedulers and those that recompute from base LRs (``LambdaLR``, warm-ups) keep it.
      ``OneCycleLR`` and ``CyclicLR`` keep their targets in other fields and overwrite it: do not combine.
    * **Checkpoints.** The callback's state (NeVe's velocities, snapshot and counters, its history and the
      current epoch's loss sums) is saved in every Lightning checkpoint; ``trainer.fit(..., ckpt_path=...)``
      continues with identical velocities. A checkpoint taken after the epoch's last batch but before its
      end (``ModelCheckpoint`` on validation end) holds the epoch's weights and losses but not its NeVe
      step: the resumed fit takes that step first, before training on. ``state_snapshot="half"`` or
      ``"none"`` shrink the state (see ``neve_tune.VelocityMonitor``).
    * **Precision.** NeVe measures outside autocast on the Trainer's weights, so ``precision="bf16-mixed"``
      (or ``"16-mixed"``) needs nothing. ``"bf16-true"`` needs an aux set of the model's dtype.
    * **DDP.** Every rank measures its own (identical) replica on the same aux set, with the loss averaged
      over the ranks (``trainer.strategy.reduce``); rank 0's decision (LRs, stop) is broadcast and applied
      on every rank, so all ranks stop together. Sharded strategies (FSDP, DeepSpeed stage 3) are not
      supported: NeVe needs the full weights on each rank.
    * **Memorisation.** Return the batch's logits and dataset indices from ``training_step`` with the
      loss, ``return {"loss": loss, "logits": logits, "indices": idx}`` (a ``Dataset`` that yields
      ``(x, y, index)`` gives ``idx``), and the callback passes them to ``NeVe.observe``: NeVe then also
      stops as ``memorizing`` and puts the weights of the flip minimum back (``memorization=``, see
      :class:`neve_tune.Memorization`; ``memorization=None`` ignores them; one of the two alone warns once).
      The fit ends with those weights in the module (under DDP, rank 0's, sent to every rank). A
      ``ModelCheckpoint`` that saves on ``train_epoch_end`` after this callback holds them; one that saves on
      validation end runs before the restore.
    * **Ray Tune.** Put it before Ray's ``TuneReportCheckpointCallback(on="train_epoch_end")``; the ``neve/*``
      metrics then reach the report and ``neve_tune.ray.NeVeScheduler`` acts on them.
    * **Optuna.** ``optuna_trial=trial`` reports every epoch with ``neve_tune.optuna.report_epoch`` (the
      value: ``trainer.callback_metrics[optuna_metric]``, else the training loss); a converged trial
      stops (return your value: it ends COMPLETE), a stalled/collapsed/diverged one raises
      ``optuna.TrialPruned`` out of ``trainer.fit``.

    Each ``trainer.fit`` builds a fresh NeVe (new baseline) unless it resumes from a checkpoint.

    Args:
        aux: the aux set (see :func:`neve_tune.noise_aux`); the LightningModule is called on it.
        loss_key: where the epoch's training loss comes from (see above).
        module: the attribute of the LightningModule to measure (e.g. ``"net"``); ``None``: the module.
        log: log ``neve/*`` with ``pl_module.log_dict`` at every epoch.
        optuna_trial: an Optuna trial to report to (see above).
        optuna_metric: the ``callback_metrics`` key reported to Optuna (default: the training loss).
        **neve_options: passed to :class:`neve_tune.NeVe` (``momentum``, ``factor``, ``patience``,
            ``stop_threshold``, ``min_lr``, ``min_epochs``, ``num_classes``, ``criteria``, ``layers``,
            ``state_snapshot``, ...).

    Attributes:
        neve: the ``NeVe`` controller (``None`` before the fit starts).
        history: ``neve.metrics()`` after every epoch's step.
    """

    def __init__(
        self,
        aux: AuxInput,
        *,
        loss_key: str | None = AUTO,
        module: str | None = None,
        log: bool = True,
        optuna_trial: Any = None,
        optuna_metric: str | None = None,
        **neve_options: Any,
    ) -> None:
        unknown = sorted(set(neve_options) - _NEVE_OPTIONS)
        if unknown:
            raise TypeError(f"NeVeCallback got unknown NeVe options {unknown}; NeVe takes {sorted(_NEVE_OPTIONS)}.")
        if loss_key is not None and not isinstance(loss_key, str):
            raise TypeError(f"loss_key must be 'auto', a callback_metrics key or None, but got {loss_key!r}.")
        self.aux = aux
        self.loss_key = loss_key
        self.module = module
        self.log_metrics = log
        self.neve_options = dict(neve_options)
        self.neve: NeVe | None = None
        self.history: list[dict[str, float]] = []
        self._optuna_trial = optuna_trial
        self._optuna_metric = optuna_metric
        self._pending: dict[str, Any] | None = None  # a checkpoint's state, loaded before the NeVe exists
        self._built = False  # whether this fit's NeVe exists
        self._warned_no_loss = False
        self._warned_half_observe = False
        self._epoch: int | None = None  # the epoch whose batches the sums below hold
        self._batches = 0
        self._loss_sum: torch.Tensor | None = None
        self._loss_count = 0

    # ------------------------------------------------------------------ results
    @property
    def stop_reason(self) -> StopReason | None:
        """Why NeVe stopped (or says to stop) the fit after the latest epoch, or ``None``."""
        return None if self.neve is None else self.neve.stop_reason

    @property
    def last_result(self) -> StepResult | None:
        """The latest :class:`neve_tune.StepResult`, or ``None``."""
        return None if self.neve is None else self.neve.last_result

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._built = False  # a checkpoint restored from now on is for the NeVe this fit builds

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_callback_order(trainer)
        optimizers = list(trainer.optimizers)
        if not optimizers:
            raise ValueError("NeVeCallback needs an optimizer: return one from configure_optimizers().")
        optimizer = optimizers[0] if len(optimizers) == 1 else JointOptimizer(optimizers)
        model = self._measured_module(pl_module)
        try:
            self.neve = NeVe(model, optimizer, self.aux, **self.neve_options)
        except (NotImplementedError, ValueError) as err:
            if not isinstance(err, NotImplementedError) and not isinstance(err.__cause__, NotImplementedError):
                raise
            raise TypeError(
                f"NeVeCallback measures by calling {type(model).__name__} on the aux set, but its forward() is"
                " not implemented: define forward(x), or pass module='<attribute>' naming the network to measure."
            ) from err
        self.history = []
        self._built = True
        if self._pending is not None:
            self._load(self._pending)
            self._pending = None
        else:
            self._reset_epoch()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._batches and self._epoch is not None and self._epoch < trainer.current_epoch:
            self._step(trainer, pl_module)  # resumed from a checkpoint taken between the last batch and the end
        if self._epoch != trainer.current_epoch:
            self._reset_epoch()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._epoch = trainer.current_epoch
        self._batches += 1
        if isinstance(outputs, Mapping) and self.neve is not None and self.neve.watch is not None:
            self._observe(outputs)
        if self.loss_key != AUTO:
            return
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            loss = loss.detach().reshape(()).to(torch.float64)
            if pl_module.automatic_optimization:
                loss = loss * trainer.accumulate_grad_batches  # Lightning divided it for the backward
            self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss.to(self._loss_sum.device)
            self._loss_count += 1

    def _observe(self, outputs: Mapping[str, Any]) -> None:
        """Feed ``training_step``'s ``logits`` and ``indices`` to the memorisation watch; warn once when only one
        of them is there (the watch then sees nothing). With ``memorization=None`` it is not called."""
        assert self.neve is not None
        has = [key for key in ("logits", "indices") if key in outputs]
        if len(has) == 2:
            self.neve.observe(outputs["logits"], outputs["indices"])
        elif has and not self._warned_half_observe:
            self._warned_half_observe = True
            missing = "indices" if has == ["logits"] else "logits"
            warnings.warn(
                f"training_step returned {has[0]!r} but no {missing!r}: NeVeCallback feeds NeVe's memorisation watch"
                " only with both, so it sees nothing and NeVe will not stop for memorization. Return"
                " {'loss': loss, 'logits': logits, 'indices': idx} (a Dataset that yields (x, y, index) gives idx),"
                " or pass memorization=None to NeVeCallback.",
                UserWarning,
                stacklevel=2,
            )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._batches:
            self._step(trainer, pl_module)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """NeVe's state, the per-epoch history and the current epoch's loss sums (saved in checkpoints)."""
        if self._pending is not None and not self._built:
            return dict(self._pending)
        return {
            "version": _STATE_VERSION,
            "neve": None if self.neve is None else self.neve.state_dict(),
            "history": [dict(h) for h in self.history],
            "epoch": self._epoch,
            "batches": self._batches,
            "loss_sum": None if self._loss_sum is None else float(self._loss_sum),
            "loss_count": self._loss_count,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (now, or when the fit builds its NeVe)."""
        if self.neve is not None and self._built:  # a strategy that restores after on_fit_start
            self._load(state_dict)
        else:
            self._pending = dict(state_dict)

    def _load(self, state: Mapping[str, Any]) -> None:
        assert self.neve is not None
        if state.get("neve") is not None:
            self.neve.load_state_dict(state["neve"])
        self.history = [dict(h) for h in state.get("history", [])]
        epoch = state.get("epoch")
        self._epoch = None if epoch is None else int(epoch)
        self._batches = int(state.get("batches", 0))
        loss_sum = state.get("loss_sum")
        self._loss_sum = None if loss_sum is None else torch.tensor(float(loss_sum), dtype=torch.float64)
        self._loss_count = int(state.get("loss_count", 0))

    # ------------------------------------------------------------------ the step
    def _step(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        neve = self.neve
        assert neve is not None
        optimizers = list(trainer.optimizers)
        loss = self._epoch_loss(trainer)
        before = current_lrs(optimizers)
        result = neve.step(loss)
        metrics, lrs, should_stop, restored = trainer.strategy.broadcast(
            (neve.metrics(), neve.get_last_lr(), neve.should_stop, result.restored_epoch)
        )
        if restored is not None and trainer.world_size > 1:  # rank 0's kept weights, on every rank
            module = self._measured_module(pl_module)
            module.load_state_dict(trainer.strategy.broadcast(module.state_dict()))
        if lrs != current_lrs(optimizers):  # another rank's float noise: rank 0 decides
            for group, lr in zip((g for o in optimizers for g in o.param_groups), lrs, strict=True):
                group["lr"] = lr
        carry_decay_into_schedulers(optimizers, [c.scheduler for c in trainer.lr_scheduler_configs], before)
        self.history.append(dict(metrics))
        self._reset_epoch()
        if self.log_metrics:  # called from on_train_epoch_end (or _start, on a resume): both may log per epoch
            pl_module.log_dict(
                metrics, on_step=False, on_epoch=True, prog_bar=False, logger=bool(trainer.loggers), batch_size=1
            )
        if should_stop:
            trainer.should_stop = True
        if self._optuna_trial is not None:
            self._report_to_optuna(trainer, loss)

    def _epoch_loss(self, trainer: pl.Trainer) -> float | None:
        if self.loss_key is None:
            return None
        if self.loss_key != AUTO:
            value = trainer.callback_metrics.get(self.loss_key)
            if value is None:
                raise KeyError(
                    f"NeVeCallback(loss_key={self.loss_key!r}): no such metric in trainer.callback_metrics"
                    f" (it has {sorted(trainer.callback_metrics)}). Log it in training_step with"
                    f" self.log({self.loss_key!r}, loss, on_epoch=True) (with on_step=True as well, its epoch"
                    f" value is '{self.loss_key}_epoch'), or use loss_key='auto'."
                )
            return float(value)
        if self._loss_sum is None or self._loss_count == 0:
            if not self._warned_no_loss:
                self._warned_no_loss = True
                warnings.warn(
                    "NeVeCallback found no loss in training_step's outputs this epoch, so NeVe decides without"
                    " the training loss (it cannot tell 'learned and settled' from 'never learned' as well)."
                    " Return the loss from training_step, or log it and pass loss_key='<its name>'.",
                    stacklevel=2,
                )
            return None
        mean = self._loss_sum / self._loss_count
        return float(trainer.strategy.reduce(mean, reduce_op="mean"))

    def _report_to_optuna(self, trainer: pl.Trainer, loss: float | None) -> None:
        from neve_tune.optuna import report_epoch  # only with optuna_trial: optuna is an optional extra

        assert self.neve is not None
        if self._optuna_metric is not None:
            metric = trainer.callback_metrics.get(self._optuna_metric)
            if metric is None:
                raise KeyError(
                    f"NeVeCallback(optuna_metric={self._optuna_metric!r}): no such metric in"
                    f" trainer.callback_metrics (it has {sorted(trainer.callback_metrics)})."
                )
            value = float(metric)
        elif loss is not None:
            value = loss
        else:
            raise ValueError(
                "NeVeCallback(optuna_trial=...) reports a value per epoch, but there is no training loss:"
                " pass optuna_metric='<a callback_metrics key>'."
            )
        cap = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs > 0 else None
        if report_epoch(self._optuna_trial, self.neve, value, max_epochs=cap) is not None:
            trainer.should_stop = True

    # ------------------------------------------------------------------ helpers
    def _reset_epoch(self) -> None:
        self._epoch = None
        self._batches = 0
        self._loss_sum = None
        self._loss_count = 0

    def _measured_module(self, pl_module: pl.LightningModule) -> nn.Module:
        if self.module is None:
            return pl_module
        target = pl_module
        for part in self.module.split("."):
            target = getattr(target, part, None)
            if target is None:
                break
        if not isinstance(target, nn.Module):
            raise ValueError(
                f"NeVeCallback(module={self.module!r}): {type(pl_module).__name__} has no submodule by that name."
            )
        return target

    def _check_callback_order(self, trainer: pl.Trainer) -> None:
        """Ray's report callbacks read ``callback_metrics``: they must run after this one logs."""
        callbacks = list(getattr(trainer, "callbacks", []))
        mine = callbacks.index(self) if self in callbacks else len(callbacks)
        for i, cb in enumerate(callbacks):
            hooks = getattr(cb, "_on", ()) if type(cb).__module__.startswith("ray.") else ()
            if "on_train_epoch_end" in hooks and i < mine:
                raise ValueError(
                    f"{type(cb).__name__} comes before NeVeCallback in Trainer(callbacks=[...]), so it would report"
                    " each epoch before NeVe measured it. Put NeVeCallback first."
                )
            if "on_validation_end" in hooks:
                warnings.warn(
                    f"{type(cb).__name__}(on='validation_end') reports before NeVe measures the epoch (at its end),"
                    " so its neve/* metrics lag one epoch. Pass on='train_epoch_end'.",
                    stacklevel=2,
                )

    # ------------------------------------------------------------------ copies
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        trial = state.get("_optuna_trial")
        if trial is not None:
            try:
                pickle.dumps(trial)
            except Exception as err:
                raise TypeError(
                    "This NeVeCallback holds an Optuna trial, which cannot be pickled: build the callback inside"
                    " the objective (where the trial is) instead of pickling it."
                ) from err
        return state

    def __deepcopy__(self, memo: dict[int, Any]) -> NeVeCallback:
        if self._optuna_trial is not None:
            memo[id(self._optuna_trial)] = self._optuna_trial  # a copy still reports to the same trial
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for name, value in self.__dict__.items():
            setattr(new, name, copy.deepcopy(value, memo))
        return new

    def __repr__(self) -> str:
        epoch = 0 if self.neve is None else self.neve.last_epoch
        return f"NeVeCallback(epoch={epoch}, stop_reason={self.stop_reason}, loss_key={self.loss_key!r})"
