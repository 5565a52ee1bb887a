"""A trial's MLflow run, from any process: the link to its parent run, and the logger that writes it.

The driver (e.g. :class:`neve_tune.studies.StudyTracker`) creates a parent run. Each trial, in whatever
Ray worker process it runs, opens its own child run (:class:`TrialLogger`) from a :class:`MlflowLink`
passed in its config: the tracking URI, the experiment and the parent run id. The link is explicit (the
``mlflow.parentRunId`` tag), so it does not depend on MLflow's per-process active run stack.

How a trial's run ends, one convention for every writer in neve_tune (:class:`TrialLogger`, the study
tree's safety net and :class:`neve_tune.optuna.NeVeMLflowCallback`):

* ``FINISHED``: the trial came to an end that it or its tuner decided. That includes a trial that NeVe
  stopped (converged, diverged, ...), that reached the epoch cap, and one pruned or stopped from outside
  (ASHA, an Optuna pruner): its numbers are valid up to its last epoch. Why and when it stopped are the
  tags ``neve/stop_reason`` (a :class:`neve_tune.StopReason` value, e.g. ``pruned``) and
  ``neve/stop_epoch`` (:func:`stop_tags`);
* ``FAILED``: the trial raised; the tag ``error`` holds the exception;
* ``KILLED``: it was interrupted (Ctrl-C, an aborted study) before it could end.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from neve_tune import keys

from ._deps import require_mlflow
from ._experiment import safe_name
from ._outbox import MlflowUnavailableWarning, Op, RunOutbox, chunk_batch, millis
from ._plots import PLOT_LOCK, VelocityHistory, plot_layer_heatmap, plot_velocity_curve
from ._replay import replay_command
from ._uri import configure_client_env

if TYPE_CHECKING:
    from matplotlib.figure import Figure

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

#: The statuses a run ends with (see the module docstring for which one when).
STATUSES = ("FINISHED", "FAILED", "KILLED")


def check_status(status: str) -> str:
    """``status`` when it is one of :data:`STATUSES`, else a ``ValueError``."""
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, but got {status=}.")
    return status


def stop_tags(stop_reason: object | None = None, stop_epoch: int | None = None) -> dict[str, str]:
    """The tags of a stopped trial: ``neve/stop_reason`` (e.g. ``StopReason.PRUNED``, written as its value)
    and ``neve/stop_epoch``; ``None`` values are left out."""
    tags: dict[str, str] = {}
    if stop_reason is not None:
        tags[TAG_STOP_REASON] = str(stop_reason)
    if stop_epoch is not None:
        tags[TAG_STOP_EPOCH] = str(int(stop_epoch))
    return tags


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
        """A plain dict (for a trial config)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MlflowLink:
        """The link :meth:`to_dict` wrote (unknown keys ignored)."""
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> MlflowLink | None:
        """The link in a trial config, or ``None`` when the trial is not tracked."""
        data = config.get(cls.CONFIG_KEY)
        return None if data is None else cls.from_dict(data)

    def tags(self) -> dict[str, str]:
        """The tags of a child run: its parent, and the arm and study when known."""
        out = {TAG_PARENT: self.parent_run_id}
        if self.arm is not None:
            out[TAG_ARM] = self.arm
        if self.study is not None:
            out[TAG_STUDY] = self.study
        return out


class ArtifactFiles:
    """A private temp folder where figures and texts are written before upload (kept until :meth:`cleanup`)."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="neve_mlflow_"))
        self._count = 0

    def _path(self, artifact_file: str) -> Path:
        self._count += 1
        folder = self.dir / f"{self._count:05d}"
        folder.mkdir(parents=True)
        return folder / Path(artifact_file).name

    def figure(self, fig: Figure, artifact_file: str) -> Op:
        """Save ``fig`` as PNG; the ``artifact`` op that uploads it."""
        path = self._path(artifact_file)
        with PLOT_LOCK:
            fig.savefig(path)
        return Op("artifact", {"local_path": str(path), "artifact_path": os.path.dirname(artifact_file) or None})

    def text(self, text: str, artifact_file: str) -> Op:
        """Save ``text``; the ``artifact`` op that uploads it."""
        path = self._path(artifact_file)
        path.write_text(text)
        return Op("artifact", {"local_path": str(path), "artifact_path": os.path.dirname(artifact_file) or None})

    def cleanup(self) -> None:
        """Delete the folder (a saved outbox has copied what it still needs)."""
        shutil.rmtree(self.dir, ignore_errors=True)


class RunWriter:
    """Logging methods over a :class:`RunOutbox` (subclasses set ``_outbox`` and ``_files``)."""

    _outbox: RunOutbox
    _files: ArtifactFiles

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
        """Set tags (values turned into strings)."""
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


class TrialLogger(RunWriter):
    """The child MLflow run of one trial, opened from a :class:`MlflowLink` in any process.

    Metrics are buffered and sent with ``MlflowClient.log_batch`` (at most 1,000 per request,
    ``step=epoch``) every ``flush_every`` epochs and when the run ends. Use it as a context manager,
    or call :meth:`end` in a ``finally``: the run always ends ``FINISHED``, ``FAILED`` (an exception) or
    ``KILLED`` (``KeyboardInterrupt``, or a non-zero ``SystemExit``); see the module docstring.

    NaN policy: NaN and infinite metric values are logged as they are (a diverged trial shows them);
    ``None`` values are skipped.

    Outages: if MLflow cannot be reached, training goes on. Records are kept and re-sent when it comes
    back. From the first failed send on, what waits is also kept on disk, in
    ``fallback_dir/mlflow-unsent-<run name>-<creation time, ns>.jsonl`` (rewritten atomically after each
    send that leaves something, deleted once everything was sent), so a process killed mid-outage loses
    nothing. What is still unsent when the run ends stays in that file (see
    :func:`neve_tune.mlflow.replay_unsent`), named in a :class:`MlflowUnavailableWarning`.

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
        self._files = ArtifactFiles()
        self._outbox = RunOutbox(
            link.tracking_uri,
            link.experiment_id,
            label=f"trial run '{self.run_name}'",
            retry_interval_s=link.retry_interval_s,
            # Unique, and in time order for the replay: a restarted trial's attempts each keep their own.
            spool=self.fallback_dir / f"mlflow-unsent-{safe_name(self.run_name)}-{time.time_ns()}.jsonl",
        )
        all_tags = {TAG_ROLE: "trial", **link.tags(), **{k: str(v) for k, v in (tags or {}).items()}}
        reuse = None
        if trial_id is not None:
            all_tags[TAG_TRIAL_ID] = str(trial_id)
            reuse = f"tags.{TAG_TRIAL_ID} = '{trial_id}' and tags.`{TAG_PARENT}` = '{link.parent_run_id}'"
        self._outbox.put(
            Op("create", {"run_name": self.run_name, "tags": all_tags, "start_time": millis(), "reuse_filter": reuse})
        )
        self._metrics: list[tuple[str, float, int, int]] = []
        self._epochs_since_flush = 0
        self._ended = False
        if params:
            self.log_params(params)

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Buffer one epoch's metrics (``step`` = the epoch); sent every ``flush_every`` calls."""
        ts = millis()
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
        check_status(status)
        self._ended = True
        try:
            ops = chunk_batch(self._metrics)
            self._metrics = []
            tags = stop_tags(stop_reason, stop_epoch)
            if error is not None:
                tags[TAG_ERROR] = error[:5000]
            ops += chunk_batch(tags=tags)
            ops.append(Op("terminate", {"status": status, "end_time": millis()}))
            self._outbox.put(ops, send=False)
            if not self._outbox.send(force=True):  # one last try, then the spool file is what is left
                self.unsent_file = self._outbox.save()
                warnings.warn(
                    f"MLflow stayed unreachable: {self._outbox.pending} record batch(es) of {self.run_name} were "
                    f"saved to {self.unsent_file}. Send them later with `{replay_command(self.fallback_dir)}`.",
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
            # The worker may be torn down any moment after a stop (Ray does not wait for this thread): the
            # file first, then one try unless MLflow is known to be down (the file goes once all is sent).
            self.unsent_file = self._outbox.save()
            if self.unsent_file is not None and not self._outbox.down and self._outbox.send():
                self.unsent_file = None
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
