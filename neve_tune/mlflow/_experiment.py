"""MLflow experiments: get or create one (tagged as model training), and names safe for files and folders."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ._uri import TrackingUnavailableError

if TYPE_CHECKING:
    from mlflow import MlflowClient

#: The experiment tag that says what an experiment holds (MLflow 3's experiment kinds).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
#: Its value for model training (runs with metrics), which is what neve_tune logs.
MODEL_TRAINING_KIND = "custom_model_development"
#: MLflow 3.17's UI does not choose its view from that tag: it opens an experiment in its GenAI view (an
#: empty "0 traces" overview) unless the URL says ``workflowType=machine_learning`` or the user picked "Model
#: training" in its switch (kept in the browser's storage); checked in headless Chromium. :func:`experiment_ui_url`
#: builds such a link.
UI_WORKFLOW_PARAM = "workflowType=machine_learning"


def experiment_ui_url(ui_url: str, experiment_id: str) -> str:
    """The MLflow UI page that shows the runs of ``experiment_id``, e.g.
    ``http://127.0.0.1:5000/#/experiments/1?workflowType=machine_learning``.

    Args:
        ui_url: where the UI is served: an ``http(s)://`` tracking server, or ``mlflow ui``'s address.
    """
    return f"{ui_url.rstrip('/')}/#/experiments/{experiment_id}?{UI_WORKFLOW_PARAM}"


def safe_name(text: str) -> str:
    """``text`` with every character but letters, digits, ``-``, ``_`` and ``.`` replaced by ``_`` (a file name)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """For a SQLite store, keep artifacts next to the database (``<db folder>/mlruns/<experiment>``).

    MLflow's own default is ``./mlruns`` of whatever the working directory is, which scatters artifacts
    when the database lives elsewhere. Servers and other stores decide for themselves (``None``).
    """
    if not tracking_uri.startswith("sqlite:///") or tracking_uri.endswith(":memory:"):
        return None
    folder = Path(tracking_uri[len("sqlite:///") :]).parent / "mlruns"
    return (folder / safe_name(experiment)).as_uri()


def get_or_create_experiment(client: MlflowClient, name: str, *, artifact_location: str | None = None) -> str:
    """The id of the experiment ``name``, created when missing (tagged ``mlflow.experimentKind`` =
    ``custom_model_development``, so MLflow's UI opens it on its runs).

    Safe against another process creating it at the same time (e.g. parallel Optuna workers). An existing
    experiment is used as it is (its tags are not changed).

    Raises:
        TrackingUnavailableError: the experiment exists but was deleted (the message says how to restore it).
        Exception: whatever MLflow raises when the store cannot be reached.
    """
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(
                name, artifact_location=artifact_location, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND}
            )
        except MlflowException:  # another worker created it between our two calls
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage != "active":
        raise TrackingUnavailableError(
            f"The MLflow experiment {name!r} was deleted. Restore it (`mlflow experiments restore "
            f"--experiment-id {experiment.experiment_id}`) or pass another experiment name."
        )
    return experiment.experiment_id
