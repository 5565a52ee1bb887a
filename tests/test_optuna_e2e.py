"""End-to-end Optuna runs with real NeVe training: digits studies, MLflow logging, 3 worker processes on
one SQLite file, a worker killed mid-trial (heartbeat + retry), and 3 processes sharing enqueued trials on
one journal file (issue 12), the README's several-workers recipe among them.

Worker processes run :func:`_worker` from this module (``python -c "from tests.test_optuna_e2e import
_worker; ..."``), so this module imports nothing heavy at the top beyond optuna and torch.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState
from torch import nn

from neve_tune import NeVe, keys, noise_aux
from neve_tune.optuna import NeVePruner, report_epoch
from neve_tune.optuna._attrs import HISTORY_ATTR, STOP_EPOCH_ATTR, STOP_REASON_ATTR
from neve_tune.optuna._mlflow import INTERMEDIATE_METRIC
from neve_tune.studies.builtin.digits import DigitsCNN, load_digits_splits
from tests.readme import readme_example

ROOT = Path(__file__).resolve().parents[1]
FINAL = (TrialState.COMPLETE, TrialState.PRUNED)

optuna.logging.set_verbosity(optuna.logging.WARNING)


@contextmanager
def one_torch_thread():
    """Tiny models run fastest on one thread, and a shared 2-core machine stays responsive."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_accuracy(model, x, y):
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def cnn_objective(data, max_epochs=20):
    """DigitsCNN with NeVe; value = training accuracy (the test split takes no decision)."""

    def objective(trial):
        lr = trial.suggest_float("lr", 1e-3, 1e4, log=True)
        torch.manual_seed(0)
        model = DigitsCNN(width=8)
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        neve = NeVe(model, opt, noise_aux((1, 8, 8), n=100, seed=0), patience=3)
        for _ in range(max_epochs):
            model.train()
            for i in range(0, len(data.y_train), 64):
                loss = nn.functional.cross_entropy(model(data.x_train[i : i + 64]), data.y_train[i : i + 64])
                opt.zero_grad()
                loss.backward()
                opt.step()
            neve.step()
            acc = train_accuracy(model, data.x_train, data.y_train)
            if report_epoch(trial, neve, acc, max_epochs=max_epochs):
                break
        return acc

    return objective


# --- a digits study, logged to MLflow -------------------------------------------------------------------


@pytest.mark.slow
def test_digits_study_converged_complete_diverged_pruned_and_every_epoch_in_mlflow(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from neve_tune.optuna import NeVeMLflowCallback

    monkeypatch.chdir(tmp_path)
    tracking_uri = f"sqlite:///{tmp_path}/mlflow.db"
    study = optuna.create_study(
        study_name="digits-neve",
        storage=f"sqlite:///{tmp_path}/optuna.db",
        direction="maximize",
        pruner=NeVePruner(),
    )
    for lr in (0.05, 1e4, 0.1):
        study.enqueue_trial({"lr": lr})
    client = MlflowClient(tracking_uri=tracking_uri)
    parent = client.create_run(client.create_experiment("digits-neve"), run_name="arm-neve").info.run_id
    callback = NeVeMLflowCallback(tracking_uri, metric_name="train_accuracy", parent_run_id=parent)
    with one_torch_thread(), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a failed MLflow log would warn: fail the test
        study.optimize(cnn_objective(load_digits_splits()), n_trials=3, callbacks=[callback])

    by_lr = {t.params["lr"]: t for t in study.trials}
    for lr in (0.05, 0.1):
        trial = by_lr[lr]
        assert trial.state is TrialState.COMPLETE
        assert trial.user_attrs[STOP_REASON_ATTR] == "converged"
        assert 2 <= trial.user_attrs[STOP_EPOCH_ATTR] < 20
        assert trial.value > 0.95
        assert trial.last_step == trial.user_attrs[STOP_EPOCH_ATTR] - 1
        velocities = [float(e[keys.MODEL_VELOCITY]) for e in trial.user_attrs[HISTORY_ATTR]]
        assert velocities[-1] < 1e-3 <= min(velocities[:-1])  # stopped at the first epoch under threshold
    diverged = by_lr[1e4]
    assert diverged.state is TrialState.PRUNED
    assert diverged.value == diverged.intermediate_values[0]  # Optuna keeps a pruned trial's last report
    assert diverged.user_attrs[STOP_REASON_ATTR] == "diverged"
    assert diverged.user_attrs[STOP_EPOCH_ATTR] == 1
    assert study.best_trial.params["lr"] in (0.05, 0.1)

    experiment = client.get_experiment_by_name("digits-neve")
    children = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    runs = {int(r.data.tags["optuna.trial_number"]): r for r in children}
    assert sorted(runs) == [0, 1, 2]  # one child run per trial, under the arm's parent run
    for trial in study.trials:
        run = runs[trial.number]
        history = trial.user_attrs[HISTORY_ATTR]
        assert run.data.tags[keys.STOP_REASON] == trial.user_attrs[STOP_REASON_ATTR]
        assert run.data.tags[keys.STOP_EPOCH] == str(trial.user_attrs[STOP_EPOCH_ATTR])
        assert run.data.params == {"lr": str(trial.params["lr"])}
        assert run.info.status == "FINISHED"  # a pruned trial too: neve_tune's one convention (reason in the tag)
        for key in (keys.MODEL_VELOCITY, keys.LR, keys.NUM_DECAYS, INTERMEDIATE_METRIC):
            logged = client.get_metric_history(run.info.run_id, key)
            stored = [float(e["value" if key == INTERMEDIATE_METRIC else key]) for e in history]
            assert [m.step for m in logged] == [int(e[keys.EPOCH]) for e in history]
            got = [m.value for m in logged]
            assert all(a == b or (math.isnan(a) and math.isnan(b)) for a, b in zip(got, stored, strict=True)), key
        changes = client.get_metric_history(run.info.run_id, keys.VELOCITY_CHANGE)
        assert [m.step for m in changes] == list(range(2, len(history) + 1))  # D exists from epoch 2
        if trial.state is TrialState.COMPLETE:
            assert run.data.metrics["train_accuracy"] == trial.value


def test_mlflow_going_away_does_not_kill_the_study(monkeypatch, tmp_path):
    pytest.importorskip("mlflow")
    from neve_tune.optuna import NeVeMLflowCallback

    monkeypatch.chdir(tmp_path)  # where the unsent records are saved
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    callback = NeVeMLflowCallback("http://127.0.0.1:9")  # discard port: nothing listens

    def objective(trial):
        x = trial.suggest_float("x", 0, 1)
        report_epoch(trial, {keys.EPOCH: 1.0, keys.MODEL_VELOCITY: 1e-5}, x)
        return x

    study = optuna.create_study(pruner=NeVePruner())
    with pytest.warns(RuntimeWarning, match=r"could not log trial \d .* the study goes on") as caught:
        study.optimize(objective, n_trials=2, callbacks=[callback])
    assert sorted(str(w.message).split()[5] for w in caught) == ["0", "1"]  # "... could not log trial N ..."
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    # Nothing is lost: each trial's records wait in a file, sent with a later trial's (or replayed).
    assert callback.unsent == sorted(tmp_path.glob("mlflow-unsent-optuna-*-trial-*.jsonl"))
    assert len(callback.unsent) == 2
    assert all("saved to" in str(w.message) for w in caught)


def test_mlflow_callback_ends_a_pruned_trial_finished_with_its_reason_in_a_new_model_training_experiment(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from neve_tune.mlflow._experiment import EXPERIMENT_KIND_TAG
    from neve_tune.optuna import NeVeMLflowCallback

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    callback = NeVeMLflowCallback(uri, experiment_name="callback-kind", fallback_dir=tmp_path)

    def objective(trial):
        x = trial.suggest_float("x", 0, 1)
        if trial.number == 1:
            raise optuna.TrialPruned()  # a pruner of the user's own: no NeVe attributes
        if trial.number == 2:
            raise ValueError("boom")
        return x

    study = optuna.create_study(study_name="kind")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Optuna's own "Trial 2 failed" log
        study.optimize(objective, n_trials=3, callbacks=[callback], catch=(ValueError,))
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("callback-kind")
    assert experiment.tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    runs = {int(r.data.tags["optuna.trial_number"]): r for r in client.search_runs([experiment.experiment_id])}
    assert [runs[n].info.status for n in (0, 1, 2)] == ["FINISHED", "FINISHED", "FAILED"]
    assert runs[1].data.tags[keys.STOP_REASON] == "pruned" and keys.STOP_REASON not in runs[0].data.tags
    assert callback.unsent == [] and not list(tmp_path.glob("mlflow-unsent-*"))


@pytest.mark.slow
@pytest.mark.server
def test_mlflow_callback_buffers_an_outage_and_sends_it_with_the_next_trial(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from neve_tune.optuna import NeVeMLflowCallback
    from tests.conftest import MlflowServer

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    server = MlflowServer(tmp_path / "server").start()
    try:
        callback = NeVeMLflowCallback(server.uri, experiment_name="outage", fallback_dir=tmp_path / "unsent")

        def objective(trial):
            if trial.number == 1:
                server.stop()  # trial 1 ends while MLflow is away
            if trial.number == 2:
                server.start()  # ... and it is back before trial 2 ends
            for epoch in (1, 2, 3):
                report_epoch(trial, {keys.EPOCH: float(epoch), keys.MODEL_VELOCITY: 1.0 / epoch}, float(epoch))
            return 1.0

        study = optuna.create_study(study_name="outage", direction="maximize")
        with pytest.warns(RuntimeWarning, match=r"could not log trial 1 .*saved to .* the study goes on") as caught:
            study.optimize(objective, n_trials=3, callbacks=[callback])
        assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1  # trial 1's, nothing else
        assert callback.unsent == [] and not list((tmp_path / "unsent").glob("*.jsonl"))
        client = MlflowClient(server.uri)
        experiment = client.get_experiment_by_name("outage")
        runs = {int(r.data.tags["optuna.trial_number"]): r for r in client.search_runs([experiment.experiment_id])}
        assert sorted(runs) == [0, 1, 2]
        for run in runs.values():
            assert run.info.status == "FINISHED"
            history = client.get_metric_history(run.info.run_id, keys.MODEL_VELOCITY)
            assert sorted((m.step, m.value) for m in history) == [(1, 1.0), (2, 0.5), (3, 1 / 3)]
    finally:
        server.stop()


def test_mlflow_missing_gives_an_actionable_error(monkeypatch):
    from neve_tune.optuna import NeVeMLflowCallback

    monkeypatch.setitem(sys.modules, "mlflow", None)  # what `import mlflow` sees when it is not installed
    message = r"mlflow was not found - please install with `pip install neve_tune\[mlflow\]`"
    with pytest.raises(ImportError, match=message):
        NeVeMLflowCallback()


# --- the README example ---------------------------------------------------------------------------------


def test_readme_optuna_example():
    code = readme_example("optuna")
    namespace: dict = {"__name__": "readme_optuna"}
    with one_torch_thread():
        exec(compile(code, "README.md:optuna", "exec"), namespace)
    study = namespace["study"]
    trials = study.trials
    assert len(trials) == 4
    assert all(t.state in FINAL for t in trials)
    first = trials[0]  # the enqueued lr=1e3
    assert first.params["lr"] == 1e3
    assert first.state is TrialState.PRUNED and first.user_attrs[STOP_REASON_ATTR] == "diverged"
    sound = trials[1]  # the enqueued lr=0.05
    assert sound.params["lr"] == 0.05 and sound.state is TrialState.COMPLETE
    assert sound.user_attrs[STOP_REASON_ATTR] == "converged" and sound.user_attrs[STOP_EPOCH_ATTR] < 20
    assert sound.value > 0.95
    completed = [t for t in trials if t.state is TrialState.COMPLETE]
    assert all(t.user_attrs[STOP_REASON_ATTR] in ("converged", "max_t") for t in completed)
    assert study.best_trial.state is TrialState.COMPLETE and study.best_value >= sound.value
    assert all(t.state is TrialState.PRUNED for t in trials if t.user_attrs[STOP_REASON_ATTR] == "diverged")


def test_pruner_docstring_example(capsys):
    """The runnable Example in NeVePruner's docstring runs and does what it says."""
    docstring = inspect.getdoc(NeVePruner)
    code = textwrap.dedent(docstring.split(".. testcode::")[1].split("\nArgs:")[0])
    namespace: dict = {"__name__": "docstring_example"}
    with one_torch_thread():
        exec(compile(code, "NeVePruner.__doc__", "exec"), namespace)
    study = namespace["study"]
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    assert all(t.user_attrs[STOP_REASON_ATTR] == "converged" and t.value > 0.95 for t in study.trials)
    assert capsys.readouterr().out.strip().endswith("converged")


# --- worker processes sharing one SQLite file ------------------------------------------------------------


def _storage(url, heartbeat):
    """RDB storage as every worker builds it: a generous SQLite lock timeout, optional heartbeat + retry."""
    kwargs = {"engine_kwargs": {"connect_args": {"timeout": 60}}}
    if heartbeat:
        from optuna.storages import RetryHeartbeatStaleTrialCallback

        params = inspect.signature(optuna.storages.RDBStorage).parameters
        new_name = "heartbeat_stale_trial_callback"  # Optuna >= 4.9; `failed_trial_callback` before
        callback_arg = new_name if new_name in params else "failed_trial_callback"
        kwargs.update(heartbeat_interval=1, grace_period=2)
        kwargs[callback_arg] = RetryHeartbeatStaleTrialCallback(max_retry=1)
    return optuna.storages.RDBStorage(url, **kwargs)


def _mlp_objective(epoch_sleep, slow_from_trial, max_epochs=12):
    """A cheap real objective: a small MLP on flattened digits, NeVe + report_epoch for real."""
    data = load_digits_splits()
    x, y = data.x_train.flatten(1), data.y_train

    def objective(trial):
        lr = trial.suggest_categorical("lr", [0.02, 0.05, 0.2, 1e4])
        trial.set_user_attr("pid", os.getpid())
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        neve = NeVe(model, opt, noise_aux((64,), n=100, seed=0), patience=2)
        for _ in range(max_epochs):
            model.train()
            for i in range(0, len(y), 128):
                loss = nn.functional.cross_entropy(model(x[i : i + 128]), y[i : i + 128])
                opt.zero_grad()
                loss.backward()
                opt.step()
            neve.step()
            if trial.number >= slow_from_trial:
                time.sleep(epoch_sleep)
            if report_epoch(trial, neve, train_accuracy(model, x, y), max_epochs=max_epochs):
                break
        return train_accuracy(model, x, y)

    return objective


def _worker(config_json: str) -> None:
    """Entry point of a worker process: join the study (load_if_exists) and optimize."""
    config = json.loads(config_json)
    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if config.get("barrier"):  # start optimizing only once every worker is up, so they really overlap
        Path(config["barrier"], f"ready-{config['index']}").touch()
        deadline = time.time() + 120
        while len(list(Path(config["barrier"]).glob("ready-*"))) < config["n_workers"] and time.time() < deadline:
            time.sleep(0.05)
    study = optuna.create_study(
        study_name=config["study_name"],
        storage=_storage(config["url"], config["heartbeat"]),
        direction="maximize",
        pruner=NeVePruner(stop_threshold=1e-3),
        sampler=optuna.samplers.RandomSampler(seed=config["index"]),
        load_if_exists=True,
    )
    study.optimize(
        _mlp_objective(config["epoch_sleep"], config["slow_from_trial"]),
        n_trials=config["n_trials"],
        catch=(),
    )


def _spawn(**config) -> subprocess.Popen:
    code = "import sys; from tests.test_optuna_e2e import _worker; _worker(sys.argv[1])"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen(
        [sys.executable, "-c", code, json.dumps(config)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait(proc: subprocess.Popen, timeout: float = 240) -> None:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"worker failed with {proc.returncode}:\n{out}"


def _check_final_trial(trial):
    """A finished trial tells a consistent NeVe story."""
    history = trial.user_attrs[HISTORY_ATTR]
    assert [e["step"] for e in history] == list(range(len(history)))  # one contiguous run
    if trial.params["lr"] == 1e4:
        assert trial.state is TrialState.PRUNED and trial.user_attrs[STOP_REASON_ATTR] == "diverged"
    else:
        assert trial.state is TrialState.COMPLETE and trial.value > 0.5
        assert trial.user_attrs[STOP_REASON_ATTR] in ("converged", "max_t")
    assert trial.user_attrs[STOP_EPOCH_ATTR] == len(history)


@pytest.mark.slow
def test_three_worker_processes_on_one_sqlite_file_lose_no_trial(tmp_path):
    url = f"sqlite:///{tmp_path}/study.db"
    study = optuna.create_study(study_name="parallel", storage=_storage(url, heartbeat=False), direction="maximize")
    (tmp_path / "barrier").mkdir()
    common = dict(
        url=url,
        study_name="parallel",
        heartbeat=False,
        n_trials=4,
        epoch_sleep=0.1,
        slow_from_trial=0,
        barrier=str(tmp_path / "barrier"),
        n_workers=3,
    )
    workers = [_spawn(index=i, **common) for i in range(3)]
    for proc in workers:
        _wait(proc)

    trials = optuna.load_study(study_name="parallel", storage=url).trials
    assert len(trials) == 12
    assert sorted(t.number for t in trials) == list(range(12))
    assert all(t.state in FINAL for t in trials), [t.state for t in trials]
    for trial in trials:
        _check_final_trial(trial)
    pids = {t.user_attrs["pid"] for t in trials}
    assert len(pids) == 3 and sum(t.user_attrs["pid"] == p for t in trials for p in pids) == 12
    # the workers really ran at the same time: trials of different processes overlap in time
    overlapping = any(
        a.user_attrs["pid"] != b.user_attrs["pid"]
        and a.datetime_start < b.datetime_complete
        and b.datetime_start < a.datetime_complete
        for a in trials
        for b in trials
    )
    assert overlapping
    assert len(study.trials) == 12


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_worker_killed_mid_trial_is_failed_and_retried_nothing_else_lost(tmp_path):
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    url = f"sqlite:///{tmp_path}/study.db"
    study = optuna.create_study(study_name="resume", storage=_storage(url, heartbeat=True), direction="maximize")
    for lr in (0.05, 1e4, 0.02):  # one COMPLETE, one PRUNED, then the trial that gets killed
        study.enqueue_trial({"lr": lr})
    common = dict(url=url, study_name="resume", heartbeat=True, epoch_sleep=1.0, slow_from_trial=2)

    doomed = _spawn(index=0, n_trials=10, **common)
    deadline = time.time() + 180
    try:
        while True:  # kill the worker once trial 2 is running and has reported two epochs
            assert time.time() < deadline and doomed.poll() is None, "trial 2 never got going"
            trials = optuna.load_study(study_name="resume", storage=url).trials
            if len(trials) == 3 and len(trials[2].user_attrs.get(HISTORY_ATTR, [])) >= 2:
                break
            time.sleep(0.2)
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(timeout=30)
    finally:
        if doomed.poll() is None:
            doomed.kill()
    assert doomed.returncode == -signal.SIGKILL

    before = optuna.load_study(study_name="resume", storage=url).trials
    assert len(before) == 3 and before[2].state is TrialState.RUNNING
    assert [(t.params["lr"], t.state) for t in before[:2]] == [(0.05, TrialState.COMPLETE), (1e4, TrialState.PRUNED)]
    killed = before[2]
    assert killed.user_attrs.get(STOP_REASON_ATTR) is None  # it was stopped by the kill, not by NeVe

    time.sleep(3.5)  # heartbeat grace period (2 s) elapsed: trial 2 is stale
    resumer = _spawn(index=1, n_trials=2, **{**common, "slow_from_trial": 99})
    _wait(resumer)

    after = optuna.load_study(study_name="resume", storage=url).trials
    assert len(after) == 5
    assert after[2].state is TrialState.FAIL
    retry = after[3]
    assert RetryHeartbeatStaleTrialCallback.retried_trial_number(retry) == 2
    assert retry.params == killed.params
    assert all(t.state in FINAL for t in (*after[:2], *after[3:]))
    for trial in (*after[:2], *after[3:]):
        _check_final_trial(trial)  # the retry restarted at epoch 1: its history is one run, not two
    for old, new in zip(before[:2], after[:2], strict=True):  # nothing finished before the kill changed
        assert (old.state, old.value, old.params, old.user_attrs) == (new.state, new.value, new.params, new.user_attrs)


# --- enqueued trials across worker processes: journal storage ---------------------------------------------


def _queue_storage(where: str):
    """A ``sqlite:///`` URL gives an RDB storage (the racy setup of issue 12), a path a journal file."""
    if where.startswith("sqlite:"):
        return optuna.storages.RDBStorage(where, engine_kwargs={"connect_args": {"timeout": 60}})
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(where))


def _synchronise(folder: Path, name: str, index: int, n_workers: int) -> None:
    """Wait until every worker reached ``name``, so the workers really contend for the same queue."""
    folder.joinpath(f"{name}-{index}").touch()
    deadline = time.time() + 120
    while len(list(folder.glob(f"{name}-*"))) < n_workers:
        if any(folder.glob("failed-*")):
            raise RuntimeError(f"another worker failed before {name}")
        assert time.time() < deadline, f"the other workers never reached {name}"
        time.sleep(0.005)


def _pruning_objective(epoch_sleep: float, max_epochs: int = 4):
    """A cheap NeVe-reporting objective: odd configurations diverge at epoch 2 (PRUNED), even ones run to
    the cap (COMPLETE). Synthetic velocities through the real ``report_epoch`` and ``NeVePruner``."""

    def objective(trial):
        config = trial.suggest_int("config", 0, 999)
        trial.set_user_attr("pid", os.getpid())
        for epoch in range(1, max_epochs + 1):
            time.sleep(epoch_sleep)
            diverged = config % 2 == 1 and epoch == 2
            velocity = math.nan if diverged else 0.5 * 0.8**epoch
            metrics = {keys.EPOCH: float(epoch), keys.MODEL_VELOCITY: velocity, keys.DIVERGED: float(diverged)}
            if report_epoch(trial, metrics, float(epoch), max_epochs=max_epochs):
                break
        return float(config)

    return objective


def _queue_worker(config_json: str) -> None:
    """Entry point of a queue worker: per round, join the round's study, enqueue two trials, optimize two."""
    config = json.loads(config_json)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    barrier, index, n_workers = Path(config["barrier"]), config["index"], config["n_workers"]
    try:
        for rnd in range(config["rounds"]):
            _synchronise(barrier, f"create{rnd}", index, n_workers)
            study = optuna.create_study(
                study_name=f"round-{rnd}",
                storage=_queue_storage(config["storage"]),
                direction="maximize",
                pruner=NeVePruner(),
                sampler=optuna.samplers.RandomSampler(seed=index),
                load_if_exists=True,
            )
            for k in range(2):
                study.enqueue_trial({"config": 100 * rnd + 10 * index + k})
            _synchronise(barrier, f"optimize{rnd}", index, n_workers)
            study.optimize(_pruning_objective(config["epoch_sleep"]), n_trials=2, catch=())
    except BaseException:
        barrier.joinpath(f"failed-{index}").touch()  # the others stop waiting for this worker
        raise


def _run_queue_workers(storage: str, barrier: Path, *, rounds: int, n_workers: int = 3) -> list[tuple[int, str]]:
    """Start ``n_workers`` queue workers on one storage; their (return code, output) once all ended."""
    code = "import sys; from tests.test_optuna_e2e import _queue_worker; _queue_worker(sys.argv[1])"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    barrier.mkdir(parents=True, exist_ok=True)
    common = dict(storage=storage, barrier=str(barrier), rounds=rounds, n_workers=n_workers, epoch_sleep=0.02)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, json.dumps({**common, "index": i})],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(n_workers)
    ]
    outputs = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        outputs.append((proc.returncode, out))
    return outputs


def _queue_problems(storage, rounds: int, n_workers: int = 3) -> list[str]:
    """What went wrong in each round's study: every enqueued configuration must end exactly once."""
    problems = []
    for rnd in range(rounds):
        trials = optuna.load_study(study_name=f"round-{rnd}", storage=storage).trials
        enqueued = sorted(100 * rnd + 10 * i + k for i in range(n_workers) for k in range(2))
        ran = sorted(t.params.get("config", -1) for t in trials)
        if ran != enqueued:
            problems.append(f"round {rnd}: ran {ran}, enqueued {enqueued}")
        for t in trials:
            if t.state not in FINAL:
                problems.append(f"round {rnd}: trial {t.number} left {t.state.name}")
            elif (t.state is TrialState.PRUNED) != (t.params["config"] % 2 == 1):
                problems.append(f"round {rnd}: trial {t.number} (config {t.params['config']}) {t.state.name}")
    return problems


@pytest.mark.slow  # three worker processes
def test_three_worker_processes_on_one_journal_file_run_every_enqueued_trial_exactly_once(tmp_path):
    """Issue 12: three processes on one study, each enqueueing two trials and optimizing two, some pruned.
    On a shared SQLite file two workers can pop the same enqueued trial (SQLite ignores SELECT ... FOR
    UPDATE), one prunes it, the other dies on "Cannot tell a PRUNED trial" and its trials stay WAITING.
    On a journal file, the first RUNNING record in the log wins: every trial runs once, no worker fails."""
    rounds = 5
    journal = str(tmp_path / "journal.log")
    outputs = _run_queue_workers(journal, tmp_path / "barrier", rounds=rounds)
    assert [rc for rc, _ in outputs] == [0, 0, 0], "\n".join(out for _, out in outputs)
    storage = _queue_storage(journal)
    assert _queue_problems(storage, rounds) == []
    trials = [t for s in storage.get_all_studies() for t in storage.get_all_trials(s._study_id)]
    assert len(trials) == 6 * rounds
    assert sum(t.state is TrialState.PRUNED for t in trials) == 3 * rounds
    assert all(t.user_attrs[STOP_REASON_ATTR] == "diverged" for t in trials if t.state is TrialState.PRUNED)
    assert all(t.user_attrs[STOP_EPOCH_ATTR] == 2 for t in trials if t.state is TrialState.PRUNED)
    assert len({t.user_attrs["pid"] for t in trials}) == 3  # all three processes ran trials


def _lr_objective(epoch_sleep: float = 0.02, max_epochs: int = 4):
    """The README objective's search space (``lr``), cheap: lr above 10 diverges at epoch 2 (PRUNED)."""

    def objective(trial):
        lr = trial.suggest_float("lr", 1e-2, 1e3, log=True)
        trial.set_user_attr("pid", os.getpid())
        for epoch in range(1, max_epochs + 1):
            time.sleep(epoch_sleep)
            diverged = lr > 10 and epoch == 2
            velocity = math.nan if diverged else 0.5 * 0.8**epoch
            metrics = {keys.EPOCH: float(epoch), keys.MODEL_VELOCITY: velocity, keys.DIVERGED: float(diverged)}
            if report_epoch(trial, metrics, 1 / (1 + lr), max_epochs=max_epochs):
                break
        return 1 / (1 + lr)

    return objective


def _readme_worker(config_json: str) -> None:
    """A worker running the README's several-workers recipe as written, with a cheap ``objective``."""
    config = json.loads(config_json)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    barrier = Path(config["barrier"])
    try:
        _synchronise(barrier, "start", config["index"], config["n_workers"])
        namespace = {"__name__": "readme_optuna_workers", "objective": _lr_objective()}
        exec(compile(readme_example("optuna-workers"), "README.md:optuna-workers", "exec"), namespace)
    except BaseException:
        barrier.joinpath(f"failed-{config['index']}").touch()
        raise


@pytest.mark.slow  # three worker processes
def test_readme_several_workers_recipe_runs_in_three_processes(tmp_path):
    """The README recipe, as written, in three processes on one machine: a journal file in the working
    directory, each worker enqueueing lr=0.05 and adding 10 trials; every trial ends exactly once."""
    code = "import sys; from tests.test_optuna_e2e import _readme_worker; _readme_worker(sys.argv[1])"
    env = {k: v for k, v in os.environ.items() if k != "OPTUNA_STORAGE"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    (tmp_path / "barrier").mkdir()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                code,
                json.dumps({"barrier": str(tmp_path / "barrier"), "index": i, "n_workers": 3}),
            ],
            cwd=tmp_path,  # the recipe's journal file lands here
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(3)
    ]
    for proc in procs:
        _wait(proc)
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "optuna_journal.log"))
    )
    trials = optuna.load_study(study_name="digits-neve", storage=storage).trials
    assert len(trials) == 30 and sorted(t.number for t in trials) == list(range(30))
    assert all(t.state in FINAL for t in trials), [t.state.name for t in trials]
    assert sum(t.params["lr"] == 0.05 for t in trials) == 3  # the three enqueued trials, each run once
    assert all(t.state is TrialState.PRUNED for t in trials if t.params["lr"] > 10)
    assert all(t.state is TrialState.COMPLETE for t in trials if t.params["lr"] <= 10)
    assert len({t.user_attrs["pid"] for t in trials}) == 3
    assert not list(tmp_path.glob("*.db"))  # no SQLite file
