"""What ``NeVeScheduler`` keeps per trial: the records of stopped trials, and the base scheduler it composes.

``NeVeScheduler(base_scheduler=ASHAScheduler(...))`` composes NeVe's in-trial decisions with one of Ray
Tune's own multi-fidelity schedulers (ASHA, HyperBand, ...), which ranks the trials on a validation-free
signal. This module holds the state-heavy part, as ``async_hyperband._Bracket`` does for ASHA: the
scheduler delegates every hook to :class:`BaseLink`, which forwards it to the base unchanged.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import uuid
from collections.abc import Iterator, Mapping
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
from ray.tune.schedulers.trial_scheduler import TrialScheduler

from neve_tune import StopReason, keys

if TYPE_CHECKING:
    from ray.tune.execution.tune_controller import TuneController

#: Keys added to a stopped trial's last result (``ResultGrid[i].metrics``): the stop reason as a string,
#: and the epoch (``neve/epoch``, else ``training_iteration``) of the result that stopped it.
STOP_REASON = keys.STOP_REASON
STOP_EPOCH = keys.STOP_EPOCH

# Keys Tune itself puts in a result. A result made only of these carries no report from the trainable
# (e.g. `tune.report({})`, or a trial that returned without reporting) and is not checked for the velocity
# key; Tune's own strict metric check skips such results too.
BOOKKEEPING_KEYS = frozenset((*AUTO_RESULT_KEYS, *DEBUG_METRICS, DONE, EXPERIMENT_TAG, SHOULD_CHECKPOINT))


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
        reason = metrics.get(STOP_REASON)
        if reason is None:
            return None
        velocity = metrics.get(keys.MODEL_VELOCITY)
        return StopInfo(
            reason=StopReason(reason),
            epoch=int(metrics[STOP_EPOCH]),
            time=float(metrics.get(TRAINING_ITERATION, math.nan)),
            model_velocity=None if velocity is None else float(velocity),
        )


#: Where the base's state is kept, in the experiment's driver staging directory. Tune syncs that
#: directory with the experiment state and downloads its ``.pkl`` files again on ``Tuner.restore``.
STATE_FILE = "neve_scheduler_base_state.pkl"


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
    * Persistence: a base that implements ``save``/``restore`` (ASHA does, HyperBand does not) has its state
      written to :data:`STATE_FILE` in the experiment's driver staging directory whenever it changes,
      tagged with a token drawn at construction. ``Tuner.restore`` gives back the scheduler as pickled
      at construction (same token), and the first trial it adds loads that state: the rungs survive.
    """

    def __init__(
        self,
        base: TrialScheduler,
        *,
        owner: str,
        time_attr: str,
        metric: str | None,
        mode: str | None,
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
        self._owner = owner
        if not base.metric and metric:
            self.set_search_properties(metric, mode)
        self._token = uuid.uuid4().hex
        self._loaded = False  # whether the persisted state was looked for (once, at the first add)
        self._saved: bytes | None = None  # what the state file holds, to write it only on a change
        self._can_save = True  # False once the base's save() raised NotImplementedError
        self._depth = 0

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

    def set_search_properties(self, metric: str | None, mode: str | None) -> bool:
        """Hand ``TuneConfig``'s metric/mode to a base that has no metric; a base with one keeps it."""
        if self.base.metric:
            return True
        return bool(self.base.set_search_properties(metric, mode))

    def check_result(self, result: Mapping[str, Any], allow_missing: bool, has_user_keys: bool) -> None:
        """Raise when a result with the trial's own keys lacks the base's metric (the base would ignore it)."""
        metric = self.base.metric
        if metric and metric not in result and has_user_keys and not allow_missing:
            raise ValueError(
                f"{self._owner}'s base_scheduler {type(self.base).__name__} ranks trials on {metric!r},"
                " but this result has no such key, so it could never prune. Report it in every result"
                f" (e.g. `tune.report({{{metric!r}: train_loss, **neve.metrics()}})`), or give the base the"
                f" metric= the trainable reports. Reported keys: {sorted(result)}"
            )

    @contextlib.contextmanager
    def _forward(self, trial: Trial | None) -> Iterator[None]:
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0 and trial is not None:
                self._persist(trial)

    # ------------------------------------------------------------------ hooks, forwarded as Tune calls them
    def on_trial_add(self, controller: TuneController | None, trial: Trial) -> None:
        if not self._loaded:
            self._loaded = True
            self._load(trial)
        if not self.base.metric:
            raise ValueError(
                f"{self._owner}'s base_scheduler {type(self.base).__name__} has no metric to rank trials on."
                " Pass metric= and mode= to the base (a validation-free signal, e.g. metric='train_loss',"
                f" mode='min'), or to {self._owner} or tune.TuneConfig, which a base without one adopts."
            )
        with self._forward(trial):
            self.base.on_trial_add(controller, trial)  # type: ignore[arg-type]

    def on_trial_result(self, controller: TuneController | None, trial: Trial, result: dict) -> str:
        with self._forward(trial):
            return str(self.base.on_trial_result(controller, trial, result))  # type: ignore[arg-type]

    def on_trial_complete(self, controller: TuneController | None, trial: Trial, result: dict) -> None:
        with self._forward(trial):
            self.base.on_trial_complete(controller, trial, result)  # type: ignore[arg-type]

    def on_trial_remove(self, controller: TuneController | None, trial: Trial) -> None:
        with self._forward(trial):
            self.base.on_trial_remove(controller, trial)  # type: ignore[arg-type]

    def on_trial_error(self, controller: TuneController | None, trial: Trial) -> None:
        with self._forward(trial):
            self.base.on_trial_error(controller, trial)  # type: ignore[arg-type]

    def choose_trial_to_run(self, controller: TuneController | None) -> Trial | None:
        with self._forward(None):
            return self.base.choose_trial_to_run(controller)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ persistence across Tuner.restore
    def _state_dir(self, trial: Trial) -> str | None:
        storage = getattr(trial, "storage", None)
        path = getattr(storage, "experiment_driver_staging_path", None) if storage is not None else None
        return path if isinstance(path, str) else None

    def _persist(self, trial: Trial) -> None:
        folder = self._state_dir(trial)
        if folder is None or not self._can_save:
            return
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        os.close(fd)
        try:
            try:
                self.base.save(tmp)
            except NotImplementedError:
                self._can_save = False  # e.g. HyperBand: it starts afresh on restore, as it does alone
                return
            with open(tmp, "rb") as f:
                state = self._token.encode() + b"\n" + f.read()
            if state != self._saved:
                with open(tmp, "wb") as f:
                    f.write(state)
                os.replace(tmp, os.path.join(folder, STATE_FILE))
                self._saved = state
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def _load(self, trial: Trial) -> None:
        folder = self._state_dir(trial)
        path = None if folder is None else os.path.join(folder, STATE_FILE)
        if path is None or not os.path.exists(path):
            return
        with open(path, "rb") as f:
            token, _, state = f.read().partition(b"\n")
        if token.decode() != self._token:
            return  # another scheduler's state (another experiment in this directory)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(state)
            self.base.restore(tmp)
        finally:
            os.unlink(tmp)
        self._saved = token + b"\n" + state

    def __getstate__(self) -> dict[str, Any]:
        # A copy (Tuner.restore's, or NeVeScheduler.save's) looks for the persisted state at its first add.
        state = dict(self.__dict__)
        state.update(_depth=0, _loaded=False, _saved=None)
        return state


def describe(base: TrialScheduler | None) -> str:
    """A short text for a base scheduler in a repr."""
    if base is None:
        return "None"
    return f"<{type(base).__name__} metric={base.metric!r} mode={getattr(base, '_mode', None)!r}>"


def is_finished(trial: Trial) -> bool:
    return trial.status in (Trial.TERMINATED, Trial.ERROR)


def has_user_keys(result: Mapping[str, Any]) -> bool:
    return any(k not in BOOKKEEPING_KEYS for k in result)


def epoch_of(result: Mapping[str, Any]) -> int:
    epoch = result.get(keys.EPOCH)
    if epoch is None:
        epoch = result.get(TRAINING_ITERATION, 0)
    return int(epoch)
