"""neve_tune.mlflow against a real SQLite store and a real `mlflow server` started on 127.0.0.1.

Everything is read back through MlflowClient: run tree, params, metric histories, tags, artifacts, statuses.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest

pytest.importorskip("mlflow")

from mlflow import MlflowClient

from neve_tune.mlflow import (
    MlflowLink,
    MlflowUnavailableWarning,
    TrackingUnavailableError,
    TrialLogger,
    VelocityHistory,
    check_tracking_uri,
    experiment_ui_url,
    get_or_create_experiment,
    replay_unsent,
)
from neve_tune.mlflow._experiment import EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND
from neve_tune.mlflow._logger import (
    LAYER_HEATMAP_ARTIFACT,
    TAG_ERROR,
    TAG_PARENT,
    TAG_STOP_EPOCH,
    TAG_STOP_REASON,
    VELOCITY_CURVE_ARTIFACT,
)
from neve_tune.mlflow._outbox import Op, RunOutbox, chunk_batch, op_handler, register_op
from neve_tune.mlflow._replay import UnsentFile, replay_folder, unsent_files
from neve_tune.mlflow._uri import resolve_tracking_uri
from neve_tune.studies._tracking import StudyTracker
from tests.conftest import MlflowServer, free_port


@pytest.fixture
def sqlite_uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _children(client: MlflowClient, experiment_id: str, parent: str) -> list:
    return client.search_runs([experiment_id], filter_string=f"tags.`{TAG_PARENT}` = '{parent}'")


def test_run_tree_params_metrics_tags_artifacts_on_sqlite(sqlite_uri: str, tmp_path: Path) -> None:
    tracker = StudyTracker(sqlite_uri, "tree", study="unit", arms=["neve", "asha"], params={"seed": 3})
    link = tracker.arm("neve").link
    # The link travels in the trial config as a plain dict, like Ray's own `config["mlflow"]`.
    config = {"config_id": 7, "lr": 0.1, "width": 16, MlflowLink.CONFIG_KEY: link.to_dict()}
    restored = MlflowLink.from_config(config)
    assert restored == link
    history = VelocityHistory()
    with TrialLogger(restored, run_name="neve-007", params=config, trial_id="t7", fallback_dir=tmp_path) as log:
        for epoch in range(1, 4):
            velocity = 10.0**-epoch
            layer = {f"layer{i}": velocity * (i + 1) for i in range(3)}
            # 1,500 metrics in one epoch: sent in two log_batch calls (MLflow accepts at most 1,000).
            wide = {f"wide/{i:04d}": float(i + epoch) for i in range(1500)}
            log.log_metrics({"neve/model_velocity": velocity, "lr": 0.1, "nan_metric": math.nan, **wide}, step=epoch)
            history.append(epoch, velocity, 0.1, lr_decayed=epoch == 2, layer_velocity=layer)
        log.log_velocity_plots(history, stop_epoch=3, stop_reason="converged", stop_threshold=1e-3)
        log.end("FINISHED", stop_reason="converged", stop_epoch=3)
    tracker.end()

    client = MlflowClient(resolve_tracking_uri(sqlite_uri))
    study = client.get_run(tracker.study_run_id)
    assert study.info.status == "FINISHED" and study.data.params == {"seed": "3"}
    arms = _children(client, tracker.experiment_id, tracker.study_run_id)
    assert sorted(r.data.tags["arm"] for r in arms) == ["asha", "neve"]
    assert {r.info.status for r in arms} == {"FINISHED"}
    [trial] = _children(client, tracker.experiment_id, link.parent_run_id)
    assert trial.info.run_name == "neve-007" and trial.info.status == "FINISHED"
    assert trial.data.params == {"config_id": "7", "lr": "0.1", "width": "16"}  # no link among the params
    assert trial.data.tags[TAG_STOP_REASON] == "converged" and trial.data.tags[TAG_STOP_EPOCH] == "3"
    assert trial.data.tags["arm"] == "neve" and trial.data.tags["trial_id"] == "t7"
    assert _history(client, trial.info.run_id, "neve/model_velocity") == [(1, 0.1), (2, 0.01), (3, 0.001)]
    assert _history(client, trial.info.run_id, "wide/1499") == [(1, 1500.0), (2, 1501.0), (3, 1502.0)]
    assert math.isnan(trial.data.metrics["nan_metric"])
    assert len(trial.data.metrics) == 1503
    plots = {a.path: a.file_size for a in client.list_artifacts(trial.info.run_id, "plots")}
    assert set(plots) == {VELOCITY_CURVE_ARTIFACT, LAYER_HEATMAP_ARTIFACT}
    assert min(plots.values()) > 5000  # real PNGs
    local = client.download_artifacts(trial.info.run_id, VELOCITY_CURVE_ARTIFACT, str(tmp_path))
    assert Path(local).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_trial_that_raises_ends_failed_and_interrupt_ends_killed(sqlite_uri: str, tmp_path: Path) -> None:
    tracker = StudyTracker(sqlite_uri, "statuses", study="unit", arms=["fifo"])
    link = tracker.arm("fifo").link
    with pytest.raises(ZeroDivisionError), TrialLogger(link, run_name="boom", trial_id="a") as log:
        log.log_metrics({"train/loss": 1.0}, step=1)
        _ = 1 / 0
    with pytest.raises(KeyboardInterrupt), TrialLogger(link, run_name="ctrl-c", trial_id="b") as log:
        raise KeyboardInterrupt
    tracker.end()
    client = MlflowClient(tracker.tracking_uri)
    runs = {r.info.run_name: r for r in _children(client, tracker.experiment_id, link.parent_run_id)}
    assert runs["boom"].info.status == "FAILED"
    assert runs["boom"].data.tags[TAG_ERROR] == "ZeroDivisionError: division by zero"
    assert _history(client, runs["boom"].info.run_id, "train/loss") == [(1, 1.0)]
    assert runs["ctrl-c"].info.status == "KILLED"


def test_driver_safety_net_ends_a_trial_stopped_from_outside(sqlite_uri: str) -> None:
    """A trial its scheduler stopped (its process gone) is tagged, plotted from its metrics and ended."""
    tracker = StudyTracker(sqlite_uri, "safety", study="unit", arms=["asha"])
    arm = tracker.arm("asha")
    log = TrialLogger(arm.link, run_name="asha-000", trial_id="x1")
    for epoch in (1, 2, 3):
        log.log_metrics({"monitor/model_velocity": 0.1 / epoch, "lr": 0.1, "layer_velocity/conv": 0.2 / epoch}, epoch)
    # ... and the worker dies here without ending its run.
    arm.finalize_trial("x1", status="FINISHED", stop_reason="pruned", stop_epoch=3, stop_threshold=1e-3)
    arm.finalize_trial("never-started", status="FINISHED", stop_reason="pruned", stop_epoch=1)  # no run: no-op
    tracker.end()
    client = MlflowClient(tracker.tracking_uri)
    run = client.get_run(log.run_id)
    assert run.info.status == "FINISHED"
    assert (run.data.tags[TAG_STOP_REASON], run.data.tags[TAG_STOP_EPOCH]) == ("pruned", "3")
    assert {a.path for a in client.list_artifacts(log.run_id, "plots")} == {
        VELOCITY_CURVE_ARTIFACT,
        LAYER_HEATMAP_ARTIFACT,
    }


def test_close_open_trials_and_restarted_trial_reuses_its_run(sqlite_uri: str) -> None:
    tracker = StudyTracker(sqlite_uri, "reuse", study="unit", arms=["neve"])
    arm = tracker.arm("neve")
    first = TrialLogger(arm.link, run_name="neve-000", trial_id="same")
    first.log_metrics({"x": 1.0}, step=1)
    again = TrialLogger(arm.link, run_name="neve-000", trial_id="same")  # e.g. Ray restarted the trial
    assert again.run_id == first.run_id
    stray = TrialLogger(arm.link, run_name="neve-001", trial_id="other")
    arm.close_open_trials("KILLED")
    tracker.end()
    client = MlflowClient(tracker.tracking_uri)
    assert client.get_run(first.run_id).info.status == "KILLED"
    assert client.get_run(stray.run_id).info.status == "KILLED"
    assert len(_children(client, tracker.experiment_id, arm.link.parent_run_id)) == 2


def test_batches_follow_mlflows_own_request_limits() -> None:
    from mlflow.utils import validation

    metrics = [(f"m{i}", float(i), 0, 1) for i in range(2 * validation.MAX_METRICS_PER_BATCH + 5)]
    params = {f"p{i}": "x" * 7000 for i in range(validation.MAX_PARAMS_TAGS_PER_BATCH + 1)}
    ops = chunk_batch(metrics, params=params, tags={"note": "y" * 9000})
    sizes = [len(op.data.get("metrics") or op.data.get("params") or op.data["tags"]) for op in ops]
    assert sizes == [1000, 1000, 5, 100, 1, 1]
    assert {len(v) for op in ops[3:5] for v in op.data["params"].values()} == {validation.MAX_PARAM_VAL_LENGTH}
    assert len(ops[5].data["tags"]["note"]) == validation.MAX_TAG_VAL_LENGTH == 8000


def test_tracking_uri_checks_fail_before_anything_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert check_tracking_uri(None) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert (tmp_path / "mlflow.db").exists()
    with pytest.raises(TrackingUnavailableError, match="does not exist"):
        check_tracking_uri(f"sqlite:///{tmp_path / 'missing' / 'x.db'}")
    port = free_port()  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(TrackingUnavailableError, match=f"No MLflow server answers at 'http://127.0.0.1:{port}'"):
        check_tracking_uri(f"http://127.0.0.1:{port}")
    assert time.monotonic() - t0 < 10  # fails fast, not after MLflow's minutes of retries
    with pytest.raises(TrackingUnavailableError, match="Cannot use the MLflow tracking URI 'bogus://x'"):
        check_tracking_uri("bogus://x")
    (tmp_path / "not-a-db.db").write_text("this is not sqlite")
    with pytest.raises(TrackingUnavailableError):
        check_tracking_uri(f"sqlite:///{tmp_path / 'not-a-db.db'}")


def test_missing_mlflow_gives_an_actionable_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from neve_tune.mlflow import _deps

    monkeypatch.setitem(sys.modules, "mlflow", None)  # what an environment without mlflow looks like
    with pytest.raises(ImportError, match=r"pip install neve_tune\[mlflow\]"):
        _deps.require_mlflow()


@pytest.mark.slow  # a fresh SQLite store (MLflow's migrations): seconds
@pytest.mark.filterwarnings("ignore::neve_tune.mlflow.MlflowUnavailableWarning")
def test_from_the_first_failed_send_every_record_is_on_disk(
    sqlite_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No server answers: the trial's file holds all it logged after each epoch, so a worker torn down now
    (a stopped Ray trial) loses nothing; a run of the same name keeps its own file; replayed into the store,
    every epoch and artifact is there."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # refused at once (the default retries ~2 s)
    tracker = StudyTracker(sqlite_uri, "spool", study="unit", arms=["asha"])
    arm = tracker.arm("asha")
    gone = dataclasses.replace(arm.link, tracking_uri=f"http://127.0.0.1:{free_port()}")  # no server there
    folder = tmp_path / "unsent"
    log = TrialLogger(gone, run_name="asha-000", params={"lr": 0.1}, trial_id="t0", fallback_dir=folder)
    [path] = folder.glob("*.jsonl")
    for epoch in (1, 2, 3):
        log.log_metrics({"train/loss": 1.0 / epoch, "v": math.nan if epoch == 3 else float(epoch)}, step=epoch)
        assert UnsentFile.read(path).metric_values == 2 * epoch  # on disk before the next epoch starts
    log.log_text("hello", "notes/readme.md")
    t0 = time.monotonic()
    assert log.detach() == path and log.pending == 6  # create, params, 3 epochs, the text: none sent
    assert time.monotonic() - t0 < 1  # known down: no last try while the worker may be torn down
    assert not list(folder.glob(".*"))  # no temporary file left behind
    twin = TrialLogger(gone, run_name="asha-000", trial_id="t1", fallback_dir=folder)  # e.g. the next seed's
    twin.log_metrics({"train/loss": 2.0}, step=1)
    assert twin.end("FINISHED", stop_reason="max_t", stop_epoch=1) not in (None, path)  # its own file

    report = replay_folder(folder, tracking_uri=tracker.tracking_uri)
    assert report.complete and len(report.sent) == 2 and not list(folder.iterdir())
    arm.finalize_trial("t0", status="FINISHED", stop_reason="pruned", stop_epoch=3)  # the driver's part
    tracker.end()
    client = MlflowClient(tracker.tracking_uri)
    runs = {r.data.tags["trial_id"]: r for r in _children(client, tracker.experiment_id, arm.link.parent_run_id)}
    assert runs["t1"].info.status == "FINISHED" and _history(client, runs["t1"].info.run_id, "train/loss") == [(1, 2.0)]
    run_id = runs["t0"].info.run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags[TAG_STOP_REASON] == "pruned"
    assert run.data.params == {"lr": "0.1"} and run.data.tags[TAG_PARENT] == arm.run_id
    assert _history(client, run_id, "train/loss") == [(1, 1.0), (2, 0.5), (3, 1 / 3)]
    assert math.isnan(_history(client, run_id, "v")[2][1])
    assert [a.path for a in client.list_artifacts(run_id, "notes")] == ["notes/readme.md"]  # its own name


@pytest.mark.slow
@pytest.mark.server
@pytest.mark.filterwarnings("ignore::neve_tune.mlflow.MlflowUnavailableWarning")
def test_server_outage_does_not_stop_logging_and_nothing_is_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Against a real server: it goes away mid-trial and comes back; then it goes away for good."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # each send to the stopped server fails at once
    server = MlflowServer(tmp_path / "server").start()
    try:
        assert check_tracking_uri(server.uri) == server.uri
        tracker = StudyTracker(
            server.uri,
            "outage",
            study="unit",
            arms=["fifo"],
            retry_interval_s=0.5,
            fallback_dir=tmp_path / "unsent",
            drain_timeout_s=0,  # gone for good below: one try at the end (the wait is tested on its own)
        )
        link = tracker.arm("fifo").link
        log = TrialLogger(link, run_name="fifo-000", trial_id="a", fallback_dir=tmp_path / "unsent")
        log.log_metrics({"train/loss": 1.0}, step=1)
        server.stop()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t0 = time.monotonic()
            for epoch in (2, 3, 4):
                log.log_metrics({"train/loss": float(epoch)}, step=epoch)  # must not raise
            assert time.monotonic() - t0 < 30
        assert log.pending > 0
        assert any("is unavailable" in str(w.message) for w in caught if w.category is MlflowUnavailableWarning)

        server.start()  # same port, same database
        time.sleep(0.6)
        log.log_metrics({"train/loss": 5.0}, step=5)
        assert log.pending == 0 and not list((tmp_path / "unsent").glob("*.jsonl"))  # all sent: no file left
        assert log.end("FINISHED", stop_reason="max_t", stop_epoch=5) is None
        client = MlflowClient(server.uri)
        assert _history(client, log.run_id, "train/loss") == [(e, float(e)) for e in range(1, 6)]
        assert client.get_run(log.run_id).info.status == "FINISHED"

        # Gone for good at the end of a trial: records go to a file, replayed later.
        log2 = TrialLogger(link, run_name="fifo-001", trial_id="b", fallback_dir=tmp_path / "unsent")
        log2.log_metrics({"train/loss": 1.0}, step=1)
        server.stop()
        log2.log_metrics({"train/loss": 2.0}, step=2)
        with pytest.warns(MlflowUnavailableWarning, match="saved to"):
            path = log2.end("FINISHED", stop_reason="max_t", stop_epoch=2)
        assert path is not None and path.exists()
        saved = tracker.end()  # the driver's own records are saved too
        assert saved and all(p.exists() for p in saved)

        server.start()
        assert replay_unsent(path) == log2.run_id
        for p in saved:
            replay_unsent(p)
        run = client.get_run(log2.run_id)
        assert run.info.status == "FINISHED" and run.data.tags[TAG_STOP_REASON] == "max_t"
        assert _history(client, log2.run_id, "train/loss") == [(1, 1.0), (2, 2.0)]
        assert client.get_run(tracker.study_run_id).info.status == "FINISHED"
    finally:
        server.stop()


def test_readme_example_logs_a_plain_training_loop() -> None:
    from tests.readme import readme_example

    ns: dict = {}
    exec(readme_example("mlflow-trial"), ns)
    tracker, log, epoch = ns["tracker"], ns["log"], ns["epoch"]
    assert ns["reason"] == "converged" and epoch < 200  # NeVe stopped it
    client = MlflowClient(tracker.tracking_uri)
    run = client.get_run(log.run_id)
    assert run.info.status == "FINISHED"
    assert (run.data.tags[TAG_STOP_REASON], run.data.tags[TAG_STOP_EPOCH]) == ("converged", str(epoch))
    assert run.data.tags[TAG_PARENT] == tracker.arm("neve").link.parent_run_id
    assert _history(client, log.run_id, "neve/epoch") == [(e, float(e)) for e in range(1, epoch + 1)]
    assert _history(client, log.run_id, "neve/model_velocity")[-1][1] < 1e-3
    assert {a.path for a in client.list_artifacts(log.run_id, "plots")} == {
        VELOCITY_CURVE_ARTIFACT,
        LAYER_HEATMAP_ARTIFACT,
    }


# ---------------------------------------------------------------------------- experiments, registered operations
def test_experiments_we_create_are_tagged_as_model_training(sqlite_uri: str) -> None:
    """MLflow 3.17's UI opens an experiment without this tag in its GenAI view ("0 traces")."""
    tracker = StudyTracker(sqlite_uri, "kind", study="unit", arms=["neve"])
    tracker.end()
    client = MlflowClient(tracker.tracking_uri)
    assert client.get_experiment(tracker.experiment_id).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert MODEL_TRAINING_KIND == "custom_model_development"
    # An existing experiment is used as it is, whoever created it.
    other = client.create_experiment("theirs")
    assert get_or_create_experiment(client, "theirs") == other
    assert EXPERIMENT_KIND_TAG not in client.get_experiment(other).tags
    assert get_or_create_experiment(client, "kind") == tracker.experiment_id
    client.delete_experiment(other)
    with pytest.raises(TrackingUnavailableError, match="was deleted. Restore it"):
        get_or_create_experiment(client, "theirs")
    # MLflow 3.17's UI opens on the runs only with this URL parameter (checked in headless Chromium).
    assert experiment_ui_url("http://127.0.0.1:5000/", "7") == (
        "http://127.0.0.1:5000/#/experiments/7?workflowType=machine_learning"
    )


def _finalize_file(tracker: StudyTracker, folder: Path) -> Path:
    """An arm run's 'children' operation (end trial x1 as pruned), saved unsent as after an outage."""
    arm = tracker.arm("asha")
    outbox = RunOutbox(tracker.tracking_uri, tracker.experiment_id, run_id=arm.run_id, order=1)
    finalize = {"action": "finalize", "trial_id": "x1", "status": "FINISHED", "stop_reason": "pruned"}
    outbox.put(Op("children", {**finalize, "stop_epoch": 2, "stop_threshold": None, "error": None}), send=False)
    path = outbox.dump(folder / "mlflow-unsent-arm.jsonl")
    assert path is not None
    return path


@pytest.mark.slow  # a fresh Python process
def test_study_operations_replay_in_a_fresh_process_through_their_registered_handler(
    sqlite_uri: str, tmp_path: Path
) -> None:
    tracker = StudyTracker(sqlite_uri, "registry", study="unit", arms=["asha"])
    log = TrialLogger(tracker.arm("asha").link, run_name="asha-000", trial_id="x1")
    log.log_metrics({"train/loss": 1.0}, step=1)
    log.log_metrics({"train/loss": 0.5}, step=2)
    log.detach()  # stopped from outside: its run stays open for the driver
    path = _finalize_file(tracker, tmp_path)
    entry = json.loads(path.read_text().splitlines()[1])
    assert entry["kind"] == "children" and entry["module"] == "neve_tune.studies._children"
    # The mlflow package knows nothing of studies: the saved file names the handler's module.
    script = (
        "import sys\n"
        "from neve_tune.mlflow import replay_unsent\n"
        "assert not [m for m in sys.modules if m.startswith('neve_tune.studies')]\n"
        f"replay_unsent({str(path)!r}, remove=True)\n"
        "assert 'neve_tune.studies._children' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
    assert not path.exists()
    run = MlflowClient(tracker.tracking_uri).get_run(log.run_id)
    assert run.info.status == "FINISHED"
    assert (run.data.tags[TAG_STOP_REASON], run.data.tags[TAG_STOP_EPOCH]) == ("pruned", "2")
    tracker.end()

    with pytest.raises(ValueError, match="unknown MLflow operation 'nope'"):
        op_handler("nope", "os")  # only neve_tune modules are imported from a file
    with pytest.raises(ValueError, match="already registered"):
        register_op("children", lambda outbox, data: None)


def test_a_refused_operation_leaves_only_what_was_not_sent(sqlite_uri: str, tmp_path: Path) -> None:
    tracker = StudyTracker(sqlite_uri, "refused", study="unit", arms=["fifo"])
    outbox = RunOutbox(tracker.tracking_uri, tracker.experiment_id)
    outbox.put([Op("create", {"run_name": "r"}), *chunk_batch([("x", 1.0, 0, 1)], params={"lr": 1})], send=False)
    outbox.put([*chunk_batch(params={"lr": 2}), Op("terminate", {"status": "FINISHED"})], send=False)
    path = outbox.dump(tmp_path / "mlflow-unsent-r.jsonl")
    assert path is not None and UnsentFile.read(path).operations == 5
    with pytest.raises(Exception, match="Changing param values is not allowed"):
        replay_unsent(path)  # MLflow refuses to change a param
    left = UnsentFile.read(path)
    assert left.run_id is not None and left.operations == 2  # a second replay resumes here
    client = MlflowClient(tracker.tracking_uri)
    run = client.get_run(left.run_id)
    assert run.data.params == {"lr": "1"} and _history(client, left.run_id, "x") == [(1, 1.0)]
    report = replay_folder(tmp_path)
    assert report.refused == [path] and not report.outage and not report.complete
    assert "Still unsent in" in report.summary() and "1 run(s): 2 record batch(es)" in report.summary()
    tracker.end()


# ---------------------------------------------------------------------------- the driver outlives its trials
def _back_in(server: MlflowServer, seconds: float) -> threading.Thread:
    thread = threading.Thread(target=lambda: (time.sleep(seconds), server.start()), daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
@pytest.mark.server
@pytest.mark.filterwarnings("ignore::neve_tune.mlflow.MlflowUnavailableWarning")
def test_driver_sends_what_trials_left_once_the_server_answers_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Trials end while the server is down (leaving files); it comes back while the driver ends the study."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # each send to the stopped server fails at once
    folder = tmp_path / "mlflow-unsent"
    server = MlflowServer(tmp_path / "server").start()
    try:
        tracker = StudyTracker(
            server.uri, "drain", study="unit", arms=["neve", "asha"], retry_interval_s=0.5, fallback_dir=folder
        )
        neve, asha = tracker.arm("neve"), tracker.arm("asha")
        trials = [(neve, "n0"), (neve, "n1"), (asha, "a0"), (asha, "a1")]
        logs = {tid: TrialLogger(arm.link, run_name=tid, trial_id=tid, fallback_dir=folder) for arm, tid in trials}
        for log in logs.values():
            log.log_metrics({"train/loss": 1.0}, step=1)
        server.stop()
        for epoch in (2, 3):
            for log in logs.values():
                log.log_metrics({"train/loss": 1.0 / epoch}, step=epoch)
        for tid in ("n0", "n1", "a0"):
            assert logs[tid].end("FINISHED", stop_reason="converged", stop_epoch=3) is not None
        assert logs["a1"].detach() is not None  # ASHA stopped it: the driver ends it
        asha.finalize_trial("a1", status="FINISHED", stop_reason="pruned", stop_epoch=3)
        asha.tag_trial("a0", {"picked": "true"})
        for arm in (neve, asha):
            arm.close_open_trials("KILLED")
        # On disk: the 4 trials' records, and the 2 arm runs' own (their operations on the trial runs).
        assert sorted(f.order for f in unsent_files(folder)) == [0, 0, 0, 0, 1, 1]

        back = _back_in(server, 3)
        t0 = time.monotonic()
        assert tracker.end("FINISHED") == []  # nothing left to save
        assert time.monotonic() - t0 < tracker.drain_timeout_s
        back.join()
        assert not list(folder.glob("*.jsonl")) and not list(folder.glob("*.artifacts"))

        client = MlflowClient(server.uri)
        runs = {r.data.tags["trial_id"]: r for r in client.search_runs([tracker.experiment_id], "tags.role = 'trial'")}
        assert sorted(runs) == ["a0", "a1", "n0", "n1"]
        for tid, run in runs.items():
            assert run.info.status == "FINISHED", tid
            assert _history(client, run.info.run_id, "train/loss") == [(1, 1.0), (2, 0.5), (3, 1 / 3)]
            assert run.data.tags[TAG_STOP_EPOCH] == "3"
        assert runs["a1"].data.tags[TAG_STOP_REASON] == "pruned" and runs["a0"].data.tags["picked"] == "true"
        assert client.get_run(tracker.study_run_id).info.status == "FINISHED"
        assert {client.get_run(a.run_id).info.status for a in (neve, asha)} == {"FINISHED"}
    finally:
        server.stop()


@pytest.mark.slow
@pytest.mark.server
@pytest.mark.filterwarnings("ignore::neve_tune.mlflow.MlflowUnavailableWarning")
def test_driver_gives_up_after_its_wait_names_what_is_left_and_the_cli_sends_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from neve_tune.cli import main

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # each send to the stopped server fails at once

    folder = tmp_path / "mlflow-unsent"
    server = MlflowServer(tmp_path / "server").start()
    try:
        tracker = StudyTracker(
            server.uri, "give-up", study="unit", arms=["fifo"], fallback_dir=folder, drain_timeout_s=3
        )
        log = TrialLogger(tracker.arm("fifo").link, run_name="fifo-000", trial_id="f0", fallback_dir=folder)
        log.log_metrics({"train/loss": 1.0}, step=1)
        server.stop()
        log.log_metrics({"train/loss": 2.0}, step=2)
        with pytest.warns(MlflowUnavailableWarning, match="saved to"):
            log.end("FINISHED", stop_reason="max_t", stop_epoch=2)
        t0 = time.monotonic()
        with pytest.warns(MlflowUnavailableWarning) as caught:
            saved = tracker.end("FINISHED")
        assert time.monotonic() - t0 < 30  # bounded
        [last] = [str(w.message) for w in caught if "still unsent" in str(w.message)]
        assert f"still unsent in {folder}: 3 run(s): " in last  # the trial, the arm and the study
        assert f"`neve-tune mlflow replay {folder}`" in last
        assert len(saved) == 2 and len(list(folder.glob("*.jsonl"))) == 3

        assert main(["mlflow", "replay", str(folder)]) == 1  # still down: nothing is lost
        assert "Still unsent" in capsys.readouterr().out
        assert len(list(folder.glob("*.jsonl"))) == 3
        server.start()
        assert main(["mlflow", "replay", str(folder)]) == 0
        out = capsys.readouterr().out
        assert "Sent 3 run(s): " in out and "Nothing is left to send" in out
        assert not list(folder.glob("*.jsonl"))
        client = MlflowClient(server.uri)
        run = client.get_run(log.run_id)
        assert run.info.status == "FINISHED" and run.data.tags[TAG_STOP_REASON] == "max_t"
        assert _history(client, log.run_id, "train/loss") == [(1, 1.0), (2, 2.0)]
        assert client.get_run(tracker.study_run_id).info.status == "FINISHED"
        assert main(["mlflow", "replay", str(folder)]) == 0
        assert "Nothing to send" in capsys.readouterr().out
        assert main(["mlflow", "replay", str(tmp_path / "missing")]) == 2
        assert "does not exist" in capsys.readouterr().err
    finally:
        server.stop()
