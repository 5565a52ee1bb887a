"""``NeVeScheduler``: a Ray Tune scheduler that stops trials on the decision each trial's NeVe reports."""

from __future__ import annotations

import math
import pickle
import warnings
from collections.abc import Mapping
from numbers import Real
from operator import itemgetter
from typing import TYPE_CHECKING, Any

from ray import cloudpickle
from ray.tune.experiment import Trial
from ray.tune.result import DEFAULT_METRIC, TRAINING_ITERATION
from ray.tune.schedulers.trial_scheduler import FIFOScheduler, TrialScheduler

from neve_tune import StopReason, decide, keys, settings_disagreement
from neve_tune.ray._composite import BaseLink, Records, StopInfo, describe, epoch_of, has_user_keys, missing_key_message

if TYPE_CHECKING:
    from ray.tune.execution.tune_controller import TuneController

# The decision flags of `NeVe.metrics()`, read in one call (a KeyError when one is missing), and their
# values when the trial's NeVe decided nothing.
_FLAGS = tuple(keys.DECISION_FLAGS.values())
_read_flags = itemgetter(*_FLAGS)
_NO_FLAG_SET = (0.0,) * len(_FLAGS)
_CONTINUE, _STOP = TrialScheduler.CONTINUE, TrialScheduler.STOP


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
    afresh, as it does alone. That state is written when it must survive a restore (a trial's error, the
    end of the last live trial, :meth:`save`), else at most once every few seconds, never per result: a
    composed decision costs about what the base's alone costs (``benchmarks/scheduler_decision.py``).

    ``stop_threshold``: leave it ``None``. The trial's ``NeVe(stop_threshold=...)`` decides. A value given
    here is only checked: one that differs from the trial's reported ``neve/stop_threshold`` has no effect
    and raises a ``UserWarning`` once per trial naming both values.

    NaN policy: a NaN or infinite velocity (or velocity change) is divergence, never convergence and never
    a value to skip.

    ``metric``/``mode`` follow ``ASHAScheduler``'s contract: pass them here or to ``tune.TuneConfig``, not
    to both (``set_search_properties`` returns ``False`` on a conflict). NeVe does not need them (it never
    reads the objective); when one is set, Tune's strict metric check requires it in every result.

    A result without the velocity key (and without NeVe's flags) raises a ``ValueError`` that names the
    key and shows how to report it, unless ``allow_missing=True`` (sparse reporting, e.g. velocity
    measured every k epochs): such a result then continues (``max_t`` still applies). A result with a
    velocity but without NeVe's decision flags, or without ``time_attr``, raises the same way. A result
    from ``neve.metrics()`` without a velocity (a step on which NeVe re-took its baseline) continues.

    Records: the reason and epoch of every trial it stopped are available as :meth:`stop_info` and
    :attr:`stopped_trials` while the scheduler lives, and are written into the trial's last result as
    ``neve/stop_reason`` (a :class:`~neve_tune.StopReason` value) and ``neve/stop_epoch``, which
    ``ResultGrid[i].metrics`` carries after ``fit()`` and ``Tuner.restore``; :meth:`StopInfo.from_metrics`
    reads them back.

    State and restore: per-trial state is keyed by ``trial.trial_id`` (the live trials and the stop
    records). NeVe's decisions depend on each result alone (plus this object's settings), never on history
    kept in memory (a base's ranking does: see above), so they cost the same whatever the number of trials
    (under a microsecond; ``benchmarks/scheduler_decision.py``). Ray 2.60's ``Tuner.restore`` gives the
    scheduler back as it was pickled at construction and does not call :meth:`save`/:meth:`restore`; a
    restored experiment makes exactly the decisions the interrupted one would have made, and re-records
    the trials it had stopped from their last results in ``on_trial_add``. Resume the trials themselves
    with identical NeVe state through ``report_epoch`` / ``restore_from_checkpoint``.

    Args:
        metric: the user's objective, only passed through to Tune (see above).
        mode: ``"min"`` or ``"max"``, only passed through to Tune.
        time_attr: the result key that measures progress, for ``grace_period`` and ``max_t``.
        max_t: stop every trial once ``result[time_attr] >= max_t``; ``None`` for no cap.
        grace_period: never stop a trial as converged, stalled or collapsed before
            ``result[time_attr] >= grace_period`` (the trial's own ``min_epochs`` warm-up also applies).
        stop_threshold: ``None`` (default): follow the trial. Otherwise the value you expect the trials
            to use: a trial reporting another one gets a warning (see above); it never changes a decision.
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
        >>> flags = {"neve/converged": 0.0, "neve/stalled": 1.0, "neve/collapsed": 0.0, "neve/diverged": 0.0}
        >>> scheduler.check_result({"training_iteration": 4, "neve/model_velocity": 1e-4, **flags})
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
        if stop_threshold is not None and not (
            isinstance(stop_threshold, Real) and not isinstance(stop_threshold, bool) and 0 < stop_threshold < math.inf
        ):
            raise ValueError(f"stop_threshold must be None or a finite number > 0, but got {stop_threshold=}.")
        if isinstance(base_scheduler, NeVeScheduler):
            raise ValueError(
                "base_scheduler must not be another NeVeScheduler: configure one NeVeScheduler with the base"
                " you want (e.g. ASHAScheduler) instead."
            )
        link = None
        if base_scheduler is not None:
            link = BaseLink(base_scheduler, time_attr=time_attr, metric=metric, mode=mode, allow_missing=allow_missing)
        super().__init__()
        self._metric: str | None = metric
        self._mode: str | None = mode
        self._time_attr: str = time_attr
        self._max_t: float = math.inf if max_t is None else float(max_t)
        self._grace_period: float = grace_period
        self._stop_threshold: float | None = None if stop_threshold is None else float(stop_threshold)
        self._velocity_key: str = velocity_key
        self._change_key: str = change_key
        self._allow_missing: bool = bool(allow_missing)
        self._records: Records = Records()
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
        return None if self._max_t == math.inf else self._max_t

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

        :meth:`on_trial_result` gives the same answer (it first reads a quiet result, with no flag set,
        in a few dict reads). It keeps no state, so it can be replayed on any result (e.g. a row of
        ``Result.metrics_dataframe``).

        Raises:
            ValueError: the result has no ``velocity_key`` and no decision flags (and ``allow_missing`` is
                off), has a velocity but no decision flags, or has a velocity but no ``time_attr``.
            TypeError: the velocity, velocity change or a flag is not a number.
        """
        velocity, time = result.get(self._velocity_key), result.get(self._time_attr)
        flagged = any(flag in result for flag in _FLAGS)
        if velocity is None:
            if not flagged and not self._allow_missing and has_user_keys(result):
                raise ValueError(self._missing(self._velocity_key, result))
            if time is not None and time >= self._max_t:
                return StopInfo(StopReason.MAX_T, epoch_of(result), float(time), None)
            return None  # neve.metrics() without a velocity (a re-baseline), or a sparse result
        if not flagged:  # decisions come only from the trial's own NeVe
            raise ValueError(self._missing(keys.CONVERGED, result))
        try:
            reason = decide(result, velocity_key=self._velocity_key, change_key=self._change_key)
        except TypeError as err:
            raise TypeError(f"{type(self).__name__}: {err}") from None
        if reason is StopReason.DIVERGED:
            return StopInfo(reason, epoch_of(result), float(result.get(self._time_attr, math.nan)), float(velocity))
        if time is None:
            raise ValueError(self._missing(self._time_attr, result))
        time = float(time)
        if reason is not None and time >= self._grace_period:
            return StopInfo(reason, epoch_of(result), time, float(velocity))
        if time >= self._max_t:
            return StopInfo(StopReason.MAX_T, epoch_of(result), time, float(velocity))
        return None

    def _missing(self, key: str, result: Mapping[str, Any]) -> str:
        return missing_key_message(type(self).__name__, key, self._time_attr, result)

    # ------------------------------------------------------------------ records
    def stop_info(self, trial_id: str) -> StopInfo | None:
        """Why and when this scheduler stopped the trial, or ``None`` if it did not (yet)."""
        return self._records.stopped.get(trial_id)

    @property
    def stopped_trials(self) -> dict[str, StopInfo]:
        """``trial_id -> StopInfo`` for every trial this scheduler stopped (a copy)."""
        return dict(self._records.stopped)

    @property
    def num_live_trials(self) -> int:
        return len(self._records.live)

    # ------------------------------------------------------------------ TrialScheduler hooks
    def on_trial_add(self, tune_controller: TuneController | None, trial: Trial) -> None:
        # Tuner.restore re-adds finished trials: the records re-record the ones this scheduler had stopped.
        # The base never hears of them (they will not run; HyperBand would wait for them in a bracket).
        if self._records.add(trial) and self._base_link is not None:
            self._base_link.on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller: TuneController | None, trial: Trial, result: dict) -> str:
        # Reads the result and this object's settings only: O(1), and no per-trial memory is touched
        # unless the trial stops (or, once, to warn about a stop_threshold that disagrees).
        if self._stop_threshold is not None and trial.trial_id not in self._records.warned:
            self._warn_once(trial, result)
        # The common case in a few dict reads, without decide(): the trial's NeVe set no flag and measured a
        # finite V and D (`v - v + d - d` is NaN when either is NaN or infinite, else 0), and time_attr is
        # under max_t. A missing key (D at the first epoch) or a non-number raises here: check_result then.
        try:
            velocity, change = result[self._velocity_key], result[self._change_key]
            quiet = (
                _read_flags(result) == _NO_FLAG_SET
                and velocity - velocity + change - change == 0.0
                and result[self._time_attr] < self._max_t
            )
        except (KeyError, TypeError):
            quiet = False
        info = None if quiet else self.check_result(result)
        link = self._base_link
        if info is None and link is not None:
            # NeVe's own decision came first; now the cross-trial ranking (it sees every other result),
            # called directly where the base's result hook cannot stop other trials (ASHA's): the hot path.
            if link.metric_key not in result:
                link.check_metric(result)
            if link.result_only:
                decision = link.base.on_trial_result(tune_controller, trial, result)
            else:
                decision = link.on_trial_result(tune_controller, trial, result)
            if decision != _STOP:
                return decision  # CONTINUE, or PAUSE (HyperBand)
            info = link.stop_info(result, self._time_attr, self._velocity_key)
        if info is None:
            return _CONTINUE
        self._records.stopped[trial.trial_id] = info
        return _STOP

    def _warn_once(self, trial: Trial, result: Mapping[str, Any]) -> None:
        message = settings_disagreement(result, self._stop_threshold, f"NeVeScheduler (trial {trial.trial_id})")
        if message is not None:
            self._records.warned.add(trial.trial_id)
            warnings.warn(message, UserWarning, stacklevel=3)

    def on_trial_complete(self, tune_controller: TuneController | None, trial: Trial, result: dict) -> None:
        self._records.end(trial)
        if self._base_link is not None:
            self._base_link.on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller: TuneController | None, trial: Trial) -> None:
        link = self._base_link
        if link is not None and link.forwarding and trial.trial_id not in self._records.stopped and trial.last_result:
            # The base stopped this (paused or pending) trial itself, through the controller.
            info = link.stop_info(trial.last_result, self._time_attr, self._velocity_key)
            self._records.stopped[trial.trial_id] = info
        self._records.end(trial)
        if link is not None:
            link.on_trial_remove(tune_controller, trial)

    def on_trial_error(self, tune_controller: TuneController | None, trial: Trial) -> None:
        # A retried trial is re-added (on_trial_add) before it runs again.
        self._records.live.discard(trial.trial_id)
        if self._base_link is not None:
            self._base_link.on_trial_error(tune_controller, trial)

    def choose_trial_to_run(self, tune_controller: TuneController) -> Trial | None:
        if self._base_link is not None:
            return self._base_link.choose_trial_to_run(tune_controller)
        return super().choose_trial_to_run(tune_controller)

    def debug_string(self) -> str:
        return (
            f"Using NeVe scheduling (stop_threshold={self.stop_threshold}, grace_period={self._grace_period},"
            f" max_t={self.max_t}): stopped {self._records.summary()}."
        ) + ("" if self._base_link is None else "\n" + self._base_link.base.debug_string())

    def save(self, checkpoint_path: str) -> None:
        """Pickle this scheduler (records and base) to ``checkpoint_path``; persist the base's state too."""
        if self._base_link is not None:
            self._base_link.persist()
        with open(checkpoint_path, "wb") as f:
            cloudpickle.dump(self.__dict__, f)  # a base may hold lambdas (HyperBand does)

    def restore(self, checkpoint_path: str) -> None:
        """Load what :meth:`save` wrote."""
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))

    def __repr__(self) -> str:
        return (
            f"NeVeScheduler(metric={self._metric!r}, mode={self._mode!r}, time_attr={self._time_attr!r}, "
            f"max_t={self.max_t}, grace_period={self._grace_period}, stop_threshold={self.stop_threshold}, "
            f"velocity_key={self._velocity_key!r}, change_key={self._change_key!r}, "
            f"allow_missing={self._allow_missing}, base_scheduler={describe(self.base_scheduler)})"
        )


def _check_mode(mode: str | None) -> None:
    if mode not in (None, "min", "max"):
        raise ValueError(f"mode must be 'min', 'max' or None, but got {mode=}.")
