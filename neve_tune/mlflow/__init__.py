"""NeVe in MLflow: a thin, outage-tolerant run tree for studies and trials.

* :class:`StudyTracker` (driver): the study run and one parent run per arm, created before training;
* :class:`MlflowLink`: tracking URI + experiment + parent run id, passed to each trial in its config;
* :class:`TrialLogger` (any process, e.g. a Ray worker): the trial's child run: params, per-epoch metrics
  with ``step=epoch`` in batches of at most 1,000, stop tags, velocity plots; always ends
  FINISHED/FAILED/KILLED;
* :func:`check_tracking_uri`: fail before training when the store cannot be used;
* :func:`plot_velocity_curve`, :func:`plot_layer_heatmap`: the per-trial figures.

If the tracking server goes away, nothing raises: records are buffered, re-sent when it is back, and
saved to a file (:func:`replay_unsent`) if it never comes back.

Importing this module does not need mlflow; creating a tracker or logger does, and says how to install it
("mlflow was not found - please install with `pip install neve_tune[mlflow]`").

Example:
    >>> from neve_tune.mlflow import StudyTracker, TrialLogger
    >>> tracker = StudyTracker("sqlite:///mlflow.db", "my-study", study="digits", arms=["neve"])  # doctest: +SKIP
    >>> with TrialLogger(tracker.arm("neve").link, run_name="t0", params={"lr": 0.1}) as log:  # doctest: +SKIP
    ...     log.log_metrics({"train/loss": 0.5}, step=1)
    >>> tracker.end()  # doctest: +SKIP
"""

from __future__ import annotations

from ._deps import require_mlflow
from ._outbox import MlflowUnavailableWarning, RunOutbox, replay_unsent
from ._plots import LAYER_PREFIX, VELOCITY_KEYS, VelocityHistory, plot_layer_heatmap, plot_velocity_curve
from ._tracker import (
    LAYER_HEATMAP_ARTIFACT,
    TAG_ARM,
    TAG_ERROR,
    TAG_PARENT,
    TAG_ROLE,
    TAG_STOP_EPOCH,
    TAG_STOP_REASON,
    TAG_STUDY,
    TAG_TRIAL_ID,
    VELOCITY_CURVE_ARTIFACT,
    ArmRun,
    MlflowLink,
    StudyTracker,
    TrialLogger,
    flatten_params,
)
from ._uri import (
    DEFAULT_TRACKING_URI,
    TrackingUnavailableError,
    check_tracking_uri,
    configure_client_env,
    resolve_tracking_uri,
)

__all__ = [
    "DEFAULT_TRACKING_URI",
    "LAYER_HEATMAP_ARTIFACT",
    "LAYER_PREFIX",
    "TAG_ARM",
    "TAG_ERROR",
    "TAG_PARENT",
    "TAG_ROLE",
    "TAG_STOP_EPOCH",
    "TAG_STOP_REASON",
    "TAG_STUDY",
    "TAG_TRIAL_ID",
    "VELOCITY_CURVE_ARTIFACT",
    "VELOCITY_KEYS",
    "ArmRun",
    "MlflowLink",
    "MlflowUnavailableWarning",
    "RunOutbox",
    "StudyTracker",
    "TrackingUnavailableError",
    "TrialLogger",
    "VelocityHistory",
    "check_tracking_uri",
    "configure_client_env",
    "flatten_params",
    "plot_layer_heatmap",
    "plot_velocity_curve",
    "replay_unsent",
    "require_mlflow",
    "resolve_tracking_uri",
]
