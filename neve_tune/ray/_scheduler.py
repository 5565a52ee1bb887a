"""``NeVeScheduler``: a Ray Tune scheduler that stops trials on the decision each trial's NeVe reports."""

from __future__ import annotations

import math
import pickle
import warnings
from collections.abc import Mapping
from numbers import Real
from typing import TYPE_CHECKING, Any

from ray import cloudpickle
from ray.tune.experiment import Trial
from ray.tune.result import DEFAULT_METRIC, TRAINING_ITERATION
from ray.tune.schedulers.trial_scheduler import FIFOScheduler, TrialScheduler

from neve_tune import StopReason, decide, keys, settings_disagreement
from neve_tune.ray._composite import (
    BOOKKEEPING_KEYS,
    STOP_EPOCH,
    STOP_REASON,
    BaseLink,
    StopInfo,
    describe,
    epoch_of,
    has_user_keys,
    is_finished,
)

if TYPE_CHECKING:
    from ray.tune.execution.tune_controller import TuneController

_HOW_TO_REPORT = (
    "Measure velocity inside the trainable with `neve = neve_tune.NeVe(model, optimizer, aux)` and report it "
    "after every epoch with `tune.report({**neve.metrics(), **your_metrics})` (or "
    "`neve_tune.ray.report_epoch(neve, your_metrics, model=model, optimizer=optimizer)`)."
)


class NeVeScheduler(FIFOScheduler):
    """Stop Ray Tune trials once their NeVe says converged, stalled, collapsed or diverged; no validation.

    Every trial measures its own velocity with ``neve_tune.NeVe`` (which also decays its LR and decides,
    with its own settings, when and why to stop) and reports ``neve.metrics()`` with its other metrics.
    The scheduler acts on that decision, read with :func:`neve_tune.decide` from the trial's flags; it
    never recomputes it with other settings. It returns ``STOP`` when the trial:

    * **diverged**: ``V`` or ``D`` is NaN or infinite, or the trial flagged ``neve/diverged``. It stops at
      once, at the first such result, even inside the grace period;
    * **converged**, **stalled** or **collapsed** (the trial's ``neve/converged``, ``neve/stalled`` or
      ``neve/collapsed`` flag), once ``result[time_attr] >= grace_period``;
    * reached ``max_t``: ``result[time_attr] >= max_t`` (reason ``"max_t"``).

    Otherwise it returns ``CONTINUE`` (trials run in FIFO order), or asks the ``base_scheduler``. Stalled
    and collapsed trials are failures (they never learned): pick your final configuration among the
    converged ones.

    **Cross-trial pruning without validation data**: ``base_scheduler`` is one of Tune's own
    multi-fidelity schedulers (``ASHAScheduler``, ``HyperBandScheduler``, any ``TrialScheduler``), ranking
    trials on its own ``metric``/``mode``: give it a validation-free signal, e.g. the training loss. Every
    hook goes to it unchanged (results, adds, completions, removals, errors, ``choose_trial_to_run``).
    NeVe's own decision above comes first; otherwise the base decides: its ``STOP`` stops the trial with
    reason ``"pruned"`` (``"max_t"`` once the trial reached the base's own ``max_t``), ``PAUSE``
    (HyperBand) pauses it. A trial the base stops through the controller (HyperBand stops paused losers)
    is recorded the same way. Metric rule: a base with its own ``metric`` keeps it whatever
    ``metric``/``mode`` this scheduler or ``tune.TuneConfig`` get; a base without one adopts this
    scheduler's, else ``TuneConfig``'s. Give the base the same ``max_t`` and ``time_attr`` (a different
    ``time_attr`` is refused). On ``Tuner.restore`` a base with ``save``/``restore`` (ASHA) gets its state
    back (its rungs), kept in the experiment directory as it changes; one without them (HyperBand) starts
    afresh, as it does alone.

    ``stop_threshold``: leave it ``None``. The trial's ``NeVe(stop_threshold=...)`` decides. A value given
    here that differs from the trial's reported ``neve/stop_threshold`` has no effect and raises a
    ``UserWarning`` once per trial naming both values. It is used only for results of an older producer
    that reports no decision flags (no ``neve/converged`` key): those are converged when ``V`` is under
    it (under 1e-3 when it is ``None``).

    NaN policy: a NaN or infinite velocity (or velocity change) is divergence, never convergence and never
    a value to skip.

    ``metric``/``mode`` follow the contract of ``ASHAScheduler``: pass them here or to
    ``tune.TuneConfig``, not to both (``set_search_properties`` returns ``False`` on a conflict and Tune
    raises). NeVe does not need them: its stop decision reads the velocity keys, never the objective, so a
    scheduler without ``metric``/``mode`` is valid. When a metric is set, Tune's strict metric checking
    requires it in every result, as for any scheduler.

    A result without the velocity key raises a ``ValueError`` that names the key and shows how to report
    it, unless ``allow_missing=True`` (sparse reporting, e.g. velocity measured every k epochs): such a
    result then continues (``max_t`` still applies). A result with a velocity but without ``time_attr``
    raises the same way.

    Records: the reason and epoch of every trial it stopped are available as :meth:`stop_info` and
    :attr:`stopped_trials` while the scheduler lives, and are written into the trial's last result as
    ``neve/stop_reason`` (a :class:`~neve_tune.StopReason` value) and ``neve/stop_epoch``, so
    ``ResultGrid[i].metrics`` carries them after ``fit()``, in the saved experiment state and after
    ``Tuner.restore``. :meth:`StopInfo.from_metrics` reads them back.

    State and restore: NeVe's decisions depend on each result alone (plus this object's settings), never
    on history kept in memory (a base's ranking does: see above). Ray 2.60's ``Tuner.restore`` gives the
    scheduler back as it was pickled at construction and does not call :meth:`save`/:meth:`restore`; a
    restored experiment therefore makes exactly the decisions the interrupted one would have made.
    Restored trials that had already been stopped are re-recorded from their last results in
    ``on_trial_add``. Resume the trials themselves with identical NeVe state through
    ``neve_tune.ray.report_epoch`` / ``restore_from_checkpoint``. ``save`` and ``restore`` still pickle
    the records (and the base), for callers that use them.

    Per-trial state is keyed by ``trial.trial_id``: the set of live trials (added in ``on_trial_add``,
    dropped in ``on_trial_complete``/``on_trial_remove``/``on_trial_error``) and the stop records. A
    decision reads only the result, so it costs the same whatever the number of trials (about a
    microsecond; ``benchmarks/scheduler_decision.py``).

    Args:
        metric: the user's objective, only passed through to Tune (see above).
        mode: ``"min"`` or ``"max"``, only passed through to Tune.
        time_attr: the result key that measures progress, for ``grace_period`` and ``max_t``.
        max_t: stop every trial once ``result[time_attr] >= max_t``; ``None`` for no cap.
        grace_period: never stop a trial as converged, stalled or collapsed before
            ``result[time_attr] >= grace_period`` (the trial's own ``min_epochs`` warm-up also applies).
        stop_threshold: ``None`` (default): follow the trial. Otherwise the value you expect the trials
            to use: a trial reporting another one gets a warning (see above).
        velocity_key: the result key of the model velocity.
        change_key: the result key of the velocity change (absent at the first epoch).
        allow_missing: continue on results without ``velocity_key`` (or the base's metric) instead of
            raising.
        base_scheduler: a Tune scheduler that ranks trials across each other (see above); ``None``: none.

    Example:
        >>> from ray import tune
        >>> from neve_tune.ray import NeVeScheduler
        >>> scheduler = NeVeScheduler(max_t=50, grace_period=3)
        >>> tuner = tune.Tuner(  # doctest: +SKIP
        ...     train_fn, tune_config=tune.TuneConfig(scheduler=scheduler, metric="loss", mode="min")
        ... )
        >>> scheduler.check_result({"training_iteration": 4, "neve/model_velocity": 1e-4, "neve/stalled": 1.0,
        ...                         "neve/converged": 0.0})
        StopInfo(reason=<StopReason.STALLED: 'stalled'>, epoch=4, time=4.0, model_velocity=0.0001)

        With ASHA ranking the trials on their training loss (``"train_loss"`` reported with
        ``neve.metrics()``), while the objective stays the user's:

        >>> from ray.tune.schedulers import ASHAScheduler
        >>> scheduler = NeVeScheduler(
        ...     metric="train_acc", mode="max", max_t=50, grace_period=3,
        ...     base_scheduler=ASHAScheduler(metric="train_loss", mode="min", max_t=50, grace_period=3),
        ... )
        >>> scheduler.base_scheduler.metric
        'train_loss'
    """

    def __init__(
        self,
        *,
        metric: str | None = None,
        mode: str | None = None,
        time_attr: str = TRAINING_ITERATION,
        max_t: float | None = None,
        grace_period: float = 1,
        stop_threshold: float | None = None,
        velocity_key: str = keys.MODEL_VELOCITY,
        change_key: str = keys.VELOCITY_CHANGE,
        allow_missing: bool = False,
        base_scheduler: TrialScheduler | None = None,
    ) -> None:
        _check_mode(mode)
        if not isinstance(grace_period, Real) or not math.isfinite(grace_period) or grace_period < 0:
            raise ValueError(f"grace_period must be a finite number >= 0, but got {grace_period=}.")
        if max_t is not None and (not isinstance(max_t, Real) or not max_t > 0):
            raise ValueError(f"max_t must be None or a number > 0, but got {max_t=}.")
        if max_t is not None and grace_period > max_t:
            raise ValueError(f"grace_period must be <= max_t, but got {grace_period=} and {max_t=}.")
        named = (("time_attr", time_attr), ("velocity_key", velocity_key), ("change_key", change_key))
        for name, value in named:
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty string, but got {name}={value!r}.")
        if stop_threshold is not None:
            decide({}, stop_threshold=stop_threshold)  # validates stop_threshold, with decide's message
        if isinstance(base_scheduler, NeVeScheduler):
            raise ValueError(
                "base_scheduler must not be another NeVeScheduler: configure one NeVeScheduler with the base"
                " you want (e.g. ASHAScheduler) instead."
            )
        link = None
        if base_scheduler is not None:
            link = BaseLink(base_scheduler, owner="NeVeScheduler", time_attr=time_attr, metric=metric, mode=mode)
        super().__init__()
        self._metric: str | None = metric
        self._mode: str | None = mode
        self._time_attr: str = time_attr
        self._max_t: float | None = max_t
        self._grace_period: float = grace_period
        self._stop_threshold: float | None = None if stop_threshold is None else float(stop_threshold)
        self._velocity_key: str = velocity_key
        self._change_key: str = change_key
        self._allow_missing: bool = bool(allow_missing)
        self._live: set[str] = set()
        self._stopped: dict[str, StopInfo] = {}
        self._warned: set[str] = set()
        self._base_link: BaseLink | None = link

    # ------------------------------------------------------------------ settings
    @property
    def mode(self) -> str | None:
        return self._mode

    @property
    def stop_threshold(self) -> float | None:
        """The threshold given here (``None``: follow each trial's own NeVe)."""
        return self._stop_threshold

    @property
    def time_attr(self) -> str:
        return self._time_attr

    @property
    def max_t(self) -> float | None:
        return self._max_t

    @property
    def grace_period(self) -> float:
        return self._grace_period

    @property
    def base_scheduler(self) -> TrialScheduler | None:
        """The scheduler that ranks trials across each other, or ``None``."""
        return None if self._base_link is None else self._base_link.base

    @property
    def supports_buffered_results(self) -> bool:
        return self._base_link is None or bool(self._base_link.base.supports_buffered_results)

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        """Take ``metric``/``mode`` from ``tune.TuneConfig``; ``False`` if this scheduler already has one.

        A ``base_scheduler`` without a metric adopts them too; one with its own metric keeps it.
        """
        if self._metric and metric:
            return False
        if self._mode and mode:
            return False
        _check_mode(mode)
        if self._base_link is not None and not self._base_link.set_search_properties(metric, mode):
            return False
        if metric:
            self._metric = metric
        if mode:
            self._mode = mode
        if self._metric is None and self._mode:
            # As ASHAScheduler: a mode alone means Tune's anonymous metric.
            self._metric = DEFAULT_METRIC
        return True

    # ------------------------------------------------------------------ the decision
    def check_result(self, result: Mapping[str, Any]) -> StopInfo | None:
        """The stop decision for one flat result alone: a :class:`StopInfo`, or ``None`` to continue.

        This is what :meth:`on_trial_result` uses. It keeps no state, so it can be replayed on any result
        (e.g. a row of ``Result.metrics_dataframe``).

        Raises:
            ValueError: the result has no ``velocity_key`` (and ``allow_missing`` is off), or has a
                velocity but no ``time_attr``.
            TypeError: the velocity or velocity change is not a number.
        """
        velocity = result.get(self._velocity_key)
        if velocity is None:
            if not self._allow_missing and has_user_keys(result):
                raise ValueError(self._missing_key_message(self._velocity_key, result))
            time = result.get(self._time_attr)
            if self._max_t is not None and time is not None and time >= self._max_t:
                return StopInfo(StopReason.MAX_T, epoch_of(result), float(time), None)
            return None
        try:
            reason = decide(
                result,
                stop_threshold=_LEGACY_THRESHOLD if self._stop_threshold is None else self._stop_threshold,
                velocity_key=self._velocity_key,
                change_key=self._change_key,
            )
        except TypeError as err:
            raise TypeError(f"{type(self).__name__}: {err}") from None
        if reason is StopReason.DIVERGED:
            when = float(result.get(self._time_attr, math.nan))
            return StopInfo(reason, epoch_of(result), when, float(velocity))
        time = result.get(self._time_attr)
        if time is None:
            raise ValueError(self._missing_key_message(self._time_attr, result))
        time = float(time)
        if reason is not None and time >= self._grace_period:
            return StopInfo(reason, epoch_of(result), time, float(velocity))
        if self._max_t is not None and time >= self._max_t:
            return StopInfo(StopReason.MAX_T, epoch_of(result), time, float(velocity))
        return None

    def _missing_key_message(self, key: str, result: Mapping[str, Any]) -> str:
        reported = sorted(k for k in result if k not in BOOKKEEPING_KEYS)
        if key == self._time_attr:
            fix = (
                f"Report {key!r} in every result, or pass `time_attr=` one of the keys the trainable "
                f"reports (`training_iteration` is always there)."
            )
        else:
            fix = _HOW_TO_REPORT + (
                " If the trainable reports velocity only on some results, pass "
                f"`{type(self).__name__}(allow_missing=True)`."
            )
        return (
            f"{type(self).__name__} needs {key!r} in every result, but this result has no such key. "
            f"{fix} Reported keys: {reported}"
        )

    # ------------------------------------------------------------------ records
    def stop_info(self, trial_id: str) -> StopInfo | None:
        """Why and when this scheduler stopped the trial, or ``None`` if it did not (yet)."""
        return self._stopped.get(trial_id)

    @property
    def stopped_trials(self) -> dict[str, StopInfo]:
        """``trial_id -> StopInfo`` for every trial this scheduler stopped (a copy)."""
        return dict(self._stopped)

    @property
    def num_live_trials(self) -> int:
        return len(self._live)

    # ------------------------------------------------------------------ TrialScheduler hooks
    def on_trial_add(self, tune_controller: TuneController | None, trial: Trial) -> None:
        if is_finished(trial):
            # Tuner.restore re-adds finished trials: re-record the ones this scheduler had stopped. The
            # base never hears of them (they will not run; HyperBand would wait for them in a bracket).
            info = StopInfo.from_metrics(trial.last_result)
            if info is not None:
                self._stopped[trial.trial_id] = info
            return
        self._live.add(trial.trial_id)
        if self._base_link is not None:
            self._base_link.on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller: TuneController | None, trial: Trial, result: dict) -> str:
        # Reads the result and this object's settings only: O(1), and no per-trial memory is touched
        # unless the trial stops (or, once, to warn about a stop_threshold that disagrees).
        if self._stop_threshold is not None and trial.trial_id not in self._warned:
            message = settings_disagreement(result, self._stop_threshold, f"NeVeScheduler (trial {trial.trial_id})")
            if message is not None:
                self._warned.add(trial.trial_id)
                warnings.warn(message, UserWarning, stacklevel=2)
        info = self.check_result(result)
        if info is None and self._base_link is not None:
            # NeVe's own decision came first; now the cross-trial ranking (it sees every other result).
            self._base_link.check_result(result, self._allow_missing, has_user_keys(result))
            decision = self._base_link.on_trial_result(tune_controller, trial, result)
            if decision != TrialScheduler.STOP:
                return decision  # CONTINUE, or PAUSE (HyperBand)
            info = self._base_stop(result)
        if info is None:
            return TrialScheduler.CONTINUE
        self._stopped[trial.trial_id] = info
        return TrialScheduler.STOP

    def _base_stop(self, result: Mapping[str, Any]) -> StopInfo:
        """The record of a trial the base stopped: ``MAX_T`` at the base's own cap, else ``PRUNED``."""
        assert self._base_link is not None
        time = float(result.get(self._time_attr, math.nan))
        cap = self._base_link.cap
        reason = StopReason.MAX_T if cap is not None and time >= cap else StopReason.PRUNED
        velocity = result.get(self._velocity_key)
        return StopInfo(reason, epoch_of(result), time, None if velocity is None else float(velocity))

    def _write_record(self, trial: Trial) -> None:
        info = self._stopped.get(trial.trial_id)
        if info is not None:
            # Tune keeps trial.last_result in ResultGrid and in the experiment state: write the record there.
            last = dict(trial.last_result)
            last[STOP_REASON] = info.reason.value
            last[STOP_EPOCH] = info.epoch
            trial.update_last_result(last)

    def on_trial_complete(self, tune_controller: TuneController | None, trial: Trial, result: dict) -> None:
        self._live.discard(trial.trial_id)
        self._write_record(trial)
        if self._base_link is not None:
            self._base_link.on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller: TuneController | None, trial: Trial) -> None:
        link = self._base_link
        if link is not None and link.forwarding and trial.trial_id not in self._stopped and trial.last_result:
            # The base stopped this (paused or pending) trial itself, through the controller.
            self._stopped[trial.trial_id] = self._base_stop(trial.last_result)
            self._write_record(trial)
        self._live.discard(trial.trial_id)
        self._warned.discard(trial.trial_id)
        if link is not None:
            link.on_trial_remove(tune_controller, trial)

    def on_trial_error(self, tune_controller: TuneController | None, trial: Trial) -> None:
        # A retried trial is re-added (on_trial_add) before it runs again.
        self._live.discard(trial.trial_id)
        if self._base_link is not None:
            self._base_link.on_trial_error(tune_controller, trial)

    def choose_trial_to_run(self, tune_controller: TuneController) -> Trial | None:
        if self._base_link is not None:
            return self._base_link.choose_trial_to_run(tune_controller)
        return super().choose_trial_to_run(tune_controller)

    def debug_string(self) -> str:
        counts: dict[str, int] = {}
        for info in self._stopped.values():
            counts[info.reason.value] = counts.get(info.reason.value, 0) + 1
        stopped = ", ".join(f"{reason}={n}" for reason, n in sorted(counts.items())) or "none"
        return (
            f"Using NeVe scheduling (stop_threshold={self.stop_threshold}, "
            f"grace_period={self._grace_period}, max_t={self._max_t}): stopped {stopped}."
        ) + ("" if self._base_link is None else "\n" + self._base_link.base.debug_string())

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            cloudpickle.dump(self.__dict__, f)  # a base may hold lambdas (HyperBand does)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__setstate__(pickle.load(f))

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Schedulers pickled by earlier versions held a NeVeRule (`_rule`) for their stop_threshold.
        state = dict(state)
        if "_rule" in state and "_stop_threshold" not in state:
            state["_stop_threshold"] = float(state.pop("_rule").stop_threshold)
        state.setdefault("_warned", set())
        state.setdefault("_base_link", None)
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return (
            f"NeVeScheduler(metric={self._metric!r}, mode={self._mode!r}, time_attr={self._time_attr!r}, "
            f"max_t={self._max_t}, grace_period={self._grace_period}, stop_threshold={self.stop_threshold}, "
            f"velocity_key={self._velocity_key!r}, change_key={self._change_key!r}, "
            f"allow_missing={self._allow_missing}, base_scheduler={describe(self.base_scheduler)})"
        )


# What flagless results (an older producer) are classified with when no stop_threshold is given here.
_LEGACY_THRESHOLD = 1e-3


def _check_mode(mode: str | None) -> None:
    if mode not in (None, "min", "max"):
        raise ValueError(f"mode must be 'min', 'max' or None, but got {mode=}.")
