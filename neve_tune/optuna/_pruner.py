from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from optuna.pruners import BasePruner, HyperbandPruner

from neve_tune import StopReason, decide, keys, settings_disagreement
from neve_tune.optuna._attrs import NEVE_ATTR, STEP_KEY

if TYPE_CHECKING:
    import optuna

_HOW_TO_REPORT = (
    "Call `neve_tune.optuna.report_epoch(trial, neve, value)` after every epoch (it reports the value and"
    f" stores the metrics), or set them yourself with `trial.set_user_attr({NEVE_ATTR!r},"
    f" {{{STEP_KEY!r}: step, **neve.metrics()}})` before `trial.report(value, step)`."
)


def _is_check_step(step: int, reported_steps: Iterable[int], n_warmup_steps: int, interval_steps: int) -> bool:
    """Whether ``step`` is a pruning check, with the warmup/interval semantics of Optuna's own pruners.

    Checks happen at ``n_warmup_steps``, ``n_warmup_steps + interval_steps``, ...; a check that falls on
    a step that was not reported is postponed to the first reported step after it.
    """
    if step < n_warmup_steps:
        return False
    nearest_check = (step - n_warmup_steps) // interval_steps * interval_steps + n_warmup_steps
    previous = max((s for s in reported_steps if s != step), default=-1)
    return previous < nearest_check


class NeVePruner(BasePruner):
    """Pruner that ends diverged, stalled and collapsed trials and lets converged ones finish (NeVe).

    NeVe (neural velocity) measures, inside each trial, how much the network still moves on a fixed
    auxiliary set, and decides with its own settings when and why the trial should stop. The objective
    reports each epoch with :func:`neve_tune.optuna.report_epoch`, which stores NeVe's metrics in the
    trial's user attribute ``"neve"`` (``trial.report`` takes one value only) and reports the objective's
    intermediate value as usual. At every check, this pruner reads the trial's own decision with
    :func:`neve_tune.decide` (it never recomputes it with other settings):

    * **diverged** (model velocity or velocity change not finite), **stalled** (it stopped moving, or
      sits at chance, without having learned) or **collapsed** (its aux responses froze): :meth:`prune`
      returns ``True``, the trial ends ``PRUNED`` and ``report_epoch`` records ``neve_stop_reason``
      (``"diverged"``, ``"stalled"`` or ``"collapsed"``); such a trial is never ``best_trial``;
    * **converged** (the trial's ``neve/converged`` flag): :meth:`prune` returns ``False``, even if
      the wrapped pruner would prune. Training is done, and that is a success: ``report_epoch`` returns
      ``StopReason.CONVERGED``, the objective returns its value, and the trial ends ``COMPLETE``
      (counted for ``best_trial``) with ``neve_stop_reason="converged"`` and ``neve_stop_epoch``;
    * otherwise the optional ``wrapped_pruner`` decides on the intermediate values, as it would alone
      (``report_epoch`` records ``neve_stop_reason="pruned"`` when it prunes). It is consulted at every
      check, also where NeVe decides, so that it keeps its own records (successive halving stores each
      trial's value at every rung it reaches).

    **Cross-trial pruning without validation data**: give it Optuna's own multi-fidelity pruner,
    :class:`~optuna.pruners.SuccessiveHalvingPruner` or :class:`~optuna.pruners.HyperbandPruner`, and
    report a validation-free signal as the intermediate value, in the study's direction: e.g. the
    epoch's training loss with ``direction="minimize"`` (``report_epoch(trial, neve, train_loss)``).
    The base ranks the trials on it, rung by rung, and a trial it cuts ends ``PRUNED`` with
    ``neve_stop_reason="pruned"``; a trial whose NeVe says converged first ends ``COMPLETE``. Both are
    used as they are: ``HyperbandPruner`` builds its bracket of the study itself. Two things differ from
    using them alone: give ``HyperbandPruner`` an explicit ``max_resource`` (the epoch cap; ``"auto"``
    would read it off the first COMPLETE trial, which NeVe may have ended early), and Optuna's samplers
    see the whole study rather than one Hyperband bracket (they filter by bracket only when the
    study's pruner *is* a ``HyperbandPruner``).

    For example, with the objective reporting each epoch's training loss
    (``report_epoch(trial, neve, train_loss)``) and returning the last one::

        pruner = NeVePruner(optuna.pruners.SuccessiveHalvingPruner(reduction_factor=3))
        study = optuna.create_study(direction="minimize", pruner=pruner)

    ``BasePruner.prune`` can only answer "prune or not", so stopping on convergence is
    :func:`~neve_tune.optuna.report_epoch`'s job; a hand-written ``if trial.should_prune(): raise``
    loop gets the divergence and base-pruner decisions but must check convergence itself.

    The pruner keeps no state: every decision is recomputed from the trial in storage, so it works the
    same in one process or in many sharing an RDB storage (e.g. an SQLite file).

    The pruner handles NaN values in the following manner:
        1. A NaN or infinite model velocity or velocity change means the trial **diverged**: it is
           pruned at the first check that sees it (checks follow ``n_warmup_steps`` and
           ``interval_steps``).
        2. NaN intermediate *values* (the objective's own reports) are left to the wrapped pruner's NaN
           policy; without a wrapped pruner they never prune.
        3. A step whose ``"neve"`` attribute has no model velocity (NeVe took a fresh baseline after a
           failed measurement) gives no NeVe decision.

    A check at which the trial's ``"neve"`` attribute is missing, or belongs to another step than the
    latest ``trial.report``, raises ``ValueError`` saying how to report it.

    Example:

        We tune a small network on digits; NeVe decays its LR and decides when it is done.

        .. testcode::

            import optuna
            import torch
            from torch import nn

            from neve_tune import NeVe, noise_aux
            from neve_tune.optuna import NeVePruner, report_epoch
            from neve_tune.studies.builtin.digits import DigitsCNN, load_digits_splits

            data = load_digits_splits()


            def objective(trial):
                lr = trial.suggest_float("lr", 1e-2, 1e-1, log=True)
                torch.manual_seed(trial.number)
                model = DigitsCNN(width=8)
                opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
                neve = NeVe(model, opt, noise_aux((1, 8, 8)), patience=3)
                for epoch in range(30):
                    model.train()
                    for i in range(0, len(data.y_train), 64):
                        loss = nn.functional.cross_entropy(
                            model(data.x_train[i : i + 64]), data.y_train[i : i + 64]
                        )
                        opt.zero_grad()
                        loss.backward()
                        opt.step()
                    neve.step()
                    model.eval()
                    with torch.no_grad():
                        acc = (model(data.x_train).argmax(1) == data.y_train).float().mean().item()
                    if report_epoch(trial, neve, acc):  # converged: stop, the trial is COMPLETE
                        break
                return acc


            study = optuna.create_study(direction="maximize", pruner=NeVePruner())
            study.optimize(objective, n_trials=3)
            print(study.best_trial.user_attrs["neve_stop_reason"])

    Args:
        wrapped_pruner:
            An Optuna pruner that may also prune on the objective's intermediate values: a
            multi-fidelity one (:class:`~optuna.pruners.SuccessiveHalvingPruner`,
            :class:`~optuna.pruners.HyperbandPruner`) ranking a validation-free signal, or any other
            (e.g. :class:`~optuna.pruners.MedianPruner`). :obj:`None` (default): only NeVe prunes. Named
            as in Optuna's own wrappers (:class:`~optuna.pruners.PatientPruner`).
        base_pruner:
            A documented alias of ``wrapped_pruner`` (keyword only); pass one or the other.
        stop_threshold:
            :obj:`None` (default): follow the trial; its ``NeVe(stop_threshold=...)`` decides. A value
            given here that differs from the trial's reported ``neve/stop_threshold`` has no effect and
            raises a ``UserWarning`` once per trial (per process) naming both values.
        n_warmup_steps:
            NeVe's failure decisions do not prune while the current step is less than ``n_warmup_steps``;
            the earliest a trial can be pruned is at ``step == n_warmup_steps``. (A convergence is the
            trial's own decision, after its ``NeVe(min_epochs=...)`` warm-up: ``report_epoch`` returns it
            at whichever step it comes.) ``report_epoch`` reports epoch
            ``e`` (1-based, ``neve/epoch``) as step ``e - 1``. The wrapped pruner keeps its own warmup.
        interval_steps:
            Interval in number of steps between NeVe's checks, offset by the warmup steps. If no value
            has been reported at the time of a check, that check is postponed until a value is
            reported. Value must be at least 1.
    """

    def __init__(
        self,
        wrapped_pruner: BasePruner | None = None,
        *,
        base_pruner: BasePruner | None = None,
        stop_threshold: float | None = None,
        n_warmup_steps: int = 0,
        interval_steps: int = 1,
    ) -> None:
        if wrapped_pruner is not None and base_pruner is not None:
            raise ValueError(
                "Pass the pruner to wrap once: as wrapped_pruner= (Optuna's spelling) or as its alias"
                " base_pruner=, not both."
            )
        wrapped = wrapped_pruner if base_pruner is None else base_pruner
        if wrapped is not None and not isinstance(wrapped, BasePruner):
            raise TypeError(
                f"wrapped_pruner must be an optuna.pruners.BasePruner or None, but got {type(wrapped).__name__}."
            )
        if isinstance(wrapped, NeVePruner):
            raise ValueError("wrapped_pruner must not be another NeVePruner; configure one NeVePruner instead.")
        if isinstance(n_warmup_steps, bool) or not isinstance(n_warmup_steps, int) or n_warmup_steps < 0:
            raise ValueError(f"Number of warmup steps cannot be negative, but got {n_warmup_steps=}.")
        if isinstance(interval_steps, bool) or not isinstance(interval_steps, int) or interval_steps < 1:
            raise ValueError(f"Pruning interval steps must be at least 1, but got {interval_steps=}.")
        if stop_threshold is not None and (
            isinstance(stop_threshold, bool)
            or not isinstance(stop_threshold, (int, float))
            or not (math.isfinite(stop_threshold) and stop_threshold > 0.0)
        ):
            raise ValueError(f"stop_threshold must be a finite number > 0, but got {stop_threshold=}.")
        if isinstance(wrapped, HyperbandPruner) and getattr(wrapped, "_max_resource", None) == "auto":
            warnings.warn(
                "NeVePruner(HyperbandPruner(max_resource='auto')): Hyperband reads its max_resource"
                " off the first COMPLETE trial, which NeVe may have stopped early (converged); pass"
                " max_resource= the epoch cap instead.",
                UserWarning,
                stacklevel=2,
            )
        self._stop_threshold = None if stop_threshold is None else float(stop_threshold)
        self._warned: set[int] = set()  # trial numbers already warned about (a warning, not a decision)
        self._wrapped = wrapped
        self._n_warmup_steps = n_warmup_steps
        self._interval_steps = interval_steps

    @property
    def stop_threshold(self) -> float | None:
        """The threshold given here (``None``: follow each trial's own NeVe)."""
        return self._stop_threshold

    @property
    def wrapped_pruner(self) -> BasePruner | None:
        """The wrapped pruner (``None``: only NeVe prunes)."""
        return self._wrapped

    @property
    def base_pruner(self) -> BasePruner | None:
        """Alias of :attr:`wrapped_pruner`."""
        return self._wrapped

    def prune(self, study: optuna.study.Study, trial: optuna.trial.FrozenTrial) -> bool:
        reason = self.neve_decision(trial)
        # The wrapped pruner sees every check, also those NeVe decides: successive halving records the
        # trial's value at each rung it reaches inside prune(), and the other trials are ranked on it.
        pruned = False if self._wrapped is None else bool(self._wrapped.prune(study, trial))
        if reason is not None:
            return reason.is_failure  # NeVe's decision comes first: converged is never pruned
        return pruned  # some pruners return numpy bools

    def neve_decision(self, trial: optuna.trial.FrozenTrial) -> StopReason | None:
        """The trial's NeVe decision at its latest reported step (``CONVERGED``, ``STALLED``, ``COLLAPSED``,
        ``DIVERGED``) or ``None``.

        ``None`` also before any report, during warmup and between interval checks. The wrapped pruner is
        not consulted.
        """
        step = trial.last_step
        if step is None or not self.is_check_step(step, trial.intermediate_values.keys()):
            return None
        entry = trial.user_attrs.get(NEVE_ATTR)
        number = trial.number
        if entry is None:
            raise ValueError(
                f"NeVePruner: trial {number} reported step {step} without NeVe metrics (no user attr"
                f" {NEVE_ATTR!r}). {_HOW_TO_REPORT}"
            )
        if not isinstance(entry, Mapping) or STEP_KEY not in entry or keys.EPOCH not in entry:
            got = sorted(entry) if isinstance(entry, Mapping) else type(entry).__name__
            raise ValueError(
                f"NeVePruner: user attr {NEVE_ATTR!r} of trial {number} must be a dict with keys"
                f" {STEP_KEY!r} and {keys.EPOCH!r} plus NeVe.metrics(), but got {got}. {_HOW_TO_REPORT}"
            )
        if entry[STEP_KEY] != step:
            raise ValueError(
                f"NeVePruner: trial {number}'s NeVe metrics (user attr {NEVE_ATTR!r}) are for step"
                f" {entry[STEP_KEY]}, but its latest report is step {step}; store them at every step you"
                f" report. {_HOW_TO_REPORT}"
            )
        return self.decide(number, entry)

    def decide(self, number: int, metrics: Mapping[str, object]) -> StopReason | None:
        """:func:`neve_tune.decide` on trial ``number``'s metrics, warning once if its threshold differs."""
        if self._stop_threshold is not None and number not in self._warned:
            message = settings_disagreement(metrics, self._stop_threshold, f"NeVePruner (trial {number})")
            if message is not None:
                self._warned.add(number)
                warnings.warn(message, UserWarning, stacklevel=3)
        return decide(metrics)

    def is_check_step(self, step: int, reported_steps: Iterable[int]) -> bool:
        """Whether NeVe decides at ``step``, given every step reported so far (``step`` may be among them).

        Checks happen at ``n_warmup_steps``, ``n_warmup_steps + interval_steps``, ...; a check that falls
        on a step that was not reported is postponed to the first reported step after it, as in Optuna's
        own pruners. :meth:`prune` reads the trial's decision exactly on these steps.
        """
        return _is_check_step(step, reported_steps, self._n_warmup_steps, self._interval_steps)

    def __repr__(self) -> str:
        return (
            f"NeVePruner(wrapped_pruner={self._wrapped!r}, stop_threshold={self.stop_threshold},"
            f" n_warmup_steps={self._n_warmup_steps}, interval_steps={self._interval_steps})"
        )
