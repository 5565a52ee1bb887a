"""The ``children`` operation of an arm run: acting on its trial runs (end, tag, close what is left open).

Queued in the arm run's outbox like any other write (:meth:`~neve_tune.studies.ArmRun.finalize_trial` and
friends) and registered here for replay, so it survives an outage.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from neve_tune.mlflow import VelocityHistory, plot_layer_heatmap, plot_velocity_curve
from neve_tune.mlflow._logger import (
    LAYER_HEATMAP_ARTIFACT,
    TAG_ARM,
    TAG_ERROR,
    TAG_PARENT,
    TAG_STOP_EPOCH,
    TAG_STOP_REASON,
    TAG_TRIAL_ID,
    VELOCITY_CURVE_ARTIFACT,
)
from neve_tune.mlflow._outbox import RunOutbox, register_op
from neve_tune.mlflow._plots import LAYER_PREFIX, PLOT_LOCK, VELOCITY_KEYS

if TYPE_CHECKING:
    from mlflow import MlflowClient


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
    if action == "tag":
        for key, value in data["tags"].items():
            client.set_tag(run.info.run_id, key, value)
    elif action == "finalize":
        _finalize(client, run, data)
    else:
        raise ValueError(f"unknown children action {action!r}")


def _finalize(client: MlflowClient, run: Any, data: Mapping[str, Any]) -> None:
    if run.info.status != "RUNNING":
        return
    child = run.info.run_id
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
        _plots_from_history(client, run, data.get("stop_reason"), data.get("stop_epoch"), data.get("stop_threshold"))
    client.set_terminated(child, data["status"])


def _children(outbox: RunOutbox, data: dict[str, Any]) -> None:
    run_children_op(outbox.client, outbox.require_experiment(), outbox.require_run(), data)


register_op("children", _children)


def _plots_from_history(
    client: MlflowClient, run: Any, stop_reason: str | None, stop_epoch: int | None, stop_threshold: float | None
) -> None:
    """Draw a trial's velocity plots from the metric history it logged, and upload them to its run."""
    run_id = run.info.run_id
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


__all__ = ["run_children_op"]
