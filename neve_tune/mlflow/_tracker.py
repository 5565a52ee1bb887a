"""The MLflow run tree of a study: study run -> one parent run per arm -> one child run per trial.

The driver creates the study and arm runs (:class:`StudyTracker`) before any training starts. Each trial,
in whatever Ray worker process it runs, opens its own child run (:class:`TrialLogger`) from a
:class:`MlflowLink` passed in its config: the tracking URI, the experiment and the parent run id. The
link is explicit (the ``mlflow.parentRunId`` tag), so it does not depend on MLflow's per-process active
run stack.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from neve_tune import keys

from ._deps import require_mlflow
from ._outbox import MlflowUnavailableWarning, Op, RunOutbox, chunk_batch
from ._plots import LAYER_PREFIX, PLOT_LOCK, VELOCITY_KEYS, VelocityHistory, plot_layer_heatmap, plot_velocity_curve
from ._uri import TrackingUnavailableError, configure_client_env, resolve_tracking_uri

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from mlflow import MlflowClient

#: Tag names on the runs neve_tune creates.
TAG_ROLE = "role"  # "study", "arm" or "trial"
TAG_STUDY = "study"
TAG_ARM = "arm"
TAG_TRIAL_ID = "trial_id"
TAG_STOP_REASON = keys.STOP_REASON  # the same names as the Ray scheduler's result keys
TAG_STOP_EPOCH = keys.STOP_EPOCH
TAG_ERROR = "error"
TAG_PARENT = "mlflow.parentRunId"

#: Artifact paths of the per-trial plots.
VELOCITY_CURVE_ARTIFACT = "plots/velocity_curve.png"
LAYER_HEATMAP_ARTIFACT = "plots/layer_velocity_heatmap.png"

_STATUSES = ("FINISHED", "FAILED", "KILLED")


def _now_ms() -> int:
    return int(time.time() * 1000)


def _check_status(status: str) -> str:
    if status not in _STATUSES:
        raise ValueError(f"status must be one of {_STATUSES}, but got {status=}.")
    return status


def flatten_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Trial config -> MLflow params: nested dicts joined with ``.``; the link and ``_private`` keys dropped."""
    out: dict[str, str] = {}
    for key, value in config.items():
        key = str(key)
        if not prefix and (key == MlflowLink.CONFIG_KEY or key.startswith("_")):
            continue
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_params(value, f"{name}."))
        else:
            out[name] = str(value)
    return out


@dataclass(frozen=True)
class MlflowLink:
    """Everything a trial needs to open its child run in another process: store, experiment, parent run.

    It travels in the trial's config under :attr:`CONFIG_KEY` (``"mlflow"``, as with Ray's own
    ``setup_mlflow``) as a plain dict, so it pickles into Ray workers and never becomes an MLflow param.
    Immutable; ``to_dict``/``from_dict`` round-trip it exactly. It holds no metric, hence no NaN policy.
    """

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    arm: str | None = None
    study: str | None = None
    retry_interval_s: float = 10.0

    CONFIG_KEY: ClassVar[str] = "mlflow"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MlflowLink:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> MlflowLink | None:
        """The link in a trial config, or ``None`` when the trial is not tracked."""
        data = config.get(cls.CONFIG_KEY)
        return None if data is None else cls.from_dict(data)

    def tags(self) -> dict[str, str]:
        out = {TAG_PARENT: self.parent_run_id}
        if self.arm is not None:
            out[TAG_ARM] = self.arm
        if self.study is not None:
            out[TAG_STUDY] = self.study
        return out


class _Artifacts:
    """A private temp folder where figures and texts are written before upload."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="neve_mlflow_"))
        self._count = 0

    def _path(self, artifact_file: str) -> Path:
        self._count += 1
        folder = self.dir / f"{self._count:05d}"
        folder.mkdir(parents=True)
        return folder / Path(artifact_file).name

    def figure(self, fig: Figure, artifact_file: str) -> Op:
        path = self._path(artifact_file)
        with PLOT_LOCK:
            fig.savefig(path)
        return Op("artifact", {"local_path": str(path), "artifact_path": os.path.dirname(artifact_file) or None})

    def text(self, text: str, artifact_file: str) -> Op:
        path = self._path(artifact_file)
        path.write_text(text)
        return Op("artifact", {"local_path": str(path), "artifact_path": os.path.dirname(artifact_file) or None})

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class _RunWriter:
    """Shared logging methods over a :class:`RunOutbox`."""

    _outbox: RunOutbox
    _files: _Artifacts

    @property
    def run_id(self) -> str | None:
        """The MLflow run id (``None`` while the run could not be created yet)."""
        return self._outbox.run_id

    @property
    def pending(self) -> int:
        """Operations waiting for MLflow to come back."""
        return self._outbox.pending

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params (nested dicts flattened with ``.``); values are turned into strings."""
        self._outbox.put(chunk_batch(params=flatten_params(params)))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._outbox.put(chunk_batch(tags={k: str(v) for k, v in tags.items()}))

    def log_artifact(self, local_path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        """Upload a local file (it must still exist when the upload happens, e.g. after an outage)."""
        self._outbox.put(Op("artifact", {"local_path": str(local_path), "artifact_path": artifact_path}))

    def log_figure(self, fig: Figure, artifact_file: str) -> None:
        """Save a matplotlib figure as PNG and upload it as ``artifact_file`` (e.g. ``plots/x.png``)."""
        self._outbox.put(self._files.figure(fig, artifact_file))

    def log_text(self, text: str, artifact_file: str) -> None:
        """Upload ``text`` as the artifact ``artifact_file`` (e.g. ``comparison.md``)."""
        self._outbox.put(self._files.text(text, artifact_file))


class TrialLogger(_RunWriter):
    """The child MLflow run of one trial, opened from a :class:`MlflowLink` in any process.

    Metrics are buffered and sent with ``MlflowClient.log_batch`` (at most 1,000 per request,
    ``step=epoch``) every ``flush_every`` epochs and when the run ends. Use it as a context manager,
    or call :meth:`end` in a ``finally``: the run always ends ``FINISHED``, ``FAILED`` (an exception) or
    ``KILLED`` (``KeyboardInterrupt``, or a non-zero ``SystemExit``).

    NaN policy: NaN and infinite metric values are logged as they are (a diverged trial shows them);
    ``None`` values are skipped.

    Outages: if MLflow cannot be reached, training goes on. Records are kept and re-sent when it comes
    back; what is still unsent when the run ends is saved to ``fallback_dir/mlflow-unsent-<run>.jsonl``
    (see :func:`neve_tune.mlflow.replay_unsent`) with a :class:`MlflowUnavailableWarning` naming the file.

    State: when ``trial_id`` is given and a run with that trial id already exists under the parent (a
    restarted Ray trial), that run is reopened instead of creating a second one.

    Args:
        link: where the run goes (see :class:`MlflowLink`).
        run_name: shown in the MLflow UI.
        params: the trial config (see :func:`flatten_params`).
        tags: extra tags.
        trial_id: e.g. Ray's trial id, tagged ``trial_id``.
        fallback_dir: where unsent records are saved (default: the working directory).
        flush_every: send buffered metrics every this many epochs (1: every epoch, so a trial killed by
            its scheduler loses nothing).
    """

    def __init__(
        self,
        link: MlflowLink,
        *,
        run_name: str | None = None,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, Any] | None = None,
        trial_id: str | None = None,
        fallback_dir: str | os.PathLike[str] | None = None,
        flush_every: int = 1,
    ) -> None:
        require_mlflow()
        configure_client_env()
        if flush_every < 1:
            raise ValueError(f"flush_every must be >= 1, but got {flush_every=}.")
        self.link = link
        self.run_name = run_name or (f"trial-{trial_id}" if trial_id else "trial")
        self.flush_every = int(flush_every)
        self.fallback_dir = Path(fallback_dir) if fallback_dir is not None else Path.cwd()
        self.unsent_file: Path | None = None
        self._files = _Artifacts()
        self._outbox = RunOutbox(
            link.tracking_uri,
            link.experiment_id,
            label=f"trial run '{self.run_name}'",
            retry_interval_s=link.retry_interval_s,
        )
        all_tags = {TAG_ROLE: "trial", **link.tags(), **{k: str(v) for k, v in (tags or {}).items()}}
        reuse = None
        if trial_id is not None:
            all_tags[TAG_TRIAL_ID] = str(trial_id)
            reuse = f"tags.{TAG_TRIAL_ID} = '{trial_id}' and tags.`{TAG_PARENT}` = '{link.parent_run_id}'"
        self._outbox.put(
            Op("create", {"run_name": self.run_name, "tags": all_tags, "start_time": _now_ms(), "reuse_filter": reuse})
        )
        self._metrics: list[tuple[str, float, int, int]] = []
        self._epochs_since_flush = 0
        self._ended = False
        if params:
            self.log_params(params)

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Buffer one epoch's metrics (``step`` = the epoch); sent every ``flush_every`` calls."""
        ts = _now_ms()
        for key, value in metrics.items():
            if value is None or isinstance(value, (str, bytes)):
                continue
            try:
                self._metrics.append((str(key), float(value), ts, int(step)))
            except (TypeError, ValueError):
                continue
        self._epochs_since_flush += 1
        if self._epochs_since_flush >= self.flush_every:
            self.flush()

    def flush(self) -> bool:
        """Send the buffered metrics now. True when nothing waits for MLflow."""
        ops = chunk_batch(self._metrics)
        self._metrics = []
        self._epochs_since_flush = 0
        return self._outbox.put(ops)

    def log_velocity_plots(
        self,
        history: VelocityHistory,
        *,
        stop_epoch: int | None = None,
        stop_reason: str | None = None,
        stop_threshold: float | None = None,
    ) -> None:
        """Upload the velocity curve (LR-decay and stop markers) and the per-layer velocity heatmap.

        A plot that cannot be drawn is reported with a warning and skipped: it never fails the trial.
        """
        title = f"{self.run_name}" + (f" ({self.link.arm})" if self.link.arm else "")
        try:
            with PLOT_LOCK:  # matplotlib is not thread-safe (trials may run in threads)
                curve = plot_velocity_curve(
                    history, stop_epoch=stop_epoch, stop_reason=stop_reason, stop_threshold=stop_threshold, title=title
                )
                self.log_figure(curve, VELOCITY_CURVE_ARTIFACT)
                self.log_figure(plot_layer_heatmap(history, title=title), LAYER_HEATMAP_ARTIFACT)
        except Exception as err:
            warnings.warn(
                f"Could not draw the velocity plots of {self.run_name}: {err!r}", RuntimeWarning, stacklevel=2
            )

    def end(
        self,
        status: str = "FINISHED",
        *,
        stop_reason: str | None = None,
        stop_epoch: int | None = None,
        error: str | None = None,
    ) -> Path | None:
        """End the run with ``status`` (FINISHED/FAILED/KILLED), tagging the stop reason and epoch.

        Idempotent. Returns the file of unsent records when MLflow stayed unreachable, else ``None``.
        """
        if self._ended:
            return self.unsent_file
        _check_status(status)
        self._ended = True
        try:
            ops = chunk_batch(self._metrics)
            self._metrics = []
            tags: dict[str, str] = {}
            if stop_reason is not None:
                tags[TAG_STOP_REASON] = str(stop_reason)
            if stop_epoch is not None:
                tags[TAG_STOP_EPOCH] = str(int(stop_epoch))
            if error is not None:
                tags[TAG_ERROR] = error[:5000]
            ops += chunk_batch(tags=tags)
            ops.append(Op("terminate", {"status": status, "end_time": _now_ms()}))
            self._outbox.put(ops, send=False)
            if not self._outbox.send(force=True):
                safe_name = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.run_name)
                self.unsent_file = self._outbox.dump(self.fallback_dir / f"mlflow-unsent-{safe_name}.jsonl")
                warnings.warn(
                    f"MLflow stayed unreachable: {self._outbox.pending} record batch(es) of {self.run_name} were "
                    f"saved to {self.unsent_file}. Send them later with "
                    f"`neve_tune.mlflow.replay_unsent({str(self.unsent_file)!r})`.",
                    MlflowUnavailableWarning,
                    stacklevel=2,
                )
        finally:
            self._files.cleanup()
        return self.unsent_file

    def detach(self) -> Path | None:
        """Send what is buffered but leave the run open, for whoever ends it (e.g. the study driver).

        Used when the backend stops the trial from outside (Ray Tune's scheduler). What cannot be sent is
        saved like in :meth:`end`. Returns that file, if any.
        """
        if self._ended:
            return self.unsent_file
        self._ended = True
        try:
            self._outbox.put(chunk_batch(self._metrics), send=False)
            self._metrics = []
            # Not forced: while MLflow is known to be down, save to the file at once (the process may be
            # torn down within seconds of a stop).
            if not self._outbox.send():
                safe_name = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.run_name)
                self.unsent_file = self._outbox.dump(self.fallback_dir / f"mlflow-unsent-{safe_name}.jsonl")
        finally:
            self._files.cleanup()
        return self.unsent_file

    def __enter__(self) -> TrialLogger:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc_type is None:
            self.end("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt) or (
            issubclass(exc_type, SystemExit) and getattr(exc, "code", None) not in (None, 0)
        ):
            self.end("KILLED", error=repr(exc))
        elif issubclass(exc_type, SystemExit):
            self.end("FINISHED")  # e.g. Ray Tune stopping a function trainable
        else:
            self.end("FAILED", error=f"{type(exc).__name__}: {exc}")


class ArmRun(_RunWriter):
    """The parent run of one study arm (driver side). Trials open children with :attr:`link`.

    NaN policy: metric values are logged as given; ``None`` values are skipped. State: none beyond MLflow;
    writes go through an outbox that survives outages (see :class:`StudyTracker`).
    """

    def __init__(self, tracker: StudyTracker, name: str, run_id: str) -> None:
        self.name = name
        self._tracker = tracker
        self._files = tracker._files
        self._outbox = RunOutbox(
            tracker.tracking_uri,
            tracker.experiment_id,
            run_id=run_id,
            label=f"arm run '{name}'",
            retry_interval_s=tracker.retry_interval_s,
        )
        self.link = MlflowLink(
            tracking_uri=tracker.tracking_uri,
            experiment_id=tracker.experiment_id,
            parent_run_id=run_id,
            arm=name,
            study=tracker.study,
            retry_interval_s=tracker.retry_interval_s,
        )
        self.ended: str | None = None

    def log_metrics(self, metrics: Mapping[str, Any], step: int = 0) -> None:
        ts = _now_ms()
        rows = [(k, float(v), ts, step) for k, v in metrics.items() if v is not None]
        self._outbox.put(chunk_batch(rows))

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
        ``status``. Runs that the trial ended itself are left as they are. Queued like any other write, so
        it survives an outage (and is saved for :func:`replay_unsent`).
        """
        _check_status(status)
        data = {
            "action": "finalize",
            "trial_id": trial_id,
            "status": status,
            "stop_reason": stop_reason,
            "stop_epoch": stop_epoch,
            "stop_threshold": stop_threshold,
            "error": error,
        }
        self._outbox.put(Op("children", data))

    def tag_trial(self, trial_id: str, tags: Mapping[str, Any]) -> None:
        """Set tags on the child run of ``trial_id`` (e.g. ``picked=true``), whatever its status."""
        self._outbox.put(
            Op("children", {"action": "tag", "trial_id": trial_id, "tags": {k: str(v) for k, v in tags.items()}})
        )

    def close_open_trials(self, status: str = "KILLED") -> None:
        """End every child run of this arm still RUNNING with ``status`` (after an interrupted study)."""
        _check_status(status)
        self._outbox.put(Op("children", {"action": "close", "status": status}))

    def end(self, status: str = "FINISHED") -> None:
        """End the arm run (idempotent)."""
        if self.ended is None:
            self.ended = _check_status(status)
            self._outbox.put(Op("terminate", {"status": status, "end_time": _now_ms()}))


def run_children_op(client: MlflowClient, experiment_id: str, parent_run_id: str, data: Mapping[str, Any]) -> None:
    """Execute an arm run's ``children`` operation (see :meth:`ArmRun.finalize_trial` and friends)."""
    action = data["action"]
    if action == "close":
        runs = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{TAG_PARENT}` = '{parent_run_id}' and attributes.status = 'RUNNING'",
            max_results=10_000,
        )
        for run in runs:
            client.set_terminated(run.info.run_id, data["status"])
        return
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.{TAG_TRIAL_ID} = '{data['trial_id']}' and tags.`{TAG_PARENT}` = '{parent_run_id}'",
        max_results=1,
    )
    if not runs:
        return
    run = runs[0]
    child = run.info.run_id
    if action == "tag":
        for key, value in data["tags"].items():
            client.set_tag(child, key, value)
        return
    if action != "finalize":
        raise ValueError(f"unknown children action {action!r}")
    if run.info.status != "RUNNING":
        return
    tags = {}
    if data.get("stop_reason") is not None and TAG_STOP_REASON not in run.data.tags:
        tags[TAG_STOP_REASON] = str(data["stop_reason"])
    if data.get("stop_epoch") is not None and TAG_STOP_EPOCH not in run.data.tags:
        tags[TAG_STOP_EPOCH] = str(int(data["stop_epoch"]))
    if data.get("error") is not None:
        tags[TAG_ERROR] = str(data["error"])[:5000]
    for key, value in tags.items():
        client.set_tag(child, key, value)
    uploaded = {a.path for a in client.list_artifacts(child, "plots")}
    if VELOCITY_CURVE_ARTIFACT not in uploaded:
        _plots_from_history(
            client, child, run, data.get("stop_reason"), data.get("stop_epoch"), data.get("stop_threshold")
        )
    client.set_terminated(child, data["status"])


def _plots_from_history(
    client: MlflowClient,
    run_id: str,
    run: Any,
    stop_reason: str | None,
    stop_epoch: int | None,
    stop_threshold: float | None,
) -> None:
    wanted = [k for k in run.data.metrics if k.startswith(LAYER_PREFIX)]
    wanted += [k for k in (*VELOCITY_KEYS, "lr", "neve/lr_decayed") if k in run.data.metrics]
    if not wanted:
        return
    history = VelocityHistory.from_metrics(
        {k: [(m.step, m.value) for m in client.get_metric_history(run_id, k)] for k in wanted}
    )
    title = run.data.tags.get("mlflow.runName", run_id)
    if TAG_ARM in run.data.tags:
        title += f" ({run.data.tags[TAG_ARM]})"
    with tempfile.TemporaryDirectory(prefix="neve_mlflow_") as tmp, PLOT_LOCK:
        curve = plot_velocity_curve(
            history, stop_epoch=stop_epoch, stop_reason=stop_reason, stop_threshold=stop_threshold, title=title
        )
        heatmap = plot_layer_heatmap(history, title=title)
        for fig, artifact in ((curve, VELOCITY_CURVE_ARTIFACT), (heatmap, LAYER_HEATMAP_ARTIFACT)):
            path = Path(tmp) / Path(artifact).name
            fig.savefig(path)
            client.log_artifact(run_id, str(path), os.path.dirname(artifact))


def _artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """For a SQLite store, keep artifacts next to the database (``<db folder>/mlruns/<experiment>``).

    MLflow's own default is ``./mlruns`` of whatever the working directory is, which scatters artifacts
    when the database lives elsewhere. Servers and other stores decide for themselves (``None``).
    """
    if not tracking_uri.startswith("sqlite:///") or tracking_uri.endswith(":memory:"):
        return None
    folder = Path(tracking_uri[len("sqlite:///") :]).parent / "mlruns"
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in experiment)
    return (folder / safe).as_uri()


class StudyTracker(_RunWriter):
    """The study run and its arm runs, created up front by the driver (before any training).

    Creating them is the pre-flight check: if MLflow cannot be written, :class:`TrackingUnavailableError`
    is raised and nothing has been trained yet. After that, every write goes through an outbox, so the
    tracking server going away later never stops the study (see :class:`TrialLogger`).

    Status: :meth:`end` ends the study run and every arm run not ended yet, FINISHED/FAILED/KILLED.

    NaN policy: metric values are logged as given (NaN/inf included); ``None`` values are skipped.

    State: nothing to save or restore; the runs live in MLflow. A new tracker always opens a new study run
    (in an existing experiment, when the name exists).

    Args:
        tracking_uri: the store (``None``: ``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db``).
        experiment: the experiment name (created when missing).
        study: the study name (tagged ``study``).
        arms: the arm names; one parent run each.
        params: study-level params (budget, seed, ...).
        arm_params: per-arm params (e.g. the scheduler settings).
        run_name: the study run's name (default ``<study>-<YYYYmmdd-HHMMSS>``).
        retry_interval_s: how often a buffered writer retries an unreachable server.
    """

    def __init__(
        self,
        tracking_uri: str | None,
        experiment: str,
        *,
        study: str,
        arms: Sequence[str],
        params: Mapping[str, Any] | None = None,
        arm_params: Mapping[str, Mapping[str, Any]] | None = None,
        run_name: str | None = None,
        retry_interval_s: float = 10.0,
        fallback_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        require_mlflow()
        configure_client_env()
        from mlflow import MlflowClient
        from mlflow.entities import Param, RunTag

        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self.study = study
        self.retry_interval_s = float(retry_interval_s)
        self.fallback_dir = Path(fallback_dir) if fallback_dir is not None else Path.cwd()
        self._files = _Artifacts()
        client = MlflowClient(tracking_uri=self.tracking_uri)
        try:
            exp = client.get_experiment_by_name(experiment)
            if exp is None:
                self.experiment_id = client.create_experiment(
                    experiment, artifact_location=_artifact_location(self.tracking_uri, experiment)
                )
            elif exp.lifecycle_stage != "active":
                raise TrackingUnavailableError(
                    f"The MLflow experiment {experiment!r} was deleted. Restore it (`mlflow experiments restore "
                    f"--experiment-id {exp.experiment_id}`) or pass another experiment name."
                )
            else:
                self.experiment_id = exp.experiment_id
            name = run_name or f"{study}-{time.strftime('%Y%m%d-%H%M%S')}"
            run = client.create_run(self.experiment_id, tags={TAG_ROLE: "study", TAG_STUDY: study}, run_name=name)
            self.run_name = name
            study_id = run.info.run_id
            flat = flatten_params(params or {})
            if flat:
                client.log_batch(study_id, params=[Param(k, v) for k, v in flat.items()])
            self._arms: dict[str, ArmRun] = {}
            for arm in arms:
                arm_tags = {TAG_ROLE: "arm", TAG_ARM: arm, TAG_STUDY: study, TAG_PARENT: study_id}
                arm_run = client.create_run(self.experiment_id, tags=arm_tags, run_name=arm)
                flat = flatten_params((arm_params or {}).get(arm, {}))
                if flat:
                    client.log_batch(arm_run.info.run_id, params=[Param(k, v) for k, v in flat.items()])
                self._arms[arm] = ArmRun(self, arm, arm_run.info.run_id)
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
        )
        self.ended: str | None = None

    @property
    def study_run_id(self) -> str:
        return self._outbox.run_id  # type: ignore[return-value]

    @property
    def arms(self) -> dict[str, ArmRun]:
        return dict(self._arms)

    def arm(self, name: str) -> ArmRun:
        """The parent run of arm ``name``."""
        try:
            return self._arms[name]
        except KeyError:
            raise KeyError(f"No arm {name!r} in this study; arms: {sorted(self._arms)}.") from None

    def log_metrics(self, metrics: Mapping[str, Any], step: int = 0) -> None:
        ts = _now_ms()
        self._outbox.put(chunk_batch([(k, float(v), ts, step) for k, v in metrics.items() if v is not None]))

    def end(self, status: str = "FINISHED") -> list[Path]:
        """End the arm runs still open and the study run with ``status``; flush everything.

        Returns the files where records were saved because MLflow stayed unreachable (usually none).
        """
        _check_status(status)
        saved: list[Path] = []
        try:
            for arm in self._arms.values():
                arm.end(status)
            if self.ended is None:
                self.ended = status
                self._outbox.put(Op("terminate", {"status": status, "end_time": _now_ms()}), send=False)
            for writer, label in [*((a._outbox, f"arm-{n}") for n, a in self._arms.items()), (self._outbox, "study")]:
                if not writer.send(force=True):
                    path = writer.dump(self.fallback_dir / f"mlflow-unsent-{self.run_name}-{label}.jsonl")
                    if path is not None:
                        saved.append(path)
            if saved:
                warnings.warn(
                    f"MLflow stayed unreachable; study records were saved to {', '.join(map(str, saved))}. "
                    "Send them later with `neve_tune.mlflow.replay_unsent(path)`.",
                    MlflowUnavailableWarning,
                    stacklevel=2,
                )
        finally:
            self._files.cleanup()
        return saved
