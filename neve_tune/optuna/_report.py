from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Protocol

import optuna

from neve_tune import NeVe, StopReason, decide, keys
from neve_tune.optuna._attrs import (
    HISTORY_ATTR,
    NEVE_ATTR,
    STEP_KEY,
    STOP_EPOCH_ATTR,
    STOP_REASON_ATTR,
    decode,
    encode_entry,
)


class _HasMetrics(Protocol):
    """A ``neve_tune.NeVe`` or a ``neve_tune.StepResult``: both build their dict with the same function."""

    def metrics(self) -> dict[str, float]: ...


NeVeLike = _HasMetrics | Mapping[str, float]


def _as_metrics(neve: Any) -> dict[str, float]:
    """``metrics()`` of a NeVe controller or a StepResult (the one builder), or a flat mapping's floats."""
    if callable(getattr(neve, "metrics", None)):
        return dict(neve.metrics())
    if isinstance(neve, Mapping):
        return {str(k): float(v) for k, v in neve.items()}
    raise TypeError(
        "report_epoch expects a neve_tune.NeVe, a neve_tune.StepResult or a dict of NeVe metrics"
        f" (neve.metrics()), but got {type(neve).__name__}."
    )


def report_epoch(
    trial: optuna.trial.BaseTrial,
    neve: NeVeLike,
    value: float,
    *,
    step: int | None = None,
    max_epochs: int | None = None,
    train_loss: float | Any | None = None,
) -> StopReason | None:
    """Report one epoch to Optuna and say whether to stop: the NeVe training loop's only Optuna call.

    Call it at the end of every epoch, either after ``neve.step(loss)`` or, with ``train_loss=``, instead
    of it: ``report_epoch(trial, neve, value, train_loss=epoch_loss)`` calls ``neve.step(epoch_loss)``
    itself, so NeVe's decision uses the training loss (the stalled test and the chance-level check need
    it; see ``neve_tune.NeVe``). Calling both ``neve.step()`` and ``report_epoch(..., train_loss=...)``
    in one epoch raises ``ValueError``. It stores NeVe's metrics in the trial's
    user attributes (``"neve"``: this step, ``"neve_history"``: every step), reports ``value`` with
    ``trial.report(value, step)``, and then:

    * returns :obj:`None` to keep training;
    * returns ``StopReason.CONVERGED`` (or ``MEMORIZING``) when the trial's NeVe says training is done and
      the pruner did not prune it: stop and **return the objective's value**, so the trial ends ``COMPLETE``
      and counts for ``best_trial`` (on ``memorizing`` the model holds the weights NeVe put back: evaluate
      it after ``neve.step()`` and return that);
    * returns ``StopReason.MAX_T`` at epoch ``max_epochs`` (when given): the budget is spent;
    * raises :class:`optuna.TrialPruned` when the study's pruner prunes it: a
      :class:`~neve_tune.optuna.NeVePruner` does when the trial's NeVe says it diverged (NaN/inf velocity
      or loss), stalled (stopped moving, or sits at chance, without having learned) or collapsed (its aux
      responses froze), or when its wrapped pruner prunes on ``value``: the trial ends ``PRUNED``, never
      ``best_trial``.

    On every stop it records the user attributes ``neve_stop_reason`` (``"converged"``, ``"memorizing"``, ``"max_t"``,
    ``"stalled"``, ``"collapsed"``, ``"diverged"`` or ``"pruned"``) and
    ``neve_stop_epoch`` (``neve/epoch``: epochs trained). The return
    value is truthy exactly when the loop should end, so ``if report_epoch(...): break`` is the idiom.

    Who decides: the study's pruner alone decides whether the trial is pruned (``trial.should_prune()``).
    A :class:`~neve_tune.optuna.NeVePruner` reads the trial's own NeVe decision from the ``"neve"`` attribute
    stored here, on its check steps (``n_warmup_steps``, ``interval_steps``), then asks its wrapped pruner.
    The trial's NeVe flags (:func:`neve_tune.decide`) name the reason of a pruned trial and say when it
    converged. Another pruner, or a :class:`optuna.trial.FixedTrial`, does not read NeVe: a diverged,
    stalled or collapsed trial is then not pruned by NeVe (wrap your pruner: ``NeVePruner(yours)``); a
    converged one still ends.

    Re-running a step (a trial retried by ``RetryHeartbeatStaleTrialCallback`` inherits the failed
    attempt's attributes, or a trial resumed from a checkpoint) drops the history from that step on, so
    ``"neve_history"`` always describes one consistent run.

    NaN policy: a NaN/inf model velocity or velocity change is a divergence (the trial is pruned); a NaN
    ``value`` is reported as is and left to the study's pruner.

    Args:
        trial: the trial passed to the objective.
        neve: the :class:`neve_tune.NeVe` controller (after its ``step()`` for this epoch), the
            :class:`neve_tune.StepResult` that ``step()`` returned, or a dict of NeVe metrics.
        value: this epoch's objective value (e.g. training or test accuracy), for ``trial.report``: a
            number (``None`` raises ``TypeError``: Optuna's pruners need a value at every step; a
            validation-free loop reports its training loss or accuracy).
        step: the Optuna step; defaults to ``neve/epoch - 1`` (0 after the first epoch).
        max_epochs: the epoch budget; reaching it returns ``StopReason.MAX_T``.
        train_loss: the epoch's training loss (a number or a one-element tensor): step ``neve`` (a
            ``NeVe``) with it before reporting. ``None``: the loop called ``neve.step()`` itself.

    Returns:
        Why to stop (``CONVERGED``, ``MEMORIZING`` or ``MAX_T``), or ``None`` to continue.

    Raises:
        optuna.TrialPruned: the trial diverged, stalled, collapsed or was pruned.
        TypeError: ``value`` is ``None`` or a string.
        NotImplementedError: the study is multi-objective (Optuna has no ``trial.report`` there); the
            message says how to use NeVe in such a study.
    """
    _refuse_multi_objective(trial)
    if value is None or isinstance(value, (str, bytes)):
        raise TypeError(
            f"report_epoch(trial, neve, value): value is this epoch's objective value, stored with"
            f" trial.report(value, step), and must be a number, but got {value!r}. Pass a number (e.g. the"
            " epoch's training loss or accuracy, in the study's direction); to give NeVe the training loss, use"
            " train_loss=epoch_loss (None there means the loop called neve.step() itself)."
        )
    if isinstance(neve, NeVe):
        metrics = neve.report_step(train_loss, who="report_epoch")  # steps NeVe first when given the loss
    elif train_loss is not None:
        raise TypeError(
            "report_epoch(..., train_loss=...) steps NeVe itself, so it needs the neve_tune.NeVe"
            f" controller, but got {type(neve).__name__}."
        )
    else:
        metrics = _as_metrics(neve)
    if keys.EPOCH not in metrics or metrics[keys.EPOCH] < 1:
        raise ValueError(
            f"report_epoch needs NeVe metrics of a finished epoch ({keys.EPOCH!r} >= 1), but got"
            f" {metrics.get(keys.EPOCH)}; call neve.step() after the epoch's training, then report_epoch."
        )
    if max_epochs is not None and max_epochs < 1:
        raise ValueError(f"max_epochs must be at least 1, but got {max_epochs=}.")
    epoch = int(metrics[keys.EPOCH])
    step = epoch - 1 if step is None else int(step)
    if step < 0:
        raise ValueError(f"step must be a non-negative integer, but got {step=}.")

    entry = encode_entry(step, value, metrics)
    earlier = trial.user_attrs.get(HISTORY_ATTR, [])
    history = [dict(e) for e in earlier if isinstance(e, Mapping) and e.get(STEP_KEY, -1) < step]
    history.append(dict(entry))
    trial.set_user_attr(NEVE_ATTR, entry)
    trial.set_user_attr(HISTORY_ATTR, history)
    trial.report(value, step)

    # The study's pruner alone decides whether the trial is pruned (a NeVePruner reads the "neve" attribute
    # just stored: the trial's own NeVe decision, at its check steps); the trial's flags name the reason.
    own = decide(metrics)
    reason: StopReason | None = None
    if trial.should_prune():
        reason = own if own is not None and own.is_failure else StopReason.PRUNED
    elif own is not None and not own.is_failure:  # converged or memorizing: done, COMPLETE
        reason = own
    if reason is None and max_epochs is not None and epoch >= max_epochs:
        reason = StopReason.MAX_T
    if reason is None:
        return None

    trial.set_user_attr(STOP_REASON_ATTR, reason.value)
    trial.set_user_attr(STOP_EPOCH_ATTR, epoch)
    if reason.is_failure:
        raise optuna.TrialPruned(_pruned_message(trial.number, reason, epoch, metrics, value))
    return reason


def _refuse_multi_objective(trial: optuna.trial.BaseTrial) -> None:
    """Optuna's ``trial.report`` (and so pruning) does not exist in multi-objective studies: say what does."""
    study = getattr(trial, "study", None)
    directions = getattr(study, "directions", [])
    if len(directions) > 1:
        names = [d.name.lower() for d in directions]
        raise NotImplementedError(
            f"report_epoch reports each epoch with trial.report(), which Optuna does not support in a"
            f" multi-objective study (this one has {len(directions)} directions: {names}), so no pruner can act"
            " on it. Use NeVe directly there: call neve.step(epoch_loss) after every epoch, end the loop with"
            " `if neve.should_stop: break`, keep neve.stop_reason and neve.metrics() with"
            " trial.set_user_attr(...) if you want them, and return your objectives' values."
        )


def _pruned_message(number: int, reason: StopReason, epoch: int, metrics: Mapping[str, float], value: float) -> str:
    if reason is StopReason.DIVERGED:
        velocity = metrics.get(keys.MODEL_VELOCITY, math.nan)
        change = metrics.get(keys.VELOCITY_CHANGE)
        return (
            f"Trial {number} diverged at epoch {epoch}: model velocity {decode(velocity)}, velocity change"
            f" {change}. Lower the learning rate or check the loss."
        )
    if reason is StopReason.STALLED:
        return (
            f"Trial {number} stalled at epoch {epoch}: its NeVe says it stopped moving (or sits at chance)"
            " without having learned. Check the learning rate."
        )
    if reason is StopReason.COLLAPSED:
        return (
            f"Trial {number} collapsed at epoch {epoch}: its NeVe saw its aux responses freeze (dead units)."
            " The learning rate is likely too large."
        )
    return f"Trial {number} was pruned at epoch {epoch} on its reported value {value}."
