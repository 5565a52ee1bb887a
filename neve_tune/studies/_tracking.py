"""The MLflow run tree of a study: study run -> one parent run per arm (per seed) -> one child run per trial.

With several seeds, each arm has one parent run per seed (named ``<arm>-seed<S>``); every arm run is
tagged ``seed``, and the study run's params ``seeds`` lists them in order.

The driver creates the study and arm runs (:class:`StudyTracker`) before any training starts; each trial
opens its own child run from its arm's link (:class:`neve_tune.mlflow.TrialLogger`). The arm runs act on
their trial runs with ``children`` operations (end a trial stopped from outside, tag the picked trial,
close what is left open), queued like any other write and registered for replay (:mod:`._children`).

The driver outlives its trials. When the study ends, it sends what trials could not (their
``mlflow-unsent-*.jsonl`` files) once MLflow answers again, within a bounded wait; what is still unsent
then is named, with the command that sends it later (``neve-tune mlflow replay FOLDER``).
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from neve_tune.mlflow import MlflowLink, MlflowUnavailableWarning, TrackingUnavailableError, get_or_create_experiment
from neve_tune.mlflow._deps import require_mlflow
from neve_tune.mlflow._experiment import artifact_location, safe_name
from neve_tune.mlflow._logger import (
    TAG_ARM,
    TAG_PARENT,
    TAG_ROLE,
    TAG_STUDY,
    ArtifactFiles,
    RunWriter,
    check_status,
    flatten_params,
)
from neve_tune.mlflow._outbox import Op, RunOutbox, chunk_batch, millis
from neve_tune.mlflow._replay import describe_unsent, replay_command, replay_files, unsent_files
from neve_tune.mlflow._uri import configure_client_env, fail_fast_http, resolve_tracking_uri

from ._children import run_children_op  # registers the ``children`` operation of the arm runs

if TYPE_CHECKING:
    from neve_tune.mlflow._replay import UnsentFile


#: The tag of an arm run that names the seed it ran with.
TAG_SEED = "seed"

#: Replay order of saved files (trial runs first: the arm runs' operations act on them).
_ARM_ORDER, _STUDY_ORDER = 1, 2


class ArmRun(RunWriter):
    """The parent run of one study arm (driver side). Trials open children with :attr:`link`.

    NaN policy: metric values are logged as given; ``None`` values are skipped. State: none beyond MLflow;
    writes go through an outbox that survives outages (see :class:`StudyTracker`). The operations on trial
    runs are remembered, so that they can be sent again after trial records that arrive late (replayed).
    """

    def __init__(self, tracker: StudyTracker, name: str, run_id: str, *, run_name: str | None = None) -> None:
        self.name = name
        self.run_name = run_name or name
        self._files = tracker._files
        self._outbox = RunOutbox(
            tracker.tracking_uri,
            tracker.experiment_id,
            run_id=run_id,
            label=f"arm run '{self.run_name}'",
            retry_interval_s=tracker.retry_interval_s,
            order=_ARM_ORDER,
            spool=tracker.spool_file(f"arm-{self.run_name}"),
        )
        self.link = MlflowLink(
            tracker.tracking_uri, tracker.experiment_id, run_id, name, tracker.study, tracker.retry_interval_s
        )
        self.ended: str | None = None
        self._children: list[Op] = []

    def log_metrics(self, metrics: Mapping[str, Any], step: int = 0) -> None:
        """Log arm-level metrics (``None`` values skipped)."""
        ts = millis()
        rows = [(k, float(v), ts, step) for k, v in metrics.items() if v is not None]
        self._outbox.put(chunk_batch(rows))

    def _children_op(self, data: dict[str, Any]) -> None:
        op = Op("children", data)
        self._children.append(op)
        self._outbox.put(op)

    def finalize_trial(
        self,
        trial_id: str,
        *,
        status: str,
        stop_reason: str | None = None,
        stop_epoch: int | None = None,
        stop_threshold: float | None = None,
        error: str | None = None,
    ) -> None:
        """Safety net for a trial whose process could not end its own run (stopped or killed from outside).

        If the trial's child run is still RUNNING: tag its stop reason/epoch (unless the trial did), draw
        its velocity plots from the metric history it logged (unless it uploaded them), and end it with
        ``status`` (``FINISHED`` for a pruned trial, see :mod:`neve_tune.mlflow._logger`). Runs that the
        trial ended itself are left as they are. Queued like any other write, so it survives an outage (and
        is saved for :func:`~neve_tune.mlflow.replay_unsent`).
        """
        check_status(status)
        reason = None if stop_reason is None else str(stop_reason)
        self._children_op(
            {"action": "finalize", "trial_id": trial_id, "status": status, "stop_reason": reason}
            | {"stop_epoch": stop_epoch, "stop_threshold": stop_threshold, "error": error}
        )

    def tag_trial(self, trial_id: str, tags: Mapping[str, Any]) -> None:
        """Set tags on the child run of ``trial_id`` (e.g. ``picked=true``), whatever its status."""
        self._children_op({"action": "tag", "trial_id": trial_id, "tags": {k: str(v) for k, v in tags.items()}})

    def close_open_trials(self, status: str = "KILLED") -> None:
        """End every child run of this arm still RUNNING with ``status`` (after an interrupted study)."""
        check_status(status)
        self._children_op({"action": "close", "status": status})

    def requeue_trial_ops(self) -> None:
        """Queue the operations on trial runs again (idempotent), e.g. after their late records were sent."""
        self._outbox.put([Op(op.kind, dict(op.data)) for op in self._children], send=False)

    def end(self, status: str = "FINISHED") -> None:
        """End the arm run (idempotent)."""
        if self.ended is None:
            self.ended = check_status(status)
            self._outbox.put(Op("terminate", {"status": status, "end_time": millis()}))


class StudyTracker(RunWriter):
    """The study run and its arm runs, created up front by the driver (before any training).

    Creating them is the pre-flight check: if MLflow cannot be written, :class:`TrackingUnavailableError`
    is raised and nothing has been trained yet. After that, every write goes through an outbox, so the
    tracking server going away later never stops the study (see :class:`~neve_tune.mlflow.TrialLogger`).

    Status: :meth:`end` ends the study run and every arm run not ended yet, FINISHED/FAILED/KILLED, and
    first sends what the trials saved in ``fallback_dir`` (see :meth:`drain`).

    NaN policy: metric values are logged as given (NaN/inf included); ``None`` values are skipped.

    State: nothing to save or restore; the runs live in MLflow. A new tracker always opens a new study run
    (in an existing experiment, when the name exists).

    Args:
        tracking_uri: the store (``None``: ``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db``).
        experiment: the experiment name (created when missing, tagged as model training).
        study: the study name (tagged ``study``).
        arms: the arm names; one parent run each (per seed).
        seeds: the study's seeds (default one, ``0``): with several, one parent run per arm and seed, named
            ``<arm>-seed<S>``; every arm run is tagged ``seed``.
        params: study-level params (budget, seed, ...).
        arm_params: per-arm params (e.g. the scheduler settings).
        run_name: the study run's name (default ``<study>-<YYYYmmdd-HHMMSS>``).
        retry_interval_s: how often a buffered writer retries an unreachable server.
        fallback_dir: where trials and the tracker save what they cannot send (default: the working folder).
        drain_timeout_s: at the end of a finished study, how long to wait for an unreachable server to send
            what is unsent (0: one try).
    """

    def __init__(
        self,
        tracking_uri: str | None,
        experiment: str,
        *,
        study: str,
        arms: Sequence[str],
        seeds: Sequence[int] = (0,),
        params: Mapping[str, Any] | None = None,
        arm_params: Mapping[str, Mapping[str, Any]] | None = None,
        run_name: str | None = None,
        retry_interval_s: float = 10.0,
        fallback_dir: str | os.PathLike[str] | None = None,
        drain_timeout_s: float = 60.0,
    ) -> None:
        require_mlflow()
        configure_client_env()
        from mlflow import MlflowClient
        from mlflow.entities import Param, RunTag

        if drain_timeout_s < 0:
            raise ValueError(f"drain_timeout_s must be >= 0, but got {drain_timeout_s=}.")
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self.study = study
        self.retry_interval_s = float(retry_interval_s)
        self.drain_timeout_s = float(drain_timeout_s)
        self.fallback_dir = Path(fallback_dir) if fallback_dir is not None else Path.cwd()
        self._files = ArtifactFiles()
        client = MlflowClient(tracking_uri=self.tracking_uri)
        try:
            self.experiment_id = get_or_create_experiment(
                client, experiment, artifact_location=artifact_location(self.tracking_uri, experiment)
            )
            name = run_name or f"{study}-{time.strftime('%Y%m%d-%H%M%S')}"
            run = client.create_run(self.experiment_id, tags={TAG_ROLE: "study", TAG_STUDY: study}, run_name=name)
            self.run_name = name
            study_id = run.info.run_id
            flat = flatten_params(params or {})
            if flat:
                client.log_batch(study_id, params=[Param(k, v) for k, v in flat.items()])
            self._arms: dict[str, ArmRun] = {}
            self._seeds = [int(seed) for seed in seeds]
            for seed in self._seeds:
                for arm in arms:
                    label = self._label(arm, seed)
                    arm_tags = {TAG_ROLE: "arm", TAG_ARM: arm, TAG_STUDY: study, TAG_PARENT: study_id}
                    arm_tags[TAG_SEED] = str(seed)
                    arm_run = client.create_run(self.experiment_id, tags=arm_tags, run_name=label)
                    flat = flatten_params((arm_params or {}).get(arm, {}))
                    if flat:
                        client.log_batch(arm_run.info.run_id, params=[Param(k, v) for k, v in flat.items()])
                    self._arms[label] = ArmRun(self, arm, arm_run.info.run_id, run_name=label)
            client.log_batch(study_id, tags=[RunTag("arms", ",".join(arms))])
        except TrackingUnavailableError:
            raise
        except Exception as err:
            raise TrackingUnavailableError(
                f"Cannot create the study runs in MLflow at {self.tracking_uri!r}: {type(err).__name__}: {err}. "
                "Nothing was trained. Check the tracking URI (or start the server) and run again."
            ) from err
        self._outbox = RunOutbox(
            self.tracking_uri,
            self.experiment_id,
            run_id=study_id,
            label=f"study run '{name}'",
            retry_interval_s=self.retry_interval_s,
            order=_STUDY_ORDER,
            spool=self.spool_file("study"),
        )
        self.ended: str | None = None
        self._refused: set[Path] = set()

    def spool_file(self, label: str) -> Path:
        """Where the study's run ``label`` (``study``, ``arm-<name>``) keeps what it could not send."""
        return self.fallback_dir / f"mlflow-unsent-{safe_name(self.run_name)}-{label}.jsonl"

    @property
    def study_run_id(self) -> str:
        """The study run's id."""
        return self._outbox.require_run()

    @property
    def arms(self) -> dict[str, ArmRun]:
        """The arm runs by run name (the arm's name; ``<arm>-seed<S>`` with several seeds)."""
        return dict(self._arms)

    def _label(self, arm: str, seed: int | None) -> str:
        return arm if len(self._seeds) == 1 else f"{arm}-seed{seed}"

    def arm(self, name: str, seed: int | None = None) -> ArmRun:
        """The parent run of arm ``name`` (of ``seed``, with several seeds)."""
        try:
            return self._arms[self._label(name, seed)]
        except KeyError:
            raise KeyError(f"No arm {name!r} (seed {seed}) in this study; arm runs: {sorted(self._arms)}.") from None

    def log_metrics(self, metrics: Mapping[str, Any], step: int = 0) -> None:
        """Log study-level metrics (``None`` values skipped)."""
        ts = millis()
        self._outbox.put(chunk_batch([(k, float(v), ts, step) for k, v in metrics.items() if v is not None]))

    # ------------------------------------------------------------------ the end of the study
    def _writers(self) -> list[RunOutbox]:
        return [*(a._outbox for a in self._arms.values()), self._outbox]

    def unsent(self) -> list[UnsentFile]:
        """The saved files in ``fallback_dir`` bound for this tracker's store and experiment, in replay order."""
        files = unsent_files(self.fallback_dir) if self.fallback_dir.is_dir() else []
        return [f for f in files if (f.tracking_uri, f.experiment_id) == (self.tracking_uri, self.experiment_id)]

    def _send_once(self) -> bool:
        own = {writer.spool for writer in self._writers()}  # sent from memory below, not replayed
        files = [f for f in self.unsent() if f.path not in self._refused and f.path not in own]
        if files:
            report = replay_files(files, folder=self.fallback_dir)
            self._refused.update(report.refused)
            if report.outage:
                return False
        return all(writer.send(force=True) for writer in self._writers())

    def drain(self, timeout_s: float | None = None, *, first_wait_s: float = 1.0, max_wait_s: float = 15.0) -> bool:
        """Send what is still unsent: the trials' saved files first, then the arm and study runs' queues.

        While MLflow does not answer, try again after ``first_wait_s``, doubling up to ``max_wait_s``, for at
        most ``timeout_s`` (default :attr:`drain_timeout_s`). When trial files are found, the arm runs'
        operations on trial runs are sent again after them (a trial stopped from outside is ended only once
        its own records are there). Returns True when nothing is left.
        """
        timeout_s = self.drain_timeout_s if timeout_s is None else float(timeout_s)
        deadline = time.monotonic() + timeout_s
        if any(f.order == 0 for f in self.unsent()):
            for arm in self._arms.values():
                arm.requeue_trial_ops()
        wait, waited_since = first_wait_s, None
        sent = self._send_once()  # the first try as any other write; the next ones fail fast
        while not sent:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if waited_since is None:
                waited_since = time.monotonic()
                warnings.warn(
                    f"MLflow at {self.tracking_uri} does not answer; waiting up to {timeout_s:g} s to send the "
                    f"records that could not be sent ({describe_unsent(self.unsent())} saved in "
                    f"{self.fallback_dir}, and the study's own).",
                    MlflowUnavailableWarning,
                    stacklevel=2,
                )
            time.sleep(min(wait, left))
            wait = min(2 * wait, max_wait_s)
            with fail_fast_http():
                sent = self._send_once()
        if waited_since is not None:
            warnings.warn(
                f"MLflow at {self.tracking_uri} answered again after {time.monotonic() - waited_since:.0f} s; "
                "the unsent records were sent.",
                MlflowUnavailableWarning,
                stacklevel=2,
            )
        return not self._refused

    def end(self, status: str = "FINISHED") -> list[Path]:
        """End the arm runs still open and the study run with ``status``; send everything (see :meth:`drain`).

        Only a ``FINISHED`` study waits for an unreachable server (up to :attr:`drain_timeout_s`); a failed or
        interrupted one tries once. Whatever is still unsent is saved to ``fallback_dir`` and named in a
        :class:`MlflowUnavailableWarning`, with the command that sends it later.

        Returns the files where the tracker's own records were saved (usually none).
        """
        check_status(status)
        saved: list[Path] = []
        try:
            for arm in self._arms.values():
                arm.end(status)
            if self.ended is None:
                self.ended = status
                self._outbox.put(Op("terminate", {"status": status, "end_time": millis()}), send=False)
            if not self.drain(self.drain_timeout_s if status == "FINISHED" else 0.0):
                saved = [path for path in (writer.save() for writer in self._writers()) if path is not None]
                left = self.unsent()
                if left:
                    warnings.warn(
                        f"MLflow at {self.tracking_uri} stayed unreachable: still unsent in {self.fallback_dir}: "
                        f"{describe_unsent(left)}. Send them when it answers again with "
                        f"`{replay_command(self.fallback_dir)}`.",
                        MlflowUnavailableWarning,
                        stacklevel=2,
                    )
        finally:
            self._files.cleanup()
        return saved


__all__ = ["TAG_SEED", "ArmRun", "StudyTracker", "run_children_op"]
