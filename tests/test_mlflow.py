"""neve_tune.mlflow against a real SQLite store and a real `mlflow server` started on 127.0.0.1.

Everything is read back through MlflowClient: run tree, params, metric histories, tags, artifacts, statuses.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

pytest.importorskip("mlflow")

from mlflow import MlflowClient

from neve_tune.mlflow import (
    LAYER_HEATMAP_ARTIFACT,
    TAG_ERROR,
    TAG_PARENT,
    TAG_STOP_EPOCH,
    TAG_STOP_REASON,
    VELOCITY_CURVE_ARTIFACT,
    MlflowLink,
    MlflowUnavailableWarning,
    StudyTracker,
    TrackingUnavailableError,
    TrialLogger,
    VelocityHistory,
    check_tracking_uri,
    replay_unsent,
    resolve_tracking_uri,
)

MLFLOW = str(Path(sys.executable).with_name("mlflow"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 (its own process group, so `stop` ends all its processes)."""

    def __init__(self, folder: Path, port: int | None = None) -> None:
        self.folder = folder
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90) -> MlflowServer:
        self.folder.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        cmd = [
            MLFLOW, "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{self.folder / 'server.db'}",
            "--artifacts-destination", str(self.folder / "artifacts"),
        ]  # fmt: skip
        log = open(self.folder / "server.log", "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env, start_new_session=True)
        import requests

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.folder / 'server.log').read_text()[-2000:]}")
            try:
                if requests.get(f"{self.uri}/health", timeout=1).status_code == 200:
                    return self
            except requests.RequestException:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer within {timeout} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the group of the server this object started
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None


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


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::neve_tune.mlflow.MlflowUnavailableWarning")
def test_server_outage_does_not_stop_logging_and_nothing_is_lost(tmp_path: Path) -> None:
    """Against a real server: it goes away mid-trial and comes back; then it goes away for good."""
    server = MlflowServer(tmp_path / "server").start()
    try:
        assert check_tracking_uri(server.uri) == server.uri
        tracker = StudyTracker(
            server.uri, "outage", study="unit", arms=["fifo"], retry_interval_s=0.5, fallback_dir=tmp_path / "unsent"
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
        assert log.pending == 0
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
