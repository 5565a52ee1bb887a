"""NeVe in MLflow: what any training loop needs to log a trial, outage-tolerant.

* :class:`MlflowLink`: tracking URI + experiment + parent run id, passed to each trial in its config;
* :class:`TrialLogger` (any process, e.g. a Ray worker): the trial's child run: params, per-epoch metrics
  with ``step=epoch`` in batches within MLflow's request limits, stop tags, velocity plots; always ends
  FINISHED, FAILED or KILLED;
* :class:`VelocityHistory`, :func:`plot_velocity_curve`, :func:`plot_layer_heatmap`: the per-trial figures;
* :func:`get_or_create_experiment`: experiments tagged as model training; :func:`experiment_ui_url`: the UI
  link that opens on the runs (MLflow 3.17 ignores the tag and opens its GenAI view otherwise);
* :func:`check_tracking_uri`: fail before training when the store cannot be used
  (:class:`TrackingUnavailableError`);
* :func:`replay_unsent`: if the tracking server goes away, nothing raises (a
  :class:`MlflowUnavailableWarning` says so once per outage): records are buffered, re-sent when it is back,
  and saved to a file if it never comes back; ``replay_unsent`` (or ``neve-tune mlflow replay FOLDER``)
  sends them later.

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

from ._experiment import experiment_ui_url, get_or_create_experiment
from ._logger import MlflowLink, TrialLogger
from ._outbox import MlflowUnavailableWarning
from ._plots import VelocityHistory, plot_layer_heatmap, plot_velocity_curve
from ._replay import ReplayReport, replay_unsent
from ._uri import TrackingUnavailableError, check_tracking_uri

__all__ = [
    "MlflowLink",
    "MlflowUnavailableWarning",
    "ReplayReport",
    "TrackingUnavailableError",
    "TrialLogger",
    "VelocityHistory",
    "check_tracking_uri",
    "experiment_ui_url",
    "get_or_create_experiment",
    "plot_layer_heatmap",
    "plot_velocity_curve",
    "replay_unsent",
]
