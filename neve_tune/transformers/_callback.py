"""``NeVeCallback``: NeVe inside the Hugging Face ``Trainer`` loop."""

from __future__ import annotations

import logging
import math
import os
import sys
import warnings
from typing import Any

import torch
from torch.optim import Optimizer
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from neve_tune import NeVe, StepResult
from neve_tune._measure.monitor import AuxInput
from neve_tune.keys import StopReason

logger = logging.getLogger(__name__)

#: The file NeVeCallback writes into every Trainer checkpoint folder (``checkpoint-<step>/``).
STATE_FILE = "neve_state.pt"

_MISUSE = (
    "The Trainer was given a NeVe as its LR scheduler (Trainer(optimizers=(optimizer, neve))). The Trainer"
    " calls lr_scheduler.step() after every optimizer step, so NeVe would measure after every batch, not"
    " once per epoch, and decide on that. Let NeVeCallback build and step NeVe instead: pass"
    " `optimizers=(optimizer, None)` (or your own LR scheduler) and `callbacks=[NeVeCallback(aux, ...)]`,"
    " with the NeVe options given to NeVeCallback."
)


class NeVeCallback(TrainerCallback):
    """NeVe for ``transformers.Trainer``: validation-free LR decay and early stopping as a callback.

    ``Trainer(model, args, train_dataset=..., callbacks=[NeVeCallback(aux)])``. When training begins, it
    builds a :class:`neve_tune.NeVe` for the Trainer's model and optimizer (taking the baseline snapshot
    then), and steps it:

    * once per epoch (default), or every ``every_n_steps`` optimizer steps (``state.global_step % N == 0``)
      for long fine-tuning runs; NeVe's "epoch" is then one such period (``patience`` and ``min_epochs``
      count periods);
    * with the training loss: the mean of the losses the Trainer logged since the previous NeVe step,
      weighted by the steps each covers. At a measurement point the callback sets ``control.should_log``, so
      the Trainer logs the loss of the last steps first (whatever ``logging_steps`` is) and NeVe steps in
      the ``on_log`` that follows.

    Learning rate: the Trainer's scheduler (a ``LambdaLR`` for ``"linear"``, ``"cosine"``, ``"constant"``,
    ...) sets ``lr = base_lr * lambda(step)`` at every step, which would undo a plain decay of the param
    group's ``lr`` at the next step. On a decay, the callback therefore scales the scheduler's
    ``base_lrs`` (and each group's ``initial_lr``, and the last LR that ``get_last_lr()`` reports and the
    Trainer logs) by the same factor as the current LR: the schedule goes on, ``factor`` times lower.
    ``min_lr`` floors the decay itself, not the schedule that follows.

    Stopping: when NeVe says converged, stalled, collapsed or diverged, ``control.should_training_stop``
    is set (a checkpoint the save strategy asks for at that step is still written); :attr:`stop_reason`
    says why.

    Logging: the step's ``neve/*`` metrics (:meth:`neve_tune.NeVe.metrics`) are merged into the Trainer's
    log entry of that step in ``state.log_history`` and into the ``logs`` later callbacks receive. Reporting
    callbacks of ``report_to`` run before user callbacks, so with ``"mlflow"`` in ``report_to`` the
    callback also logs them to the MLflow run the Trainer's ``MLflowCallback`` opened (same step). For
    another logger, pass its callback after this one in ``callbacks=``.

    Checkpoints: on every Trainer save, the NeVe state goes into ``checkpoint-<step>/`` as
    :data:`STATE_FILE`. A resumed training (``trainer.train(resume_from_checkpoint=...)``) loads it from
    ``args.resume_from_checkpoint`` when that is a folder, else from ``args.output_dir/checkpoint-<step>``,
    and continues with identical velocities; without one it warns and takes a fresh baseline.

    Misuse: ``Trainer(optimizers=(optimizer, neve))`` makes the Trainer step NeVe after every batch; with
    this callback present, training refuses to start with a message that says what to pass instead (and
    without it, ``NeVe.step()`` refuses the Trainer's first per-batch call with the same advice).

    NaN policy: NeVe's (a NaN/inf velocity or loss means diverged). Note that the Trainer's
    ``logging_nan_inf_filter=True`` (its default) replaces NaN/inf batch losses in the logged loss, so a
    divergence is then seen through the velocities only.

    Args:
        aux: the aux set (e.g. :func:`neve_tune.token_aux` with ``attention_mask="full"`` for a Hugging
            Face model, which the monitor calls as ``model(**batch)``).
        every_n_steps: measure every N optimizer steps instead of at each epoch end (``None``).
        **neve_options: passed to :class:`neve_tune.NeVe` (``factor``, ``patience``, ``stop_threshold``,
            ``min_epochs``, ``batch_size``, ``state_snapshot``, ...).

    Attributes:
        neve: the :class:`neve_tune.NeVe` of the current training (``None`` before it begins).
        stop_reason: why training was stopped (a :class:`neve_tune.StopReason`), ``None`` while it runs on.
        last_result: the latest :class:`neve_tune.StepResult`, ``None`` before the first step.

    Raises:
        ValueError: ``every_n_steps`` is not an integer >= 1; at train begin, a NeVe is the Trainer's LR
            scheduler (see Misuse).
    """

    def __init__(self, aux: AuxInput, *, every_n_steps: int | None = None, **neve_options: Any) -> None:
        if every_n_steps is not None and (
            isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1
        ):
            raise ValueError(f"every_n_steps must be an integer >= 1 or None, but got {every_n_steps=}.")
        if "model" in neve_options or "optimizer" in neve_options:
            raise TypeError(
                "NeVeCallback takes the Trainer's model and optimizer itself; pass only NeVe's options"
                " (factor=, patience=, stop_threshold=, min_epochs=, ...)."
            )
        self.aux = aux
        self.every_n_steps = every_n_steps
        self.neve_options = dict(neve_options)
        self.neve: NeVe | None = None
        self.stop_reason: StopReason | None = None
        self.last_result: StepResult | None = None
        self._scheduler: Any = None
        self._pending = False  # a measurement point passed; NeVe steps at the loss log that follows
        self._loss_sum = 0.0  # sum of logged losses x the steps each covers, since the last NeVe step
        self._loss_steps = 0
        self._last_logged_step = 0  # global step of the latest logged training loss

    # ------------------------------------------------------------------ Trainer events
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Refuse a NeVe as the Trainer's scheduler; build NeVe (restoring it when training resumes)."""
        scheduler = _unwrap(kwargs.get("lr_scheduler"), "scheduler")
        if isinstance(scheduler, NeVe):
            raise ValueError(_MISUSE)
        model, optimizer = kwargs.get("model"), _unwrap(kwargs.get("optimizer"), "optimizer")
        if model is None or not isinstance(optimizer, Optimizer):
            raise RuntimeError(
                "NeVeCallback needs the Trainer's model and optimizer at train begin, but got"
                f" model={type(model).__name__}, optimizer={type(optimizer).__name__}. Use it with"
                " transformers.Trainer (callbacks=[NeVeCallback(aux)])."
            )
        if self.neve is not None:
            self.neve.close()  # a second trainer.train(): a new optimizer, a new NeVe
        self.neve = NeVe(model, optimizer, self.aux, **self.neve_options)
        self._scheduler = scheduler
        self.stop_reason, self.last_result = None, None
        self._pending, self._loss_sum, self._loss_steps = False, 0.0, 0
        self._last_logged_step = state.global_step
        if state.global_step > 0:
            self._restore(args, state)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """With ``every_n_steps``: a measurement point every N optimizer steps."""
        if self.every_n_steps is not None and state.global_step % self.every_n_steps == 0:
            self._measurement_point(args, state, control)

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Without ``every_n_steps``: a measurement point at each epoch end."""
        if self.every_n_steps is None:
            self._measurement_point(args, state, control)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Collect the logged training loss; step NeVe when a measurement point asked for this log."""
        if not logs or "loss" not in logs:
            return  # an evaluation or the end-of-training summary
        loss = float(logs["loss"])
        covered = state.global_step - self._last_logged_step
        if covered > 0:
            self._loss_sum += loss * covered
            self._loss_steps += covered
            self._last_logged_step = state.global_step
        if self._pending:
            self._step(args, state, control, logs)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Write NeVe's state into the checkpoint folder the Trainer just saved."""
        if self.neve is None or not state.is_world_process_zero:
            return
        folder = os.path.join(str(args.output_dir), f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if not os.path.isdir(folder):
            warnings.warn(
                f"NeVeCallback: the Trainer saved a checkpoint, but {folder} does not exist (a hyperparameter"
                " search run folder?); NeVe's state was not saved with it.",
                UserWarning,
                stacklevel=2,
            )
            return
        torch.save(self._state(state), os.path.join(folder, STATE_FILE))

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """A measurement point whose loss log never came (nothing to log): step without a loss."""
        if self._pending:
            self._step(args, state, control, None)

    # ------------------------------------------------------------------ the NeVe step
    def _measurement_point(self, args: TrainingArguments, state: TrainerState, control: TrainerControl) -> None:
        if self.neve is None or self.stop_reason is not None:
            return
        self._pending = True
        if state.global_step > self._last_logged_step:
            control.should_log = True  # the Trainer logs the latest steps' loss now; NeVe steps in on_log
        else:
            self._step(args, state, control, None)  # every step's loss is in already

    def _step(
        self, args: TrainingArguments | None, state: TrainerState, control: TrainerControl, logs: dict[str, Any] | None
    ) -> None:
        neve = self.neve
        assert neve is not None, "NeVe is built at train begin"
        self._pending = False
        loss = self._loss_sum / self._loss_steps if self._loss_steps else None
        self._loss_sum, self._loss_steps = 0.0, 0
        before = [float(g["lr"]) for g in neve.optimizer.param_groups]
        result = neve.step(loss)
        self.last_result = result
        if result.lr_decayed:
            self._keep_decay(before)
        metrics = neve.metrics()
        if logs is not None:
            logs.update(metrics)  # for the callbacks after this one
        entry = state.log_history[-1] if state.log_history else None
        if entry is not None and entry.get("step") == state.global_step and "loss" in entry:
            entry.update(metrics)
        else:
            state.log_history.append({**metrics, "epoch": state.epoch, "step": state.global_step})
        self._forward_to_mlflow(args, state, metrics)
        if result.should_stop:
            self.stop_reason = result.stop_reason
            control.should_training_stop = True
            logger.info("NeVe: %s", result.message)

    def _keep_decay(self, before: list[float]) -> None:
        """Make a decay durable: scale the scheduler's ``base_lrs`` and the groups' ``initial_lr`` alike."""
        assert self.neve is not None
        groups = self.neve.optimizer.param_groups
        base = getattr(self._scheduler, "base_lrs", None)
        for i, (group, old) in enumerate(zip(groups, before, strict=True)):
            new = float(group["lr"])
            if not (old > 0 and math.isfinite(old)) or new == old:
                continue
            ratio = new / old
            if "initial_lr" in group:
                group["initial_lr"] = float(group["initial_lr"]) * ratio
            if isinstance(base, list) and i < len(base):
                base[i] = float(base[i]) * ratio
        last = getattr(self._scheduler, "_last_lr", None)
        if isinstance(last, list) and len(last) == len(groups):  # get_last_lr(), which the Trainer logs
            self._scheduler._last_lr = [float(g["lr"]) for g in groups]

    def _forward_to_mlflow(
        self, args: TrainingArguments | None, state: TrainerState, metrics: dict[str, float]
    ) -> None:
        """Log to the Trainer's MLflow run: its ``MLflowCallback`` saw the step's logs before this callback."""
        report_to = [] if args is None else (args.report_to or [])
        mlflow = sys.modules.get("mlflow")
        if "mlflow" not in report_to or mlflow is None or not state.is_world_process_zero:
            return
        if mlflow.active_run() is not None:
            mlflow.log_metrics(metrics, step=state.global_step)

    # ------------------------------------------------------------------ state
    def _state(self, state: TrainerState) -> dict[str, Any]:
        assert self.neve is not None
        return {
            "global_step": state.global_step,
            "neve": self.neve.state_dict(),
            "loss_sum": self._loss_sum,
            "loss_steps": self._loss_steps,
            "stop_reason": None if self.stop_reason is None else self.stop_reason.value,
        }

    def _restore(self, args: TrainingArguments, state: TrainerState) -> None:
        assert self.neve is not None
        folders = [f for f in (getattr(args, "resume_from_checkpoint", None),) if isinstance(f, str)]
        folders.append(os.path.join(str(args.output_dir), f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"))
        for folder in folders:
            path = os.path.join(folder, STATE_FILE)
            if not os.path.isfile(path):
                continue
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if int(saved["global_step"]) != state.global_step:
                continue
            self.neve.load_state_dict(saved["neve"])
            self._loss_sum, self._loss_steps = float(saved["loss_sum"]), int(saved["loss_steps"])
            return  # a saved stop reason is not restored: resuming a stopped run means to train on
        warnings.warn(
            f"NeVeCallback: training resumed at step {state.global_step}, but no {STATE_FILE} for that step was"
            f" found in {folders}. NeVe takes a fresh baseline now (its epoch count restarts at 0). Resume from a"
            " checkpoint written while NeVeCallback was attached, or set args.resume_from_checkpoint to it.",
            UserWarning,
            stacklevel=3,
        )


def _unwrap(obj: Any, attr: str) -> Any:
    """The torch object inside Accelerate's ``AcceleratedOptimizer`` / ``AcceleratedScheduler`` wrappers."""
    inner = getattr(obj, attr, None)
    return obj if inner is None or type(obj).__module__.split(".")[0] != "accelerate" else inner
