"""What ``NeVeScheduler`` keeps: the records of the trials it stopped, and the base scheduler it composes.

``NeVeScheduler(base_scheduler=ASHAScheduler(...))`` composes NeVe's in-trial decisions with one of Ray
Tune's own multi-fidelity schedulers (ASHA, HyperBand, ...), which ranks the trials on a validation-free
signal. This module holds the state-heavy part, as ``async_hyperband._Bracket`` does for ASHA: the
scheduler keeps its per-trial records in :class:`Records` and delegates every hook to :class:`BaseLink`,
which forwards it to the base unchanged and persists the base's state for ``Tuner.restore``.
"""

from __future__ import annotations

import math
import os
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ray.tune.experiment import Trial
from ray.tune.result import (
    AUTO_RESULT_KEYS,
    DEBUG_METRICS,
    DONE,
    EXPERIMENT_TAG,
    SHOULD_CHECKPOINT,
    TRAINING_ITERATION,
)
from ray.tune.schedulers import AsyncHyperBandScheduler, MedianStoppingRule
from ray.tune.schedulers.trial_scheduler import FIFOScheduler, TrialScheduler

from neve_tune import StopReason, keys

if TYPE_CHECKING:
    from ray.tune.execution.tune_controller import TuneController

# Keys Tune itself puts in a result. A result made only of these carries no report from the trainable
# (e.g. `tune.report({})`, or a trial that returned without reporting) and is not checked for the velocity
# key; Tune's own strict metric check skips such results too.
BOOKKEEPING_KEYS = frozenset((*AUTO_RESULT_KEYS, *DEBUG_METRICS, DONE, EXPERIMENT_TAG, SHOULD_CHECKPOINT))

#: How often, at most, the base's state is written while trials run (seconds). A trial's error and
#: ``NeVeScheduler.save`` write it at once, and so does the end of the last live trial.
PERSIST_EVERY_S = 5.0

_FLAG_KEYS = tuple(keys.DECISION_FLAGS.values())
# Tune's result hooks that return a decision and never stop or pause a trial through the controller
# (HyperBand's does: it stops the paused losers of a bracket).
_RESULT_ONLY_HOOKS = frozenset(
    (FIFOScheduler.on_trial_result, AsyncHyperBandScheduler.on_trial_result, MedianStoppingRule.on_trial_result)
)
_monotonic = time.monotonic

# BaseLink attributes that are not pickled: a copy finds its state file again and counts afresh.
_PER_PROCESS = ("_path", "_due", "_depth", "_count", "writes")


@dataclass(frozen=True)
class StopInfo:
    """Why and when :class:`NeVeScheduler` stopped one trial.

    Attributes:
        reason: ``CONVERGED``, ``STALLED``, ``COLLAPSED``, ``DIVERGED`` (the trial's own decision),
            ``PRUNED`` (the ``base_scheduler`` cut it) or ``MAX_T``.
        epoch: ``neve/epoch`` of the stopping result (``training_iteration`` when the trial did not
            report it).
        time: the value of the scheduler's ``time_attr`` in the stopping result.
        model_velocity: the model velocity in the stopping result (``None`` when it was not reported).
    """

    reason: StopReason
    epoch: int
    time: float
    model_velocity: float | None

    @staticmethod
    def from_metrics(metrics: Mapping[str, Any]) -> StopInfo | None:
        """Read what the scheduler wrote into a trial's last result, e.g. ``ResultGrid[i].metrics``.

        Returns ``None`` when the scheduler did not stop that trial (it ended by itself, errored, or was
        stopped by something else). ``time`` is the trial's ``training_iteration``.
        """
        reason = metrics.get(keys.STOP_REASON)
        if reason is None:
            return None
        velocity = metrics.get(keys.MODEL_VELOCITY)
        return StopInfo(
            reason=StopReason(reason),
            epoch=int(metrics[keys.STOP_EPOCH]),
            time=float(metrics.get(TRAINING_ITERATION, math.nan)),
            model_velocity=None if velocity is None else float(velocity),
        )


class Records:
    """The trials a ``NeVeScheduler`` knows, keyed by ``trial.trial_id``.

    ``live`` holds the trials added and not yet ended; ``stopped`` the :class:`StopInfo` of every trial the
    scheduler stopped (kept after the trial ends); ``warned`` the trials already warned about a
    ``stop_threshold`` that disagrees with their own.
    """

    def __init__(self) -> None:
        self.live: set[str] = set()
        self.stopped: dict[str, StopInfo] = {}
        self.warned: set[str] = set()

    def add(self, trial: Trial) -> bool:
        """Register a trial; ``False`` for a finished one (``Tuner.restore`` re-adds them), re-recorded."""
        if trial.status in (Trial.TERMINATED, Trial.ERROR):
            info = StopInfo.from_metrics(trial.last_result)
            if info is not None:
                self.stopped[trial.trial_id] = info
            return False
        self.live.add(trial.trial_id)
        return True

    def end(self, trial: Trial) -> None:
        """The trial ended: write its record (if any) into its last result, which Tune keeps."""
        self.live.discard(trial.trial_id)
        self.warned.discard(trial.trial_id)
        info = self.stopped.get(trial.trial_id)
        if info is not None:
            last = dict(trial.last_result)
            last[keys.STOP_REASON] = info.reason.value
            last[keys.STOP_EPOCH] = info.epoch
            trial.update_last_result(last)

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for info in self.stopped.values():
            counts[info.reason.value] = counts.get(info.reason.value, 0) + 1
        return ", ".join(f"{reason}={n}" for reason, n in sorted(counts.items())) or "none"


class BaseLink:
    """One base scheduler inside a ``NeVeScheduler``.

    * Validation (at construction): a ``TrialScheduler`` with the same ``time_attr`` (when it has one),
      and with a ``mode`` whenever it has a ``metric``. (``NeVeScheduler`` refuses another
      ``NeVeScheduler`` itself.)
    * Metric rule: a base with its own ``metric`` keeps it (the ranking signal): neither the
      ``NeVeScheduler``'s ``metric``/``mode`` nor ``tune.TuneConfig``'s ever replace it. A base without
      one takes the ``NeVeScheduler``'s (at construction), else ``TuneConfig``'s (in
      ``set_search_properties``); a trial added while it still has none raises ``ValueError``.
    * Forwarding: every hook goes to the base as Tune would call it. While a base hook runs,
      :attr:`forwarding` is true: a trial that the base stops through the controller (HyperBand stops
      paused trials with ``tune_controller.stop_trial``) reaches ``NeVeScheduler.on_trial_remove`` then.
      Only results skip this: ``NeVeScheduler`` hands them straight to a base whose result hook is one of
      Tune's that only return a decision (:attr:`result_only`: ASHA's, FIFO's, the median stopping rule's).
    * Persistence: Ray 2.60's ``Tuner.restore`` gives back the scheduler as pickled at construction and
      never calls ``save``/``restore``. So a base that implements ``save`` (ASHA does, HyperBand does not)
      has its state written into the experiment's driver staging directory, which Tune syncs with the
      experiment state and downloads again on restore, under a name holding a token drawn at
      construction: the restored copy (same token) loads it when its first trial is added, and gets its
      rungs back. The state is written when it must survive a restore, not on every result: when a trial
      errors (``resume_errored``), when the last live trial ends, on ``NeVeScheduler.save``, and otherwise
      at most once every :data:`PERSIST_EVERY_S` seconds, on a trial's add or end or on the step of Tune's
      controller (``choose_trial_to_run``, which it calls on every step). A result costs no clock read. A
      restore after an ungraceful stop (a killed driver) can therefore lose the base's last few seconds of
      records, as Tune loses its own trial results since its last experiment snapshot.
    """

    def __init__(
        self,
        base: TrialScheduler,
        *,
        time_attr: str,
        metric: str | None,
        mode: str | None,
        allow_missing: bool,
        owner: str = "NeVeScheduler",
    ) -> None:
        if not isinstance(base, TrialScheduler):
            raise TypeError(
                f"base_scheduler must be a ray.tune.schedulers.TrialScheduler (e.g. ASHAScheduler) or None,"
                f" but got {type(base).__name__}."
            )
        base_time = getattr(base, "_time_attr", None)
        if base_time is not None and base_time != time_attr:
            raise ValueError(
                f"base_scheduler {type(base).__name__} counts progress in time_attr={base_time!r}, but"
                f" {owner} in time_attr={time_attr!r}; pass the same time_attr to both."
            )
        if base.metric and getattr(base, "_mode", "unknown") is None:
            raise ValueError(
                f"base_scheduler {type(base).__name__} has metric={base.metric!r} but no mode; pass"
                f" mode='min' or 'max' with it (e.g. mode='min' for a training loss)."
            )
        self.base = base
        self.persist_every_s = PERSIST_EVERY_S
        self._owner = owner
        self._allow_missing = bool(allow_missing)
        if not base.metric and metric:
            self.set_search_properties(metric, mode)
        self.metric_key = base.metric  # the base's metric, fixed once trials run: read on every result
        # A base whose result hook is one of Tune's that only return a decision never stops a trial through
        # the controller there: NeVeScheduler calls it directly, without the `forwarding` bookkeeping.
        self.result_only = type(base).on_trial_result in _RESULT_ONLY_HOOKS
        self._token = uuid.uuid4().hex
        self._reset()

    def _reset(self) -> None:
        # Per-process state (_PER_PROCESS), set afresh in every copy (Tuner.restore's, NeVeScheduler.save's).
        self._path: str | None = None  # the state file, once a trial with a storage context was added
        self._due = math.inf  # _monotonic() after which the next hook writes the state (inf: never)
        self._depth = 0
        self._count = 0  # trials handed to the base and not ended
        self.writes = 0  # how many times this process wrote the state file

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in _PER_PROCESS}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    @property
    def metric(self) -> str | None:
        """The base's ranking signal (its own ``metric``)."""
        return self.base.metric

    @property
    def forwarding(self) -> bool:
        """True while a hook of the base runs."""
        return self._depth > 0

    @property
    def cap(self) -> float | None:
        """The base's own epoch cap (``max_t`` of ASHA and HyperBand), if it has one."""
        for name in ("_max_t", "_max_t_attr"):
            value = getattr(self.base, name, None)
            if isinstance(value, int | float):
                return float(value)
        return None

    def stop_info(self, result: Mapping[str, Any], time_attr: str, velocity_key: str) -> StopInfo:
        """The record of a trial the base stopped: ``MAX_T`` at the base's own cap, else ``PRUNED``."""
        time = float(result.get(time_attr, math.nan))
        cap = self.cap
        reason = StopReason.MAX_T if cap is not None and time >= cap else StopReason.PRUNED
        velocity = result.get(velocity_key)
        return StopInfo(reason, epoch_of(result), time, None if velocity is None else float(velocity))

    def set_search_properties(self, metric: str | None, mode: str | None) -> bool:
        """Hand ``TuneConfig``'s metric/mode to a base that has no metric; a base with one keeps it."""
        if self.base.metric:
            return True
        accepted = bool(self.base.set_search_properties(metric, mode))
        self.metric_key = self.base.metric
        return accepted

    # ------------------------------------------------------------------ hooks, forwarded as Tune calls them
    def on_trial_add(self, controller: TuneController | None, trial: Trial) -> None:
        if self._path is None:
            self._attach(trial)
        if not self.base.metric:
            raise ValueError(
                f"{self._owner}'s base_scheduler {type(self.base).__name__} has no metric to rank trials on."
                " Pass metric= and mode= to the base (a validation-free signal, e.g. metric='train_loss',"
                f" mode='min'), or to {self._owner} or tune.TuneConfig, which a base without one adopts."
            )
        self.metric_key = self.base.metric
        self._count += 1
        self._depth += 1
        try:
            self.base.on_trial_add(controller, trial)
        finally:
            self._depth -= 1
        if self._depth == 0 and _monotonic() >= self._due:
            self.persist()

    def check_metric(self, result: Mapping[str, Any]) -> None:
        """For a result without :attr:`metric_key`: raise unless it has no key of the trial's own."""
        metric = self.metric_key
        if metric not in result and not self._allow_missing and has_user_keys(result):
            raise ValueError(
                f"{self._owner}'s base_scheduler {type(self.base).__name__} ranks trials on {metric!r},"
                " but this result has no such key, so it could never prune. Report it in every result"
                f" (e.g. `tune.report({{{metric!r}: train_loss, **neve.metrics()}})`), or give the base the"
                f" metric= the trainable reports. Reported keys: {sorted(result)}"
            )

    def on_trial_result(self, controller: TuneController | None, trial: Trial, result: dict) -> str:
        """The base's decision, with :attr:`forwarding` true while its hook runs (the caller checks the metric)."""
        self._depth += 1
        try:
            return self.base.on_trial_result(controller, trial, result)
        finally:
            self._depth -= 1

    def on_trial_complete(self, controller: TuneController | None, trial: Trial, result: dict) -> None:
        self._end(self.base.on_trial_complete, controller, trial, result)

    def on_trial_remove(self, controller: TuneController | None, trial: Trial) -> None:
        self._end(self.base.on_trial_remove, controller, trial)

    def on_trial_error(self, controller: TuneController | None, trial: Trial) -> None:
        self._end(self.base.on_trial_error, controller, trial, now=True)  # resume_errored re-runs it

    def choose_trial_to_run(self, controller: TuneController | None) -> Trial | None:
        # Tune's controller calls this on every step (one event, at most 0.1 s), results or not: the clock
        # that persists the base's state is read here rather than on every result.
        self._depth += 1
        try:
            trial = self.base.choose_trial_to_run(controller)
        finally:
            self._depth -= 1
        if self._depth == 0 and _monotonic() >= self._due:
            self.persist()
        return trial

    def _end(self, hook: Any, controller: TuneController | None, trial: Trial, *args: Any, now: bool = False) -> None:
        self._count = max(0, self._count - 1)
        self._depth += 1
        try:
            hook(controller, trial, *args)
        finally:
            self._depth -= 1
        if self._depth == 0 and (now or self._count == 0 or _monotonic() >= self._due):
            self.persist()

    # ------------------------------------------------------------------ persistence across Tuner.restore
    def state_file(self) -> str | None:
        """Where the base's state is written (``None`` until a trial with a Tune storage context is added)."""
        return self._path

    def persist(self) -> None:
        """Write the base's state now (atomically: a restore never reads a half-written file)."""
        path = self._path
        if path is None:
            return
        tmp = f"{path}.{os.getpid()}.tmp"
        self.base.save(tmp)
        os.replace(tmp, path)
        self.writes += 1
        self._due = _monotonic() + self.persist_every_s

    def _attach(self, trial: Trial) -> None:
        """Find the experiment's staging directory from the first trial that has one; load a saved state.

        A base without ``save``/``restore`` (HyperBand) is never written: it starts afresh on restore, as
        it does alone.
        """
        if type(self.base).save is TrialScheduler.save:
            return
        storage = getattr(trial, "storage", None)
        folder = getattr(storage, "experiment_driver_staging_path", None) if storage is not None else None
        if not isinstance(folder, str):
            return
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"neve_scheduler_base_{self._token}.pkl")
        if os.path.exists(path):
            self.base.restore(path)  # this is the restored copy: the same token (another one's is not read)
        self._path, self._due = path, 0.0


def describe(base: TrialScheduler | None) -> str:
    """A short text for a base scheduler in a repr."""
    if base is None:
        return "None"
    return f"<{type(base).__name__} metric={base.metric!r} mode={getattr(base, '_mode', None)!r}>"


def has_user_keys(result: Mapping[str, Any]) -> bool:
    return any(k not in BOOKKEEPING_KEYS for k in result)


def epoch_of(result: Mapping[str, Any]) -> int:
    epoch = result.get(keys.EPOCH)
    if epoch is None:
        epoch = result.get(TRAINING_ITERATION, 0)
    return int(epoch)


def missing_key_message(owner: str, key: str, time_attr: str, result: Mapping[str, Any]) -> str:
    """The error for a result that lacks a key the scheduler needs: the key, the fix, the keys reported."""
    reported = sorted(k for k in result if k not in BOOKKEEPING_KEYS)
    if key in keys.DECISION_FLAGS.values():
        fix = (
            f"{owner} acts on the decision the trial's own NeVe reports in its flags ({', '.join(_FLAG_KEYS)});"
            " it never decides from a velocity alone. Report `neve.metrics()` whole:"
            " `tune.report({**neve.metrics(), **your_metrics})`."
        )
    elif key == time_attr:
        fix = (
            f"Report {key!r} in every result, or pass `time_attr=` one of the keys the trainable "
            f"reports (`training_iteration` is always there)."
        )
    else:
        fix = (
            "Measure velocity inside the trainable with `neve = neve_tune.NeVe(model, optimizer, aux)` and"
            " report it after every epoch with `tune.report({**neve.metrics(), **your_metrics})` (or"
            " `neve_tune.ray.report_epoch(neve, your_metrics, model=model, optimizer=optimizer)`). If the"
            f" trainable reports velocity only on some results, pass `{owner}(allow_missing=True)`."
        )
    return f"{owner} needs {key!r} in every result, but this result has no such key. {fix} Reported keys: {reported}"
