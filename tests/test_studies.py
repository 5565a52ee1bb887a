"""Studies: the protocol pieces (fast) and the digits study end-to-end on a real local Ray (slow).

The end-to-end runs use a tiny budget and check everything through MlflowClient against a real
`mlflow server` on 127.0.0.1 (the default SQLite store is covered through the CLI in test_cli.py).
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from neve_tune.studies import (
    ARMS,
    ArmResult,
    Backend,
    Budget,
    Choice,
    FixedSchedulePolicy,
    LogUniform,
    NeVePolicy,
    StudyError,
    StudyOptions,
    TrialRecord,
    TrialSpec,
    UnknownArmError,
    UnknownStudyError,
    comparison_csv,
    comparison_markdown,
    get_arm,
    get_study,
    list_arms,
    list_studies,
    pick_trial,
    register_arm,
    run_trial,
    summarize_arm,
)
from neve_tune.studies._policy import AnnealingNeVePolicy
from neve_tune.studies._records import describe_mean_loss_pick
from neve_tune.studies._spec import sample_configs
from tests.conftest import MlflowServer

# ---------------------------------------------------------------------------- protocol pieces (fast)


def _record(arm: str, cid: int, *, reason: str, epochs: int, test: float, **final: float) -> TrialRecord:
    return TrialRecord(arm, cid, {"config_id": cid}, epochs, reason, {"test/acc": test, **final})


def test_every_arm_gets_the_same_configurations() -> None:
    digits = get_study("digits")
    space = {"lr": LogUniform(1e-3, 1.0), "width": Choice((8, 16, 32))}
    first, again = sample_configs(space, 12, seed=5), sample_configs(space, 12, seed=5)
    assert first == again and [c["config_id"] for c in first] == list(range(12))
    assert sample_configs(space, 12, seed=6) != first
    assert all(1e-3 <= c["lr"] <= 1.0 and c["width"] in (8, 16, 32) for c in first)
    assert len({c["lr"] for c in first}) == 12
    assert digits.configs(4, 0) == digits.configs(4, 0)


def test_budget_validation_and_overrides() -> None:
    budget = get_study("digits").budget
    assert budget.with_overrides(max_epochs=2).grace_period == 2  # ASHA's grace never exceeds the cap
    assert budget.with_overrides(trials=None).trials == budget.trials
    with pytest.raises(ValueError, match="val_fraction"):
        Budget(trials=1, max_epochs=1, val_fraction=0.0)
    with pytest.raises(ValueError, match="lr_schedule"):
        Budget(trials=1, max_epochs=1, lr_schedule="linear")


def test_registry_lists_and_rejects() -> None:
    assert {"digits", "cifar10", "cifar100", "imagenet100"} <= set(list_studies())
    with pytest.raises(UnknownStudyError, match="Unknown study 'mnist'. Known studies: cifar10, cifar100, digits"):
        get_study("mnist")
    assert get_study("neve_tune.studies.builtin.digits:STUDY") is get_study("digits")


def test_pick_rules_never_look_at_test_accuracy() -> None:
    # The highest test accuracy is always the trial the rule must NOT pick.
    pure = [
        _record("neve-pure", 0, reason="converged", epochs=9, test=0.99, **{"train/loss": 0.30}),
        _record("neve-pure", 1, reason="converged", epochs=12, test=0.90, **{"train/loss": 0.05}),
        _record("neve-pure", 2, reason="max_t", epochs=40, test=0.995, **{"train/loss": 0.01}),  # not converged
        _record("neve-pure", 3, reason="diverged", epochs=3, test=0.999, **{"train/loss": math.nan}),
    ]
    assert pick_trial("neve-pure", pure).config_id == 1
    # Nothing converged: the lowest train loss among the trials that did not diverge.
    slow = _record("neve-pure", 4, reason="max_t", epochs=40, test=0.999, **{"train/loss": 0.2})
    assert pick_trial("neve-pure", [slow, pure[2], pure[3]]).config_id == 2
    assert pick_trial("neve-pure", [pure[3]]) is None
    # neve: the lowest mean training loss (TSE / epochs) among converged and max_t trials alike, whatever
    # their TSE-EMA or final loss; pruned/stalled/diverged never.
    neve = [
        _record("neve", 0, reason="converged", epochs=20, test=0.90, **{"train/tse": 4.0, "train/tse_ema": 0.3}),
        _record("neve", 1, reason="max_t", epochs=50, test=0.80, **{"train/tse": 5.0, "train/tse_ema": 0.5}),
        _record("neve", 2, reason="pruned", epochs=4, test=0.999, **{"train/tse": 0.2, "train/tse_ema": 0.1}),
        _record("neve", 3, reason="stalled", epochs=9, test=0.999, **{"train/tse": 0.1, "train/tse_ema": 0.2}),
        _record("neve", 4, reason="diverged", epochs=3, test=0.999, **{"train/tse": math.nan}),
        _record("neve", 5, reason="converged", epochs=10, test=0.999, **{"train/tse": 2.5, "train/tse_ema": 0.9}),
    ]
    assert pick_trial("neve", neve).config_id == 1  # 5.0 / 50 = 0.1 beats 4.0 / 20 and 2.5 / 10
    assert pick_trial("neve", [*neve[2:5], neve[0]]).config_id == 0
    assert pick_trial("neve", neve[2:5]) is None
    assert describe_mean_loss_pick(neve) == (
        "lowest mean training loss over its epochs (TSE / epochs) among the 3 converged/max_t trials (validation-free)"
    )
    asha = [
        _record("asha", 0, reason="max_t", epochs=40, test=0.99, **{"val/acc": 0.95, "val/loss": 0.2}),
        _record("asha", 1, reason="pruned", epochs=4, test=0.999, **{"val/acc": 0.97, "val/loss": 0.3}),
        _record("asha", 2, reason="max_t", epochs=40, test=0.80, **{"val/acc": 0.97, "val/loss": 0.1}),
        _record("asha", 3, reason="error", epochs=1, test=1.0, **{"val/acc": 1.0}),
    ]
    assert pick_trial("asha", asha).config_id == 2  # tie on val acc -> lower val loss


def test_summary_row() -> None:
    records = [
        _record("asha", i, reason=r, epochs=e, test=t, **{"val/acc": v})
        for i, (r, e, t, v) in enumerate(
            [("max_t", 40, 0.96, 0.9), ("pruned", 4, 0.50, 0.5), ("pruned", 12, 0.90, 0.8), ("max_t", 40, 0.98, 0.95)]
        )
    ]
    summary = summarize_arm(ArmResult("asha", records, wall_time_s=12.34, train_fraction=0.9, max_epochs=40))
    assert summary.picked_config_id == 3 and summary.picked_test_acc == 0.98
    assert summary.median_test_acc == pytest.approx(0.93)
    assert (summary.min_test_acc, summary.max_test_acc) == (0.5, 0.98)
    assert summary.q1_test_acc == pytest.approx(0.8) and summary.q3_test_acc == pytest.approx(0.965)
    assert summary.trial_epochs == 96 and summary.stop_epochs == (4, 12, 40, 40)
    assert summary.stop_reasons == {"max_t": 2, "pruned": 2}
    fifo = summarize_arm(ArmResult("fifo", records, 20.0, 0.9, 40))
    md = comparison_markdown([summary, fifo])
    assert "| asha | 4 | 3 | 0.980 | 0.930 | 0.800-0.965 | 0.500-0.980 | 96 | 1.00 | 12.3 | 0.9 | 4-40 (med 26) |" in md
    assert "pick rule, asha: highest validation accuracy" in md
    header, first, _ = comparison_csv([summary, fifo]).splitlines()
    assert header.startswith("arm,trials,picked_config,picked_test_acc") and first.startswith("asha,4,3,0.980")


def test_bad_arm_and_backend_fail_before_anything_runs(tmp_path: Path) -> None:
    from neve_tune.studies import run_study

    with pytest.raises(StudyError, match="Unknown arm 'hyperband'"):
        run_study("digits", arms=["neve", "hyperband"], output_dir=tmp_path)
    with pytest.raises(StudyError, match="Unknown backend"):
        run_study("digits", backend="dask", output_dir=tmp_path)
    with pytest.raises(StudyError, match="Unknown arm 'hyperband'"):  # the options object, as the CLI passes it
        run_study("digits", StudyOptions(arms=["neve", "hyperband"], output_dir=tmp_path))
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------- arms, policies, backends (fast)


def test_each_arm_is_one_definition() -> None:
    budget = get_study("digits").budget
    neve, asha, fifo = (get_arm(name) for name in ARMS)
    assert get_arm(" NeVe ") is neve and list_arms()[:3] == list(ARMS)
    with pytest.raises(UnknownArmError, match=r"Unknown arm 'hyperband'\. The arms are: neve, asha, fifo"):
        get_arm("hyperband")
    assert (neve.val_fraction(budget), asha.val_fraction(budget), fifo.val_fraction(budget)) == (0.0, 0.1, 0.1)
    assert neve.train_fraction(budget) == 1.0 and asha.train_fraction(budget) == pytest.approx(0.9)
    assert (neve.objective, neve.direction, neve.mode) == ("train/tse_ema", "minimize", "min")
    assert (asha.objective, asha.direction, asha.mode) == ("val/acc", "maximize", "max")
    assert neve.policy is AnnealingNeVePolicy and asha.policy is fifo.policy is FixedSchedulePolicy
    assert get_arm("neve-pure").policy is NeVePolicy and "neve-pure" not in ARMS
    assert neve.uses_neve and not asha.uses_neve
    assert [a.external_stop_reason for a in (neve, asha, fifo)] == ["pruned", "pruned", "stopped"]
    assert [a.compute_reference for a in (neve, asha, fifo)] == [False, False, True]
    assert len({a.color for a in (neve, asha, fifo)}) == 3
    assert neve.params(budget)["scheduler"] == "NeVeScheduler + ASHAScheduler"
    assert neve.params(budget)["metric"] == "train/tse_ema" and neve.params(budget)["train_fraction"] == 1.0
    assert get_arm("neve-pure").params(budget)["scheduler"] == "NeVeScheduler"
    assert asha.params(budget)["metric"] == "val/acc" and fifo.params(budget)["scheduler"] == "FIFOScheduler"


def test_neve_arm_prunes_on_tse_ema_with_the_ecosystems_successive_halving() -> None:
    import optuna
    from ray.tune.schedulers import ASHAScheduler

    budget = get_study("mnist1d").budget
    scheduler = get_arm("neve").ray_scheduler(budget)
    base = scheduler.base_scheduler
    assert isinstance(base, ASHAScheduler) and (base.metric, base._mode) == ("train/tse_ema", "min")
    assert base._max_t == 60 and [r for r, _ in base._brackets[0]._rungs] == [36, 12, 4]  # grace 4, factor 3
    pruner = get_arm("neve").optuna_pruner(budget)
    assert isinstance(pruner.base_pruner, optuna.pruners.SuccessiveHalvingPruner)
    assert get_arm("neve-pure").ray_scheduler(budget).base_scheduler is None
    assert get_arm("neve-pure").optuna_pruner(budget).base_pruner is None


@pytest.fixture
def step_fifo() -> Any:
    """A new arm, registered for one test: FIFO under another name and colour, not the compute reference."""
    from neve_tune.studies import _arms

    arm = dataclasses.replace(
        get_arm("fifo"),
        name="fifo-b",
        display_name="fifo B",
        color="C4",
        compute_reference=False,
        pick_rule="highest validation accuracy, arm B",
    )
    register_arm(arm)
    yield arm
    _arms._REGISTERED.pop(arm.name)


def test_a_new_arm_is_one_registration(step_fifo: Any) -> None:
    from neve_tune.studies._plan import check_arms

    assert get_arm("fifo-b") is step_fifo and "fifo-b" in list_arms()
    with pytest.raises(ValueError, match="exists already"):
        register_arm(step_fifo)
    assert [a.name for a in check_arms(["neve", "fifo-b", "neve"])] == ["neve", "fifo-b"]
    records = [
        _record("fifo-b", i, reason="max_t", epochs=3, test=0.5, **{"val/acc": v}) for i, v in enumerate([0.2, 0.9])
    ]
    assert pick_trial("fifo-b", records).config_id == 1
    summary = summarize_arm(ArmResult("fifo-b", records, 1.0, 0.9, 3))
    assert summary.pick_rule == "highest validation accuracy, arm B" and not summary.compute_reference
    # the arm's one pick rule reaches the table's footnote and its MLflow params
    assert "pick rule, fifo-b: highest validation accuracy, arm B" in comparison_markdown([summary])
    assert step_fifo.params(get_study("digits").budget)["pick_rule"] == "highest validation accuracy, arm B"
    with pytest.raises(TypeError, match="TrialPolicy"):
        dataclasses.replace(step_fifo, name="bad", policy=object)


class _Silent:
    """A reporter that reports nowhere (the in-process backend below)."""

    def needs_state(self, epoch: int) -> bool:
        return False

    def restore(self, model: Any, optimizer: Any, neve: Any, extra: dict) -> int:
        return 0

    def report(self, metrics: dict, **kwargs: Any) -> None:
        pass


class InlineBackend(Backend):
    """A backend of one's own: every trial in turn, in this process (what `register_backend` is for)."""

    name = "inline"

    def run_arm(self, job: Any) -> ArmResult:
        import time

        t0 = time.perf_counter()
        for config in job.configs:
            trial_id = f"inline-{config['config_id']}"
            job.collector.started(trial_id, config)
            error = None
            try:
                run_trial(
                    job.spec, config, _Silent(), trial_id=trial_id,
                    on_epoch=lambda epoch, metrics, t=trial_id: job.collector.result(t, metrics),
                )  # fmt: skip
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
            job.collector.completed(trial_id, error=error)
        return job.result(time.perf_counter() - t0)


class _Recorder:
    """A backend that only records what a trial reports, checkpointing every epoch."""

    def __init__(self) -> None:
        self.reports: list[tuple[dict, bool, list[str], bool]] = []

    def needs_state(self, epoch: int) -> bool:
        return True

    def restore(self, model: Any, optimizer: Any, neve: Any, extra: dict) -> int:
        return 0

    def report(
        self, metrics: dict, *, neve: Any, model: Any, optimizer: Any, epoch: int, extra: dict, final: bool
    ) -> None:
        self.reports.append((dict(metrics), neve is not None, sorted(extra), final))


@pytest.mark.parametrize("arm", ARMS)
def test_run_trial_follows_its_arms_policy(arm: str) -> None:
    digits = get_study("digits")
    spec = TrialSpec("digits", arm, dataclasses.replace(digits.budget, max_epochs=2))
    recorder, seen = _Recorder(), []
    outcome = run_trial(spec, digits.configs(3, 0)[2], recorder, on_epoch=lambda e, m: seen.append((e, m)))
    assert outcome.epochs == len(recorder.reports) == len(seen) <= 2
    assert outcome.stop_reason in ("max_t", "converged", "diverged")
    *running, (last, with_neve, extra, final) = recorder.reports
    assert final and not any(r[3] for r in running) and last["stop_reason"] == outcome.stop_reason
    assert with_neve == (arm == "neve")
    assert {"epoch", "train/loss", "train/acc", "test/loss", "test/acc", "lr", "time/epoch_s"} <= set(last)
    if arm == "neve":  # no validation data; NeVe's metrics come with the backend's report, and are recorded
        assert not any(k.startswith(("val/", "monitor/", "neve/")) for k in last)
        assert "neve/model_velocity" in outcome.final and "neve/model_velocity" in seen[-1][1]
        assert extra == ["generator", "history", "speed"]  # the NeVe state is the backend's to checkpoint
    else:
        assert {"val/loss", "val/acc", "monitor/model_velocity"} <= set(last)
        assert extra == ["generator", "history", "monitor", "schedule", "speed"]
    # the training-speed signals: TSE and TSE-EMA of the epochs' mean training losses
    losses = [m["train/loss"] for _, m in seen]
    assert last["train/tse"] == pytest.approx(sum(losses))
    assert last["train/tse_ema"] == pytest.approx(sum(0.9 ** (len(losses) - 1 - i) * x for i, x in enumerate(losses)))


def test_backends_are_a_registry_keyed_by_their_name() -> None:
    pytest.importorskip("ray")
    pytest.importorskip("optuna")
    from neve_tune.studies import get_backend, list_backends, register_backend
    from neve_tune.studies._backend import _REGISTERED

    ray_backend, optuna_backend = get_backend("ray"), get_backend("optuna")
    assert issubclass(ray_backend, Backend) and issubclass(optuna_backend, Backend)
    assert (ray_backend.name, optuna_backend.name) == ("ray", "optuna") and list_backends()[:2] == ["ray", "optuna"]
    assert ray_backend().runs_here and not ray_backend(address="auto").runs_here and optuna_backend().runs_here
    with pytest.raises(StudyError, match=r"Unknown backend 'dask'; the backends are: ray, optuna\."):
        get_backend("dask")
    with pytest.raises(ValueError, match="A backend named 'ray' exists already"):
        register_backend(ray_backend)

    class Nameless(Backend):
        def run_arm(self, job: Any) -> Any:
            raise NotImplementedError

    with pytest.raises(ValueError, match="must set a class attribute name"):
        register_backend(Nameless)
    register_backend(InlineBackend)
    try:
        assert get_backend("inline") is InlineBackend and list_backends()[-1] == "inline"
    finally:
        _REGISTERED.pop("inline")


def test_a_backend_of_ones_own_runs_a_study(tmp_path: Path) -> None:
    from neve_tune.studies import run_study

    result = run_study(
        "digits", backend=InlineBackend(), arms=["neve", "fifo"], trials=2, max_epochs=2, track=False,
        output_dir=tmp_path, progress=False,
    )  # fmt: skip
    for arm in ("neve", "fifo"):
        records = result.arms[arm].records
        assert [r.config_id for r in records] == [0, 1] and all(r.epochs >= 1 for r in records)
        assert all(r.stop_reason in ("max_t", "converged", "diverged") for r in records)
    assert [s.trial_epochs for s in result.summaries][1] == 4 and not result.failures
    import torch

    if torch.cuda.device_count() == 0:  # the trials run here (Backend.runs_here): a GPU request is refused first
        with pytest.raises(StudyError, match=r"asks for 1 GPU\(s\), but this machine has 0"):
            run_study("digits", backend=InlineBackend(), gpus_per_trial=1, track=False, output_dir=tmp_path)


def test_optuna_threads_never_pop_the_same_enqueued_configuration(tmp_path: Path) -> None:
    optuna = pytest.importorskip("optuna")
    import threading
    import time
    from collections import Counter

    from neve_tune.studies._optuna_backend import study_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=study_storage(tmp_path))
    for i in range(16):
        study.enqueue_trial({"x": float(i)}, user_attrs={"config_id": i})
    seen: Counter = Counter()
    lock = threading.Lock()

    def objective(trial: Any) -> float:
        x = trial.suggest_float("x", 0, 100)
        with lock:
            seen[trial.user_attrs["config_id"]] += 1
        time.sleep(0.02)
        return x

    study.optimize(objective, n_trials=16, n_jobs=8)
    assert seen == Counter(range(16)) and {t.state.name for t in study.trials} == {"COMPLETE"}


# ---------------------------------------------------------------------------- end to end (Ray, MLflow)


def _tiny_digits() -> Any:
    """digits with ASHA able to prune within 4 epochs (grace 1, reduction factor 2)."""
    base = get_study("digits")
    return dataclasses.replace(base, budget=dataclasses.replace(base.budget, grace_period=1, reduction_factor=2))


def _tree(client: Any, experiment_id: str, parent: str) -> list:
    return client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")


def _steps(client: Any, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


@pytest.mark.slow
@pytest.mark.server
def test_digits_study_end_to_end_against_a_real_mlflow_server(ray_session: Any, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from neve_tune.studies import load_study, run_study

    server = MlflowServer(tmp_path / "server").start()
    try:
        result = run_study(
            _tiny_digits(), trials=2, max_epochs=4, tracking_uri=server.uri, output_dir=tmp_path / "out", progress=False
        )
        client = MlflowClient(server.uri)
        exp = client.get_experiment_by_name("neve-tune-digits")
        study = client.get_run(result.study_run_id)
        assert study.info.status == "FINISHED" and study.data.tags["role"] == "study"
        assert study.data.params["trials"] == "2" and study.data.params["max_epochs"] == "4"
        assert {a.path for a in client.list_artifacts(study.info.run_id)} >= {"comparison.md", "comparison.csv"}
        assert {a.path for a in client.list_artifacts(study.info.run_id, "plots")} == {
            "plots/test_acc_vs_epochs.png",
            "plots/compute_per_arm.png",
        }
        arm_runs = {r.data.tags["arm"]: r for r in _tree(client, exp.experiment_id, study.info.run_id)}
        assert set(arm_runs) == set(ARMS)
        configs_by_arm = {}
        for arm, arm_run in arm_runs.items():
            assert arm_run.info.status == "FINISHED" and arm_run.data.tags["role"] == "arm"
            assert arm_run.data.params["train_fraction"] == ("1.0" if arm == "neve" else "0.9")
            trials = _tree(client, exp.experiment_id, arm_run.info.run_id)
            assert len(trials) == 2
            configs_by_arm[arm] = sorted(
                (r.data.params["config_id"], r.data.params["lr"], r.data.params["weight_decay"], r.data.params["width"])
                for r in trials
            )
            picked = [r for r in trials if r.data.tags.get("picked") == "true"]
            assert len(picked) == 1
            for run in trials:
                tags, metrics = run.data.tags, run.data.metrics
                assert run.info.status == "FINISHED", (arm, run.info.run_name, run.info.status)
                assert tags["role"] == "trial" and tags["arm"] == arm
                assert tags["mlflow.parentRunId"] == arm_run.info.run_id
                stop_epoch = int(tags["neve/stop_epoch"])
                reason = tags["neve/stop_reason"]
                assert 1 <= stop_epoch <= 4
                allowed = {
                    "neve": {"converged", "stalled", "collapsed", "diverged", "max_t", "pruned"},
                    "asha": {"pruned", "diverged", "max_t"},
                }
                assert reason in allowed.get(arm, {"max_t", "diverged"})
                if reason == "max_t":
                    assert stop_epoch == 4
                # Per-epoch metrics with step = epoch (a pruned trial may log the epoch it was computing).
                assert _steps(client, run.info.run_id, "test/acc")[:stop_epoch] == list(range(1, stop_epoch + 1))
                common = {"train/loss", "train/acc", "test/loss", "test/acc", "lr", "epoch", "time/epoch_s"}
                assert common <= set(metrics)
                assert any(k.startswith("layer_velocity/features.") for k in metrics)
                if arm == "neve":
                    assert {"neve/model_velocity", "neve/lr", "neve/num_decays", "neve/converged"} <= set(metrics)
                    assert not any(k.startswith("val/") for k in metrics)  # no validation data at all
                else:
                    assert {"val/loss", "val/acc", "monitor/model_velocity"} <= set(metrics)
                    assert not any(k.startswith("neve/") for k in metrics)
                plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
                assert plots == {"plots/velocity_curve.png", "plots/layer_velocity_heatmap.png"}
        # The same configurations in every arm.
        assert configs_by_arm["neve"] == configs_by_arm["asha"] == configs_by_arm["fifo"]

        # The returned comparison matches the run, and `study compare` rebuilds the same rows from MLflow.
        by_arm = {s.arm: s for s in result.summaries}
        assert by_arm["fifo"].trial_epochs == 8 and by_arm["fifo"].stop_reasons == {"max_t": 2}
        assert by_arm["neve"].train_fraction == 1.0 and by_arm["asha"].train_fraction == pytest.approx(0.9)
        for arm in ARMS:
            assert by_arm[arm].trials == 2
            assert by_arm[arm].trial_epochs == sum(r.epochs for r in result.arms[arm].records)
            assert float(arm_runs[arm].data.metrics["trial_epochs"]) == by_arm[arm].trial_epochs
        stored = load_study(server.uri, "neve-tune-digits")
        again = {a.arm: summarize_arm(a) for a in stored.arms}
        for arm in ARMS:
            got, want = again[arm], by_arm[arm]
            assert (got.picked_config_id, got.trial_epochs, got.stop_epochs) == (
                want.picked_config_id,
                want.trial_epochs,
                want.stop_epochs,
            )
            assert got.picked_test_acc == pytest.approx(want.picked_test_acc)
            assert got.median_test_acc == pytest.approx(want.median_test_acc)
        assert (result.output_dir / "comparison.md").read_text() == result.markdown()
    finally:
        server.stop()


def test_scoped_env_puts_back_what_was_there_even_after_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from neve_tune._env import scoped_env

    monkeypatch.setenv("NEVE_TEST_SET", "mine")
    monkeypatch.delenv("NEVE_TEST_UNSET", raising=False)
    values = {"NEVE_TEST_SET": "study", "NEVE_TEST_UNSET": "study"}
    with scoped_env(values, override=False):
        assert (os.environ["NEVE_TEST_SET"], os.environ["NEVE_TEST_UNSET"]) == ("mine", "study")
    with pytest.raises(RuntimeError), scoped_env(values):
        assert os.environ["NEVE_TEST_SET"] == "study"
        raise RuntimeError
    assert os.environ["NEVE_TEST_SET"] == "mine" and "NEVE_TEST_UNSET" not in os.environ


def test_the_ray_backend_sets_its_tune_settings_only_while_a_study_runs(
    ray_session: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A study turns off Tune's automatic loggers (it adds CSV and JSON itself); a ``Tuner`` the caller runs in
    the same process afterwards must get them back, and a setting the caller made stays theirs."""
    from neve_tune.studies import get_backend

    monkeypatch.delenv("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", raising=False)
    monkeypatch.setenv("RAY_AIR_NEW_OUTPUT", "1")
    backend = get_backend("ray")()
    backend.open(Budget(trials=1, max_epochs=1))
    assert os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] == "1" and os.environ["RAY_AIR_NEW_OUTPUT"] == "1"
    backend.close()
    assert "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS" not in os.environ and os.environ["RAY_AIR_NEW_OUTPUT"] == "1"
    assert ray_session.is_initialized()  # the session's Ray, which the backend did not start: still up


@pytest.mark.slow
def test_a_trial_that_raises_leaves_its_run_failed_and_the_study_goes_on(ray_session: Any, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from neve_tune.studies import run_study

    base = get_study("digits")

    def build_model(config: dict) -> Any:
        model = base.build_model(config)
        if config["config_id"] == 1:
            calls = {"n": 0}

            def fail_in_epoch_two(module: Any, inputs: Any) -> None:
                calls["n"] += module.training
                if calls["n"] > 25:  # an epoch of fifo is 19 training batches
                    raise RuntimeError("simulated failure in epoch 2")

            model.register_forward_pre_hook(fail_in_epoch_two)
        return model

    failing = dataclasses.replace(base, name="digits-failing", build_model=build_model)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_study(
        failing, arms=["fifo"], trials=2, max_epochs=3, tracking_uri=uri, output_dir=tmp_path, progress=False
    )
    records = {r.config_id: r for r in result.arms["fifo"].records}
    assert records[1].stop_reason == "error" and records[1].epochs == 1
    assert records[0].stop_reason == "max_t" and records[0].epochs == 3
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("neve-tune-digits-failing")
    runs = {r.data.params.get("config_id"): r for r in client.search_runs([exp.experiment_id], "tags.role = 'trial'")}
    assert runs["1"].info.status == "FAILED"
    assert "simulated failure in epoch 2" in runs["1"].data.tags["error"]
    assert _steps(client, runs["1"].info.run_id, "train/loss") == [1]  # what it did before failing is kept
    assert runs["0"].info.status == "FINISHED"
    assert client.get_run(result.study_run_id).info.status == "FINISHED"


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::neve_tune.mlflow.MlflowUnavailableWarning")
@pytest.mark.server
def test_the_mlflow_server_going_away_mid_study_does_not_kill_the_study(ray_session: Any, tmp_path: Path) -> None:
    """The server is killed at the first result: trials whose runs exist, trials that start while it is down,
    trials ASHA stops (their worker is torn down at once) all go on; replayed later, the store holds every
    trial and every epoch, each run ended as the study ended it."""
    from mlflow import MlflowClient
    from ray import tune

    from neve_tune.mlflow._replay import replay_folder
    from neve_tune.studies import get_backend, run_study

    server = MlflowServer(tmp_path / "server").start()

    class KillServer(tune.Callback):  # Tune pickles its callbacks: it holds the server's process group id only
        def __init__(self, pgid: int) -> None:
            self.pgid, self.done = pgid, False

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            if not self.done:  # at the first result: 2 trials run, the third starts while the server is down
                self.done = True
                os.killpg(self.pgid, signal.SIGTERM)  # the server this test started

    try:
        with pytest.warns(Warning) as caught:
            result = run_study(
                _tiny_digits(),  # ASHA stops a trial at epoch 1 or 2
                arms=["asha"],
                trials=3,
                max_epochs=2,
                tracking_uri=server.uri,
                output_dir=tmp_path / "out",
                progress=False,
                backend=get_backend("ray")(callbacks=[KillServer(server.proc.pid)]),  # a Ray option: on the backend
                mlflow_drain_timeout_s=0,  # gone for good here: one try at the end (the wait is tested in test_mlflow)
            )
        assert any("unavailable" in str(w.message) for w in caught)
        records = result.arms["asha"].records  # the study ran to the end: every trial trained
        assert len(records) == 3 and {r.stop_reason for r in records} <= {"pruned", "max_t", "diverged"}
        assert (result.output_dir / "comparison.csv").exists()

        # Nothing is lost: with the server back (same database), the saved records complete the tree.
        server.stop()  # reap the killed process group
        server.start()
        report = replay_folder(tmp_path / "out" / "mlflow-unsent")
        assert report.sent and report.complete, report.summary()
        client = MlflowClient(server.uri)
        exp = client.get_experiment_by_name("neve-tune-digits")
        [study] = client.search_runs([exp.experiment_id], "tags.role = 'study'")
        [arm] = client.search_runs([exp.experiment_id], "tags.role = 'arm'")
        assert (study.info.run_id, study.info.status, arm.info.status) == (result.study_run_id, "FINISHED", "FINISHED")
        assert arm.data.metrics["trial_epochs"] == sum(r.epochs for r in records)
        assert {a.path for a in client.list_artifacts(study.info.run_id)} >= {"comparison.md", "comparison.csv"}
        runs = {r.data.tags["trial_id"]: r for r in client.search_runs([exp.experiment_id], "tags.role = 'trial'")}
        assert sorted(runs) == sorted(r.trial_id for r in records)  # one run per trial, none twice
        for record in records:
            run = runs[record.trial_id]
            assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == arm.info.run_id
            assert run.data.tags["neve/stop_reason"] == record.stop_reason
            assert run.data.tags["neve/stop_epoch"] == str(record.epochs)
            assert run.data.params["config_id"] == str(record.config_id)
            every = list(range(1, record.epochs + 1))
            for key in ("train/loss", "lr", "layer_velocity/features.0"):  # a stopped trial may log one epoch more
                assert _steps(client, run.info.run_id, key)[: record.epochs] == every, (record, key)
            history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "test/acc"))
            assert history[: record.epochs] == record.test_acc_curve  # the values the study itself saw
            plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
            assert plots == {"plots/velocity_curve.png", "plots/layer_velocity_heatmap.png"}
    finally:
        server.stop()


@pytest.mark.slow
def test_optuna_backend_runs_the_same_protocol(tmp_path: Path) -> None:
    pytest.importorskip("optuna")
    import optuna
    from mlflow import MlflowClient

    from neve_tune.studies import run_study

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_study(
        _tiny_digits(), backend="optuna", trials=3, max_epochs=4, tracking_uri=uri, output_dir=tmp_path, progress=False
    )
    from neve_tune.studies._optuna_backend import study_storage

    assert not (tmp_path / "optuna" / "optuna.db").exists()  # issue 12: a journal file, not SQLite
    storage = study_storage(tmp_path / "optuna")
    studies = {s.study_name.split("-")[1]: s for s in optuna.get_all_study_summaries(storage)}
    assert set(studies) == set(ARMS)
    neve = optuna.load_study(study_name=studies["neve"].study_name, storage=storage)
    # NeVe's converged (or capped) trials COMPLETE with their stop reason; diverged, stalled, collapsed and
    # those the successive-halving base pruner cut (on TSE-EMA, the reported value) are PRUNED.
    for trial in neve.trials:
        reason = trial.user_attrs["neve_stop_reason"]
        failed = reason in ("diverged", "stalled", "collapsed", "pruned")
        assert trial.state == (optuna.trial.TrialState.PRUNED if failed else optuna.trial.TrialState.COMPLETE)
        if trial.state == optuna.trial.TrialState.COMPLETE:  # its value is its final TSE-EMA
            assert trial.value == pytest.approx(trial.intermediate_values[max(trial.intermediate_values)])
    fifo = optuna.load_study(study_name=studies["fifo"].study_name, storage=storage)
    assert [t.state.name for t in fifo.trials] == ["COMPLETE"] * 3
    # The same enqueued configurations in every arm.
    params = {arm: sorted(tuple(sorted(t.params.items())) for t in optuna.load_study(
        study_name=s.study_name, storage=storage).trials) for arm, s in studies.items()}  # fmt: skip
    assert params["neve"] == params["asha"] == params["fifo"]
    assert {s.arm: s.trials for s in result.summaries} == {"neve": 3, "asha": 3, "fifo": 3}

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("neve-tune-digits")
    trials = client.search_runs([exp.experiment_id], "tags.role = 'trial'")
    assert len(trials) == 9 and {r.info.status for r in trials} == {"FINISHED"}
    for run in trials:
        assert {"plots/velocity_curve.png", "plots/layer_velocity_heatmap.png"} == {
            a.path for a in client.list_artifacts(run.info.run_id, "plots")
        }
        epochs = int(run.data.tags["neve/stop_epoch"])
        assert _steps(client, run.info.run_id, "train/loss") == list(range(1, epochs + 1))


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


@pytest.mark.slow
def test_a_crashed_trial_resumes_from_its_checkpoint_with_identical_numbers(ray_session: Any, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from neve_tune.studies import run_study

    base = get_study("digits")
    marker = tmp_path / "crashed-once"

    def build_model(config: dict) -> Any:
        model = base.build_model(config)
        calls = {"n": 0}

        def crash_once(module: Any, inputs: Any) -> None:
            calls["n"] += module.training
            if calls["n"] > 30 and not marker.exists():  # in epoch 2 of the first attempt only
                marker.write_text("crashed")
                raise RuntimeError("simulated crash")

        model.register_forward_pre_hook(crash_once)
        return model

    budget = dataclasses.replace(base.budget, checkpoint_every=1, max_failures=1)
    flaky = dataclasses.replace(base, name="digits-flaky", build_model=build_model, budget=budget)
    steady = dataclasses.replace(base, name="digits-steady", budget=budget)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = {"arms": ["neve"], "trials": 1, "max_epochs": 4, "tracking_uri": uri, "progress": False}
    crashed = run_study(flaky, output_dir=tmp_path / "flaky", **common)
    assert marker.exists()
    reference = run_study(steady, output_dir=tmp_path / "steady", **common)
    [a], [b] = crashed.arms["neve"].records, reference.arms["neve"].records
    assert a.stop_reason == b.stop_reason != "error" and a.epochs == b.epochs == 4
    # Resumed from the epoch-1 checkpoint (model, optimizer, NeVe state, data order): the very same numbers.
    for key in ("train/loss", "test/acc", "neve/model_velocity", "lr"):
        assert _same(a.final[key], b.final[key]), key
    assert [acc for _, acc in a.test_acc_curve] == [acc for _, acc in b.test_acc_curve]

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("neve-tune-digits-flaky")
    [run] = client.search_runs([exp.experiment_id], "tags.role = 'trial'")  # the restart reopened its run
    assert run.info.status == "FINISHED" and run.data.tags["restarts"] == "1" and "error" not in run.data.tags
    # Epoch 1 was logged once: the second attempt started at epoch 2, from the checkpoint, not from scratch.
    assert _steps(client, run.info.run_id, "neve/model_velocity") == [1, 2, 3, 4]


# --- issue 12: stalled and collapsed trials are never picked, and the pick-rule line says what happened ----


def test_neve_pure_arm_never_picks_stalled_or_collapsed_trials_and_says_what_happened() -> None:
    from neve_tune.studies._arms import NEVE_PURE

    stalled = _record("neve-pure", 0, reason="stalled", epochs=6, test=0.12, **{"train/loss": 0.01})
    collapsed = _record("neve-pure", 1, reason="collapsed", epochs=5, test=0.10, **{"train/loss": 0.001})
    capped = _record("neve-pure", 2, reason="max_t", epochs=50, test=0.90, **{"train/loss": 0.2})
    converged = _record("neve-pure", 3, reason="converged", epochs=12, test=0.95, **{"train/loss": 0.3})
    # The lowest train losses belong to the stalled and collapsed trials: never picked.
    assert pick_trial("neve-pure", [stalled, collapsed, converged, capped]).config_id == 3
    assert pick_trial("neve-pure", [stalled, collapsed, capped]).config_id == 2
    assert pick_trial("neve-pure", [stalled, collapsed]) is None

    def line(records: list[TrialRecord]) -> str:
        return summarize_arm(ArmResult("neve-pure", records, 1.0, 1.0, 50), NEVE_PURE).pick_rule

    assert line([stalled, converged]) == "lowest final train loss among the 1 converged trials (validation-free)"
    assert line([stalled, collapsed, capped]) == (
        "no trial converged: picked the lowest final train loss among the 1 trials that ended max_t (validation-free)"
    )
    assert line([stalled, collapsed]).startswith("no trial converged, and none ran to its cap")
    summary = summarize_arm(ArmResult("neve-pure", [stalled, collapsed, capped], 1.0, 1.0, 50), NEVE_PURE)
    assert summary.stop_reasons == {"stalled": 1, "collapsed": 1, "max_t": 1}
    md = comparison_markdown([summary])
    assert "pick rule, neve-pure: no trial converged: picked" in md and "among converged trials" not in md


def test_the_neve_pick_reads_a_memorizing_trials_mean_loss_up_to_its_restored_epoch() -> None:
    """A trial that memorised drove its loss down after its flip minimum (epoch 4): over all its 12 epochs its
    mean loss (0.35) beats the clean learner's (0.5), but up to epoch 4, whose weights NeVe restored, it is
    0.6: the clean learner is picked. Without the curve (an old store) the whole mean is used."""
    from neve_tune.studies._records import pick_lowest_mean_loss

    clean = _record("neve", 0, reason="converged", epochs=10, test=0.9, **{"train/tse": 5.0})
    memorised = _record(
        "neve", 1, reason="memorizing", epochs=12, test=0.7, **{"train/tse": 4.2, "neve/flip_min_epoch": 4}
    )
    memorised.tse_curve = [(e, 0.6 * e) for e in range(1, 5)] + [(e, 2.4 + 0.225 * (e - 4)) for e in range(5, 13)]
    assert pick_lowest_mean_loss([clean, memorised]) is clean
    memorised.tse_curve = []
    assert pick_lowest_mean_loss([clean, memorised]) is memorised
    memorised.tse_curve = [(4, 1.6)]  # it learned faster than the clean one before memorising: 0.4 < 0.5
    assert pick_lowest_mean_loss([clean, memorised]) is memorised
