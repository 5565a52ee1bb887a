"""NeVeScheduler composed with Ray Tune's own ASHA and HyperBand, ranking a validation-free signal.

Real ``Tuner`` runs (local Ray, 2 CPUs) of tiny function trials. Each trial plays a scripted training
curve: its ``train_loss`` per epoch (the ranking signal, which differs by configuration) and the NeVe
metrics its own ``NeVe`` would report (the converged/diverged flags, ``neve.metrics()``'s keys). The
trials checkpoint every epoch, so HyperBand can pause and resume them and ``Tuner.restore`` can continue
them.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import tempfile
import time

import pytest
from ray import tune
from ray.train._internal.storage import StorageContext
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, HyperBandScheduler, TrialScheduler

from neve_tune import StopReason, keys
from neve_tune.ray import NeVeScheduler, StopInfo
from tests.readme import readme_example

CONTINUE, STOP = TrialScheduler.CONTINUE, TrialScheduler.STOP
STOP_REASON, STOP_EPOCH = keys.STOP_REASON, keys.STOP_EPOCH


def scripted_trainable(config: dict) -> None:
    """Report ``config["losses"]`` epoch by epoch with NeVe-shaped metrics; resume from the checkpoint."""
    config = {**config.get("cfg", {}), **{k: v for k, v in config.items() if k != "cfg"}}
    start = 0
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        time.sleep(config.get("sleep", 0.0))
    if checkpoint is not None:
        with checkpoint.as_directory() as folder, open(os.path.join(folder, "state.json")) as f:
            start = json.load(f)["epoch"]
    for epoch in range(start + 1, len(config["losses"]) + 1):
        loss = config["losses"][epoch - 1]
        diverged = epoch >= config.get("diverge_at", math.inf)
        velocity = math.nan if diverged else 0.5 / epoch
        converged = float(epoch >= config.get("converge_at", math.inf))
        metrics = {
            "train_loss": loss,
            "score": -loss * config.get("score_sign", -1.0),  # the user's objective, not the ranking signal
            "start_epoch": start,
            keys.EPOCH: float(epoch),
            keys.MODEL_VELOCITY: velocity,
            keys.VELOCITY_CHANGE: 0.01 / epoch,
            keys.CONVERGED: converged,
            keys.DIVERGED: float(diverged),
            keys.STALLED: 0.0,
            keys.COLLAPSED: 0.0,
        }
        with tempfile.TemporaryDirectory() as folder:
            with open(os.path.join(folder, "state.json"), "w") as f:
                json.dump({"epoch": epoch}, f)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
        marker = config.get("fail_marker")
        if marker and epoch == config["fail_at"] and not os.path.exists(marker):
            open(marker, "w").close()  # fail once: the marker survives the restart
            raise RuntimeError(f"injected failure after epoch {epoch}")


def _by_name(results) -> dict:
    return {r.config["cfg"]["name"]: r for r in results}


def _reasons(by_name: dict) -> dict[str, tuple[str, int]]:
    return {name: (r.metrics[STOP_REASON], r.metrics[STOP_EPOCH]) for name, r in by_name.items()}


def _run_config(tmp_path, name: str, **kwargs) -> tune.RunConfig:
    return tune.RunConfig(storage_path=str(tmp_path), name=name, verbose=0, **kwargs)


def _configs(**curves: dict) -> list[dict]:
    return [{"name": name, **curve} for name, curve in curves.items()]


# ----------------------------------------------------------------------------------- construction
def test_bad_bases_are_refused_with_the_fix():
    asha = ASHAScheduler(metric="train_loss", mode="min", max_t=8)
    with pytest.raises(ValueError, match="must not be another NeVeScheduler"):
        NeVeScheduler(base_scheduler=NeVeScheduler())
    with pytest.raises(ValueError, match="time_attr='time_total_s'.*time_attr='training_iteration'"):
        NeVeScheduler(base_scheduler=ASHAScheduler(time_attr="time_total_s", metric="train_loss", mode="min"))
    with pytest.raises(ValueError, match="metric='train_loss' but no mode"):
        NeVeScheduler(base_scheduler=ASHAScheduler(metric="train_loss"))
    with pytest.raises(TypeError, match="TrialScheduler"):
        NeVeScheduler(base_scheduler="asha")
    composite = NeVeScheduler(base_scheduler=asha)
    assert composite.base_scheduler is asha
    assert repr(composite).endswith("base_scheduler=<AsyncHyperBandScheduler metric='train_loss' mode='min'>)")
    assert "Using AsyncHyperBand" in composite.debug_string()


def test_the_base_keeps_its_own_metric_and_one_without_adopts_ours():
    asha = ASHAScheduler(metric="train_loss", mode="min")
    composite = NeVeScheduler(base_scheduler=asha)
    assert composite.set_search_properties("score", "max")  # TuneConfig's objective
    assert (composite.metric, composite.mode) == ("score", "max")
    assert (asha.metric, asha._mode) == ("train_loss", "min")  # the ranking signal is untouched

    bare = ASHAScheduler()
    NeVeScheduler(metric="train_loss", mode="min", base_scheduler=bare)
    assert (bare.metric, bare._mode) == ("train_loss", "min")
    later = ASHAScheduler()
    NeVeScheduler(base_scheduler=later).set_search_properties("train_loss", "min")
    assert (later.metric, later._mode) == ("train_loss", "min")
    # A conflict on our own metric is refused, as ASHA refuses it.
    assert not NeVeScheduler(metric="a", base_scheduler=ASHAScheduler()).set_search_properties("b", None)


def _result(it: int, loss: float) -> dict:
    """A flat result as Tune passes it, with the keys of `neve.metrics()` (tests/test_ray_scheduler.py feeds
    real ones): the trial's NeVe says continue."""
    flags = dict.fromkeys(keys.DECISION_FLAGS.values(), 0.0)
    return {"training_iteration": it, "train_loss": loss, keys.EPOCH: float(it), keys.MODEL_VELOCITY: 0.5, **flags}


def test_a_base_stop_is_pruned_below_the_bases_cap_and_max_t_at_it():
    asha = ASHAScheduler(metric="train_loss", mode="min", max_t=4, grace_period=1, reduction_factor=2)
    scheduler = NeVeScheduler(base_scheduler=asha)  # no max_t of its own: the base's cap applies
    first, second, third = (Trial("train_fn", stub=True) for _ in range(3))
    for trial in (first, second, third):
        scheduler.on_trial_add(None, trial)
    assert scheduler.on_trial_result(None, first, _result(1, 0.5)) == CONTINUE  # sets rung 1
    assert scheduler.on_trial_result(None, second, _result(1, 0.9)) == STOP  # below rung 1's median
    assert scheduler.stop_info(second.trial_id).reason is StopReason.PRUNED
    for it in (2, 3):
        assert scheduler.on_trial_result(None, first, _result(it, 0.5 / it)) == CONTINUE
    assert scheduler.on_trial_result(None, first, _result(4, 0.1)) == STOP  # ASHA's max_t=4
    assert scheduler.stop_info(first.trial_id) == StopInfo(StopReason.MAX_T, 4, 4.0, 0.5)
    # Tune removing a pending trial by itself (not from inside a base hook) records nothing.
    scheduler.on_trial_remove(None, third)
    assert scheduler.stop_info(third.trial_id) is None


def test_save_and_restore_carry_the_base_and_its_rungs(tmp_path):
    asha = ASHAScheduler(metric="train_loss", mode="min", max_t=8, grace_period=1, reduction_factor=2)
    scheduler = NeVeScheduler(base_scheduler=HyperBandScheduler(metric="train_loss", mode="min"))
    scheduler.save(str(tmp_path / "hyperband.pkl"))  # HyperBand holds lambdas: saved with cloudpickle
    scheduler = NeVeScheduler(base_scheduler=asha)
    trial = Trial("train_fn", stub=True)
    scheduler.on_trial_add(None, trial)
    scheduler.on_trial_result(None, trial, _result(1, 0.5))
    scheduler.save(str(tmp_path / "sched.pkl"))
    other = NeVeScheduler()
    other.restore(str(tmp_path / "sched.pkl"))
    assert other.base_scheduler is not asha and other.base_scheduler.metric == "train_loss"
    assert dict(other.base_scheduler._brackets[0]._rungs)[1] == {trial.trial_id: -0.5}
    late = Trial("train_fn", stub=True)
    other.on_trial_add(None, late)
    assert other.on_trial_result(None, late, _result(1, 0.9)) == STOP  # ranked against the restored rung


def _asha() -> ASHAScheduler:
    return ASHAScheduler(metric="train_loss", mode="min", max_t=8, grace_period=1, reduction_factor=2)


class _Controller:
    """What ``FIFOScheduler.choose_trial_to_run`` (ASHA's) reads of Tune's controller: its trials."""

    def __init__(self, trials: list[Trial]) -> None:
        self.trials = trials

    def get_trials(self) -> list[Trial]:
        return self.trials


def _rungs(asha: ASHAScheduler) -> dict:
    return {milestone: dict(recorded) for milestone, recorded in asha._brackets[0]._rungs if recorded}


def test_the_docs_asha_example_prunes_on_the_training_loss_and_names_a_missing_one():
    """docs/ray.md "ray-asha": ASHA inside NeVe, fed the results its trials report, cuts the worse trial at
    its first rung (reason "pruned"), and a result without ``train_loss`` fails with the key's name."""
    ns: dict = {}
    exec(readme_example("ray-asha"), ns)
    scheduler = ns["scheduler"]
    good, bad = Trial("train_fn", stub=True), Trial("train_fn", stub=True)
    for trial in (good, bad):
        scheduler.on_trial_add(None, trial)
    assert scheduler.on_trial_result(None, good, _result(3, 0.4)) == CONTINUE  # the first at rung 3 goes on
    assert scheduler.on_trial_result(None, bad, _result(3, 0.9)) == STOP
    assert scheduler.stop_info(bad.trial_id).reason is StopReason.PRUNED
    no_loss = {k: v for k, v in _result(4, 0.4).items() if k != "train_loss"}
    with pytest.raises(ValueError, match="ranks trials on 'train_loss'"):
        scheduler.on_trial_result(None, good, no_loss)


def test_only_tunes_own_decision_only_result_hooks_skip_the_forwarding_bookkeeping():
    """ASHA's results go straight to it (the per-result path); HyperBand's result hook stops paused trials
    through the controller, and a subclass may do anything: theirs run with ``forwarding`` true."""

    class Custom(ASHAScheduler):
        def on_trial_result(self, tune_controller, trial, result):  # type: ignore[no-untyped-def]
            return super().on_trial_result(tune_controller, trial, result)

    hyperband = HyperBandScheduler(metric="train_loss", mode="min", max_t=8)
    links = {name: NeVeScheduler(base_scheduler=b)._base_link for name, b in (("asha", _asha()), ("hb", hyperband))}
    links["custom"] = NeVeScheduler(base_scheduler=Custom(metric="train_loss", mode="min", max_t=8))._base_link
    assert {name: link.result_only for name, link in links.items()} == {"asha": True, "hb": False, "custom": False}


@pytest.mark.ray
@pytest.mark.usefixtures("ray_session")
def test_the_bases_state_is_written_when_it_must_survive_a_restore_not_on_every_result(tmp_path):
    """Trials with Tune's real storage context. The state file is written at the first add, then not for
    results (within the interval), nor for a completion while trials are live; at once for an error, for
    the end of the last live trial and for save(). A copy pickled at construction (what Tuner.restore
    gives back) loads it at its first add: the rungs are back, exactly."""
    storage = StorageContext(storage_path=str(tmp_path), experiment_dir_name="exp")
    scheduler = NeVeScheduler(base_scheduler=_asha())
    pickled_at_construction = pickle.dumps(scheduler)
    link = scheduler._base_link
    link.persist_every_s = 3600.0
    first, second, third = (Trial("train_fn", stub=True, storage=storage) for _ in range(3))
    for trial in (first, second, third):
        scheduler.on_trial_add(None, trial)
    path = link.state_file()
    assert path is not None and os.path.dirname(path) == storage.experiment_driver_staging_path
    assert link.writes == 1 and os.path.exists(path)
    for it in range(1, 5):
        for trial, loss in ((first, 0.5), (second, 0.4), (third, 0.45)):
            assert scheduler.on_trial_result(None, trial, _result(it, loss / it)) == CONTINUE
    scheduler.on_trial_complete(None, first, _result(4, 0.125))
    assert link.writes == 1  # 12 results and a completion: nothing written
    scheduler.on_trial_error(None, second)
    assert link.writes == 2  # an error: resume_errored will re-run it against these rungs
    rungs = _rungs(scheduler.base_scheduler)
    assert rungs[4] == {first.trial_id: -0.125, second.trial_id: -0.1, third.trial_id: -0.1125}

    restored = pickle.loads(pickled_at_construction)
    assert _rungs(restored.base_scheduler) == {}
    restored.on_trial_add(None, second)  # Tuner.restore re-adds the errored trial
    assert _rungs(restored.base_scheduler) == rungs
    # A new trial is ranked against the restored rung 4 (cutoff: loss 0.1125 at reduction factor 2).
    late = Trial("train_fn", stub=True, storage=storage)
    restored.on_trial_add(None, late)
    assert restored.on_trial_result(None, late, _result(4, 0.12)) == STOP
    assert restored.stop_info(late.trial_id).reason is StopReason.PRUNED

    scheduler.on_trial_complete(None, third, _result(4, 0.1125))
    assert link.writes == 3  # the last live trial ended
    scheduler.save(str(tmp_path / "sched.pkl"))
    assert link.writes == 4
    # Another scheduler in the same experiment directory never reads this one's state.
    other = NeVeScheduler(base_scheduler=_asha())
    other.on_trial_add(None, Trial("train_fn", stub=True, storage=storage))
    assert _rungs(other.base_scheduler) == {} and other._base_link.state_file() != path


@pytest.mark.ray
@pytest.mark.usefixtures("ray_session")
def test_the_bases_state_is_written_at_most_once_per_interval_and_never_for_a_base_without_save(tmp_path):
    storage = StorageContext(storage_path=str(tmp_path), experiment_dir_name="interval")
    scheduler = NeVeScheduler(base_scheduler=_asha())
    link = scheduler._base_link
    link.persist_every_s = 0.0  # every read of the clock is past the interval
    trial = Trial("train_fn", stub=True, storage=storage)
    scheduler.on_trial_add(None, trial)
    for it in range(1, 4):
        scheduler.on_trial_result(None, trial, _result(it, 0.5))
    assert link.writes == 1  # the add; a result never reads the clock (it costs what ASHA's costs)
    trial.set_status(Trial.RUNNING)
    controller = _Controller([trial])  # Tune's controller calls choose_trial_to_run on every step
    assert scheduler.choose_trial_to_run(controller) is None  # the trial runs: nothing to start
    assert link.writes == 2
    link.persist_every_s = 3600.0
    for it in range(4, 8):
        scheduler.on_trial_result(None, trial, _result(it, 0.5))
        scheduler.choose_trial_to_run(controller)
    assert link.writes == 3  # the first step after a 0 s interval, then none for an hour
    restored = NeVeScheduler(base_scheduler=_asha())
    restored._base_link.base.restore(link.state_file())
    assert _rungs(restored.base_scheduler) == _rungs(scheduler.base_scheduler) != {}  # as of the 4th result
    hyperband = NeVeScheduler(base_scheduler=HyperBandScheduler(metric="train_loss", mode="min", max_t=8))
    hyperband.on_trial_add(None, Trial("train_fn", stub=True, storage=storage))
    hyperband.save(str(tmp_path / "hyperband.pkl"))
    assert hyperband._base_link.state_file() is None and hyperband._base_link.writes == 0
    staged = os.listdir(storage.experiment_driver_staging_path)
    assert os.path.basename(link.state_file()) in staged
    assert not [name for name in staged if name.endswith(".tmp")]  # no temporary file is left behind


@pytest.mark.usefixtures("ray_session")
def test_a_base_without_any_metric_fails_the_run_with_the_fix(tmp_path):
    tuner = tune.Tuner(
        scripted_trainable,
        param_space={"name": "x", "losses": [1.0, 0.9]},
        tune_config=tune.TuneConfig(scheduler=NeVeScheduler(base_scheduler=ASHAScheduler())),
        run_config=_run_config(tmp_path, "nometric"),
    )
    with pytest.raises(Exception, match="has no metric to rank trials on.*metric='train_loss'"):
        tuner.fit()


@pytest.mark.usefixtures("ray_session")
def test_a_result_without_the_bases_metric_fails_the_run_with_the_key(tmp_path):
    scheduler = NeVeScheduler(base_scheduler=ASHAScheduler(metric="trian_loss", mode="min", max_t=4))
    tuner = tune.Tuner(
        scripted_trainable,
        param_space={"name": "x", "losses": [1.0, 0.9]},
        tune_config=tune.TuneConfig(scheduler=scheduler),
        run_config=_run_config(tmp_path, "typo"),
    )
    with pytest.raises(Exception, match="ranks trials on 'trian_loss'.*could never prune"):
        tuner.fit()


# ----------------------------------------------------------------------------------- real runs
@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_asha_inside_neve_prunes_on_the_training_loss_and_neve_still_decides(tmp_path):
    """Five trials, one at a time. ASHA (rungs at epochs 1, 2, 4, 8; reduction factor 2: a trial below the
    median of its rung is cut) ranks ``train_loss``; NeVe's own decisions come first."""
    asha = ASHAScheduler(metric="train_loss", mode="min", max_t=8, grace_period=1, reduction_factor=2)
    scheduler = NeVeScheduler(max_t=8, grace_period=1, base_scheduler=asha)
    link = scheduler._base_link
    link.persist_every_s = 0.0  # the base's state is written whenever the clock is read
    configs = _configs(
        long={"losses": [0.9, 0.8, 0.7, 0.6, 0.5, 0.45, 0.4, 0.35]},  # sets every rung, runs to the cap
        converges={"losses": [0.5, 0.4, 0.3, 0.25, 0.2], "converge_at": 3},
        diverges={"losses": [0.6, 0.5, 0.4], "diverge_at": 2},  # above rung 1's median: NeVe stops it
        mediocre={"losses": [0.85, 0.8, 0.75]},  # below the median at rung 1
        bad={"losses": [5.0, 4.0, 3.0]},
    )
    tuner = tune.Tuner(
        scripted_trainable,
        param_space={"cfg": tune.grid_search(configs)},
        # The objective (score) ranks the other way round from train_loss: the base must not adopt it.
        tune_config=tune.TuneConfig(scheduler=scheduler, metric="score", mode="max", max_concurrent_trials=1),
        run_config=_run_config(tmp_path, "asha"),
    )
    results = tuner.fit()
    assert results.num_errors == 0
    by_name = _by_name(results)
    assert _reasons(by_name) == {
        "long": ("max_t", 8),
        "converges": ("converged", 3),
        "diverges": ("diverged", 2),
        "mediocre": ("pruned", 1),
        "bad": ("pruned", 1),
    }
    iterations = {n: r.metrics["training_iteration"] for n, r in by_name.items()}
    assert iterations == {"long": 8, "converges": 3, "diverges": 2, "mediocre": 1, "bad": 1}
    recorded = {by_name[n].metrics["trial_id"]: info.reason.value for n, info in _infos(scheduler, by_name)}
    assert sorted(recorded.values()) == ["converged", "diverged", "max_t", "pruned", "pruned"]
    assert StopInfo.from_metrics(by_name["bad"].metrics).reason.value == "pruned"
    # ASHA recorded the rungs it ranked on: rung 1 holds every trial's -train_loss at epoch 1.
    rung_1 = dict(asha._brackets[0]._rungs)[1]
    assert sorted(-v for v in rung_1.values()) == [0.5, 0.6, 0.85, 0.9, 5.0]
    assert "pruned=2" in scheduler.debug_string() and "Using AsyncHyperBand" in scheduler.debug_string()
    # Adds and ends (one live trial at a time: each end is the last live one's) wrote it 10 times; the rest
    # are the controller's steps, on which the clock is read (never on a result). The last write has it all.
    assert link.writes > 10 + sum(iterations.values()) // 2, link.writes
    restored = ASHAScheduler(metric="train_loss", mode="min", max_t=8)
    restored.restore(link.state_file())
    assert _rungs(restored) == _rungs(asha)


def _infos(scheduler: NeVeScheduler, by_name: dict):
    ids = {r.metrics["trial_id"]: n for n, r in by_name.items()}
    return [(ids[tid], info) for tid, info in scheduler.stopped_trials.items()]


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_hyperband_inside_neve_pauses_resumes_and_prunes(tmp_path):
    """HyperBand (max_t=3, reduction factor 3) fills two brackets in the order trials are added: the first
    (2 trials) runs both to 3 epochs; the second (3 trials) runs each 1 epoch, pausing it, then keeps the
    best, which resumes from its checkpoint, and cuts the other two: the one still running (it reached
    epoch 1 last) with a STOP, the paused one through the controller."""
    hyperband = HyperBandScheduler(metric="train_loss", mode="min", max_t=3, reduction_factor=3)
    scheduler = NeVeScheduler(max_t=3, grace_period=1, base_scheduler=hyperband)
    assert not scheduler.supports_buffered_results  # HyperBand's, so Tune does not buffer results
    configs = _configs(
        a={"losses": [0.5, 0.4, 0.3]},
        b={"losses": [0.6, 0.5, 0.4], "converge_at": 2},
        c={"losses": [0.55, 0.45, 0.35]},  # the best of the second bracket
        d={"losses": [3.0, 2.5, 2.0]},
        e={"losses": [2.0, 1.5, 1.0], "sleep": 3.0},  # reaches epoch 1 last: running at the halving
    )
    tuner = tune.Tuner(
        scripted_trainable,
        param_space={"cfg": tune.grid_search(configs)},
        # All trials are added at once (synchronous HyperBand fills its brackets in that order).
        tune_config=tune.TuneConfig(scheduler=scheduler),
        run_config=_run_config(tmp_path, "hyperband"),
    )
    results = tuner.fit()
    assert results.num_errors == 0
    by_name = _by_name(results)
    assert _reasons(by_name) == {
        "a": ("max_t", 3),
        "b": ("converged", 2),  # NeVe's decision comes first, inside a HyperBand bracket too
        "c": ("max_t", 3),
        "d": ("pruned", 1),
        "e": ("pruned", 1),
    }
    # c was paused at epoch 1 and resumed from its epoch-1 checkpoint; the others ran in one go.
    assert list(by_name["c"].metrics_dataframe["start_epoch"]) == [0, 1, 1]
    assert [int(x) for x in by_name["c"].metrics_dataframe[keys.EPOCH]] == [1, 2, 3]
    assert all(set(by_name[n].metrics_dataframe["start_epoch"]) == {0} for n in "abde")
    reasons = sorted(info.reason.value for info in scheduler.stopped_trials.values())
    assert reasons == ["converged", "max_t", "max_t", "pruned", "pruned"]
    assert "num_stopped=2" in scheduler.debug_string()


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_tuner_restore_gives_asha_its_rungs_back(tmp_path):
    """ASHA rungs at epochs 1, 2, 4, 8. Trial ``first`` sets them all; trial ``crashes`` is the best at
    rung 1, then the run is interrupted (an error after epoch 1, max_failures=0). Restored, it resumes at
    epoch 2, where its loss is above rung 2's record: only an ASHA that got its rungs back prunes it there
    (a fresh one has an empty rung 2 and would let it run to the cap)."""
    marker = str(tmp_path / "crashed")
    asha = ASHAScheduler(metric="train_loss", mode="min", max_t=8, grace_period=1, reduction_factor=2)
    scheduler = NeVeScheduler(max_t=8, grace_period=1, base_scheduler=asha)
    configs = _configs(
        first={"losses": [1.0, 0.8, 0.6, 0.5, 0.45, 0.4, 0.38, 0.36]},
        crashes={"losses": [0.9, 0.95, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9], "fail_at": 1, "fail_marker": marker},
    )
    tuner = tune.Tuner(
        scripted_trainable,
        param_space={"cfg": tune.grid_search(configs)},
        tune_config=tune.TuneConfig(scheduler=scheduler, max_concurrent_trials=1),
        run_config=_run_config(tmp_path, "restore"),
    )
    first = tuner.fit()
    assert first.num_errors == 1 and os.path.exists(marker)
    assert _by_name(first)["first"].metrics[STOP_REASON] == "max_t"

    path = str(tmp_path / "restore")
    restored = tune.Tuner.restore(path, scripted_trainable, resume_errored=True)
    results = restored.fit()
    assert results.num_errors == 0
    by_name = _by_name(results)
    assert by_name["crashes"].metrics["start_epoch"] == 1  # continued from its epoch-1 checkpoint
    assert _reasons(by_name) == {"first": ("max_t", 8), "crashes": ("pruned", 2)}
    # The scheduler object of the first run did not see the restored run.
    assert sorted(info.reason.value for info in scheduler.stopped_trials.values()) == ["max_t"]
