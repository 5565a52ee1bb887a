"""NeVe in MLflow: what any training loop needs to log a trial, outage-tolerant.

* :class:`MlflowLink`: tracking URI + experiment + parent run id, passed to each trial in its config;
* :class:`TrialLogger` (any process, e.g. a Ray worker): the trial's child run: params, per-epoch metrics
  with ``step=epoch`` in batches within MLflow's limits (:func:`chunk_batch`), stop tags, velocity plots;
  always ends FINISHED/FAILED/KILLED, by one convention (:mod:`neve_tune.mlflow._logger`, :func:`stop_tags`);
* :func:`get_or_create_experiment`: experiments tagged as model training; :func:`experiment_ui_url`: the UI
  link that opens on the runs (MLflow 3.17 ignores the tag and opens its GenAI view otherwise);
* :func:`check_tracking_uri`: fail before training when the store cannot be used;
* :class:`RunOutbox`, :func:`replay_unsent`, :func:`replay_folder`: if the tracking server goes away,
  nothing raises: records are buffered, re-sent when it is back, and saved to a file if it never comes
  back (``neve-tune mlflow replay FOLDER`` sends them later). Operation kinds are registered
  (:func:`register_op`);
* :func:`plot_velocity_curve`, :func:`plot_layer_heatmap`: the per-trial figures.

The study tree (a study run, one parent run per arm) is :class:`neve_tune.studies.StudyTracker`.

Importing this module does not need mlflow; creating a logger does, and says how to install it
("mlflow was not found - please install with `pip install neve_tune[mlflow]`").

Example:
    >>> from neve_tune.mlflow import MlflowLink, TrialLogger
    >>> link = MlflowLink("sqlite:///mlflow.db", experiment_id="1", parent_run_id="...")  # doctest: +SKIP
    >>> with TrialLogger(link, run_name="t0", params={"lr": 0.1}) as log:  # doctest: +SKIP
    ...     log.log_metrics({"train/loss": 0.5}, step=1)
"""

from __future__ import annotations

from ._deps import require_mlflow
from ._experiment import (
    EXPERIMENT_KIND_TAG,
    MODEL_TRAINING_KIND,
    artifact_location,
    experiment_ui_url,
    get_or_create_experiment,
    safe_name,
)
from ._logger import (
    LAYER_HEATMAP_ARTIFACT,
    STATUSES,
    TAG_ARM,
    TAG_ERROR,
    TAG_PARENT,
    TAG_ROLE,
    TAG_STOP_EPOCH,
    TAG_STOP_REASON,
    TAG_STUDY,
    TAG_TRIAL_ID,
    VELOCITY_CURVE_ARTIFACT,
    ArtifactFiles,
    MlflowLink,
    RunWriter,
    TrialLogger,
    check_status,
    flatten_params,
    stop_tags,
)
from ._outbox import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MlflowUnavailableWarning,
    Op,
    OpHandler,
    RunOutbox,
    chunk_batch,
    is_permanent,
    millis,
    op_handler,
    register_op,
)
from ._plots import (
    LAYER_PREFIX,
    PLOT_LOCK,
    VELOCITY_KEYS,
    VelocityHistory,
    plot_layer_heatmap,
    plot_velocity_curve,
)
from ._replay import (
    ReplayReport,
    UnsentFile,
    describe_unsent,
    replay_command,
    replay_files,
    replay_folder,
    replay_unsent,
    unsent_files,
)
from ._uri import (
    DEFAULT_TRACKING_URI,
    TrackingUnavailableError,
    check_tracking_uri,
    configure_client_env,
    fail_fast_http,
    resolve_tracking_uri,
)

__all__ = [
    "DEFAULT_TRACKING_URI",
    "EXPERIMENT_KIND_TAG",
    "LAYER_HEATMAP_ARTIFACT",
    "LAYER_PREFIX",
    "MAX_METRICS_PER_BATCH",
    "MAX_PARAMS_TAGS_PER_BATCH",
    "MAX_PARAM_LENGTH",
    "MODEL_TRAINING_KIND",
    "PLOT_LOCK",
    "STATUSES",
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
    "ArtifactFiles",
    "MlflowLink",
    "MlflowUnavailableWarning",
    "Op",
    "OpHandler",
    "ReplayReport",
    "RunOutbox",
    "RunWriter",
    "TrackingUnavailableError",
    "TrialLogger",
    "UnsentFile",
    "VelocityHistory",
    "artifact_location",
    "check_status",
    "check_tracking_uri",
    "chunk_batch",
    "configure_client_env",
    "describe_unsent",
    "experiment_ui_url",
    "fail_fast_http",
    "flatten_params",
    "get_or_create_experiment",
    "is_permanent",
    "millis",
    "op_handler",
    "plot_layer_heatmap",
    "plot_velocity_curve",
    "register_op",
    "replay_command",
    "replay_files",
    "replay_folder",
    "replay_unsent",
    "require_mlflow",
    "resolve_tracking_uri",
    "safe_name",
    "stop_tags",
    "unsent_files",
]
