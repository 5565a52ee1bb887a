"""NeVeScheduler driven by what real trials report, as Tune delivers it; trainable helpers without Ray.

No Ray instance is started here. Each decision test steps a real ``NeVe`` on a tiny real model (a converging
run, a model that never moves, a loss that turns NaN, a network whose ReLUs all die) and feeds its
``neve.metrics()``, flattened with Tune's own ``flatten_dict`` next to Tune's auto-filled keys, to
``on_trial_result`` with real ``ray.tune.experiment.Trial`` objects, exactly what ``TuneController``
passes. The checkpoint helpers run on plain directories.
"""

from __future__ import annotations

import functools
import math
import pickle
import warnings

import pytest
import torch
from ray.tune.experiment import Trial
from ray.tune.result import DEFAULT_METRIC
from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler
from ray.tune.utils import flatten_dict
from torch import nn

from neve_tune import NeVe, StopReason, decide, keys, noise_aux
from neve_tune.ray import (
    NeVeScheduler,
    StopInfo,
    load_training_state,
    report_epoch,
    save_training_state,
    trial_device,
)
from neve_tune.ray._trainable import _select_device as select_device
from neve_tune.studies.builtin.digits import DigitsCNN, load_digits_splits

CONTINUE, STOP = TrialScheduler.CONTINUE, TrialScheduler.STOP
V, D, IT = keys.MODEL_VELOCITY, keys.VELOCITY_CHANGE, "training_iteration"
FLAGS = tuple(keys.DECISION_FLAGS.values())


def tune_result(epoch: int, metrics: dict, **user: float) -> dict:
    """What Tune hands a scheduler for one ``tune.report({**user, **metrics})``: flat, with its own keys."""
    auto = {IT: epoch, "time_total_s": 0.1 * epoch, "trial_id": "x", "done": False, "config": {"lr": 0.1}}
    return flatten_dict({**auto, **user, **metrics})


@functools.cache
def _run(scenario: str, stop_threshold: float = 1e-3) -> tuple[dict, ...]:
    """One real trial: a tiny classifier and its NeVe, one Tune result per epoch, until NeVe says stop.

    ``converges``: converged at epoch 9 (its V is under 1e-3 from epoch 8, but its loss still falls).
    ``still``: never trained, reported without a loss: stalled from epoch 2 on (NeVe's warm-up is 2 here),
    reported for 6 epochs. ``nan``: its epoch-3 loss is NaN: diverged at 3. ``dies``: every ReLU is killed
    before epoch 6: collapsed at 9.
    """
    torch.manual_seed(0)
    x = torch.randn(256, 4)
    y = (x[:, 0] + x[:, 1] > 0).long()
    hidden = nn.Linear(4, 16)
    model = nn.Sequential(hidden, nn.ReLU(), nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    aux = torch.randn(32, 4, generator=torch.Generator().manual_seed(1))
    neve = NeVe(model, opt, aux, min_epochs=2 if scenario == "still" else 3, patience=2, stop_threshold=stop_threshold)
    out = []
    for epoch in range(1, 31):
        if scenario == "dies" and epoch == 6:
            with torch.no_grad():
                hidden.bias.fill_(-1e4)
        total = None
        if scenario != "still":
            total = 0.0
            for idx in torch.randperm(256).split(32):
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += loss.item() / 8
        neve.step(math.nan if scenario == "nan" and epoch == 3 else total)
        out.append(tune_result(epoch, neve.metrics(), **({} if total is None else {"train_loss": total})))
        if neve.should_stop and (scenario != "still" or epoch == 6):
            break
    return tuple(out)


def run(scenario: str, stop_threshold: float = 1e-3) -> list[dict]:
    return [dict(r) for r in _run(scenario, stop_threshold)]


def new_trial() -> Trial:
    return Trial("train_fn", stub=True)


def drive(scheduler: NeVeScheduler, trial: Trial, results: list[dict]) -> list[str]:
    """Feed results until the first STOP, as Tune does (it ignores what a stopped trial sends after)."""
    decisions = []
    for r in results:
        decisions.append(scheduler.on_trial_result(None, trial, r))
        if decisions[-1] == STOP:
            break
    return decisions


def test_the_runs_are_what_the_tests_below_rely_on():
    """The real trials: where NeVe itself says stop, and why."""
    ends = {name: (len(run(name)), decide(run(name)[-1])) for name in ("converges", "still", "nan", "dies")}
    assert ends == {
        "converges": (9, StopReason.CONVERGED),
        "still": (6, StopReason.STALLED),
        "nan": (3, StopReason.DIVERGED),
        "dies": (9, StopReason.COLLAPSED),
    }
    assert [r[keys.STALLED] for r in run("still")] == [0.0] + [1.0] * 5
    assert all(set(FLAGS) <= set(r) for name in ends for r in run(name))  # NeVe.metrics() always flags
    converging = run("converges")
    assert converging[7][V] < 1e-3 and converging[7][keys.CONVERGED] == 0.0  # low V, but NeVe says go on


# ----------------------------------------------------------------------------------- decisions
@pytest.mark.parametrize(
    ("scenario", "reason", "epoch"),
    [
        ("converges", StopReason.CONVERGED, 9),
        ("still", StopReason.STALLED, 2),
        ("nan", StopReason.DIVERGED, 3),
        ("dies", StopReason.COLLAPSED, 9),
    ],
)
def test_the_scheduler_stops_where_the_trials_neve_says_and_records_why(scenario, reason, epoch):
    sched, trial = NeVeScheduler(), new_trial()
    sched.on_trial_add(None, trial)
    results = run(scenario)
    assert drive(sched, trial, results) == [CONTINUE] * (epoch - 1) + [STOP]
    info = sched.stop_info(trial.trial_id)
    stopping = results[epoch - 1]
    velocity = stopping.get(V)
    assert (info.reason, info.epoch, info.time) == (reason, epoch, float(epoch))
    assert info.model_velocity == velocity or (math.isnan(info.model_velocity) and math.isnan(velocity))
    trial.update_last_result(stopping)
    sched.on_trial_complete(None, trial, stopping)
    assert trial.last_result[keys.STOP_REASON] == reason.value and trial.last_result[keys.STOP_EPOCH] == epoch
    assert StopInfo.from_metrics(trial.last_result).reason is reason
    assert sched.num_live_trials == 0 and f"stopped {reason.value}=1" in sched.debug_string()


def test_a_low_velocity_alone_never_stops_a_trial():
    """V is under 1e-3 at epoch 8 but the trial's NeVe says continue: so does the scheduler."""
    sched = NeVeScheduler()
    results = run("converges")
    assert results[7][V] < 1e-3
    assert sched.check_result(results[7]) is None
    assert sched.check_result(results[8]).reason is StopReason.CONVERGED


def test_grace_period_delays_stalled_but_never_diverged():
    sched, trial = NeVeScheduler(grace_period=5, max_t=100), new_trial()
    assert drive(sched, trial, run("still")) == [CONTINUE] * 4 + [STOP]  # stalled from epoch 2
    assert sched.stop_info(trial.trial_id).reason is StopReason.STALLED
    late, trial = NeVeScheduler(grace_period=10, max_t=100), new_trial()
    assert drive(late, trial, run("nan")) == [CONTINUE, CONTINUE, STOP]  # diverged: at once
    assert late.stop_info(trial.trial_id).reason is StopReason.DIVERGED


def test_grace_period_follows_time_attr():
    sched = NeVeScheduler(grace_period=0.4, time_attr="time_total_s")  # 0.1 per epoch: from epoch 4
    assert [sched.check_result(r) is not None for r in run("still")] == [False] * 3 + [True] * 3


def test_max_t_stops_with_reason_max_t_and_honours_time_attr():
    sched, trial = NeVeScheduler(max_t=4), new_trial()
    assert drive(sched, trial, run("converges")) == [CONTINUE] * 3 + [STOP]
    info = sched.stop_info(trial.trial_id)
    assert (info.reason, info.epoch, info.time) == (StopReason.MAX_T, 4, 4.0)
    by_time, trial = NeVeScheduler(max_t=0.35, grace_period=0, time_attr="time_total_s"), new_trial()
    assert drive(by_time, trial, run("converges")) == [CONTINUE] * 3 + [STOP]
    assert by_time.stop_info(trial.trial_id).time == pytest.approx(0.4)


def test_the_trials_own_decision_comes_before_max_t():
    assert NeVeScheduler(max_t=9).check_result(run("converges")[8]).reason is StopReason.CONVERGED
    assert NeVeScheduler(max_t=3).check_result(run("nan")[2]).reason is StopReason.DIVERGED
    assert NeVeScheduler(max_t=3).check_result(run("converges")[2]).reason is StopReason.MAX_T


@pytest.mark.parametrize(("key", "value"), [(V, math.nan), (V, math.inf), (V, -math.inf), (D, math.nan), (D, math.inf)])
def test_a_non_finite_velocity_is_diverged_whatever_the_flags(key, value):
    result = run("converges")[3]
    assert all(result[f] == 0.0 for f in FLAGS)
    result[key] = value
    info = NeVeScheduler(grace_period=10).check_result(result)
    assert (info.reason, info.epoch) == (StopReason.DIVERGED, 4)


def test_the_shortcut_for_quiet_results_agrees_with_decide():
    """on_trial_result reads a result with no flag set and a finite V and D without calling check_result
    (and so decide()); every other result goes to decide(). Both must give decide()'s answer on every epoch
    of every run, and on the same results edited to each flag, to non-finite values and to numeric strings."""
    sched = NeVeScheduler(grace_period=0)
    cases = []
    for scenario in ("converges", "still", "nan", "dies"):
        for r in run(scenario):
            cases.append(r)
            cases += [{**r, flag: 1.0} for flag in FLAGS]
            cases += [{**r, V: math.inf}, {**r, D: math.nan}, {**r, D: -math.inf}, {**r, V: str(r.get(V, 0.5))}]
            cases += [{**r, V: 0}, {**r, V: 1e308, D: -1e308}]
    quiet = 0
    for r in cases:
        expected, got = decide(r), sched.check_result(r)
        assert (got and got.reason) == expected, r
        decision = sched.on_trial_result(None, new_trial(), r)
        assert decision == (CONTINUE if expected is None else STOP), r
        quiet += expected is None
    assert 20 < quiet < len(cases)


def test_quiet_epochs_of_a_real_run_never_reach_decide(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every flag ``NeVe.metrics()`` sends (``neve/memorizing`` included) is in the shortcut's read, so an epoch
    with no flag set and a finite V and D costs a few dict reads, not a ``decide()``: what the scheduler
    benchmark times per result."""
    sched = NeVeScheduler(grace_period=0)
    slow: list[dict] = []
    monkeypatch.setattr(sched, "check_result", lambda result: slow.append(result))
    quiet = [r for r in run("converges") if D in r and not any(r[flag] for flag in FLAGS)]
    assert len(quiet) >= 6 and all(set(FLAGS) <= set(r) for r in quiet)
    assert [sched.on_trial_result(None, new_trial(), r) for r in quiet] == [CONTINUE] * len(quiet)
    assert slow == []
    sched.on_trial_result(None, new_trial(), {k: v for k, v in quiet[0].items() if k != D})
    assert len(slow) == 1  # a result without D (a first epoch) is decided in full


def test_first_epoch_without_velocity_change_is_decided_on_its_flags():
    first = run("still")[0]
    assert D not in first and V in first
    assert NeVeScheduler().check_result(first) is None
    assert NeVeScheduler().check_result({**first, keys.STALLED: 1.0}).reason is StopReason.STALLED


def test_neve_metrics_without_a_velocity_continue():
    """NeVe.metrics() before the first step (or after a re-baseline) has the flags but no velocity."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    neve = NeVe(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.randn(8, 4))
    result = tune_result(1, neve.metrics())
    assert V not in result and set(FLAGS) <= set(result)
    assert NeVeScheduler().on_trial_result(None, new_trial(), result) == CONTINUE
    assert NeVeScheduler(max_t=1).check_result(result) == StopInfo(StopReason.MAX_T, 0, 1.0, None)


def test_custom_keys():
    renamed = [{("my/v" if k == V else k): v for k, v in r.items()} for r in run("converges")]
    sched, trial = NeVeScheduler(velocity_key="my/v"), new_trial()
    assert drive(sched, trial, renamed)[-1] == STOP and sched.stop_info(trial.trial_id).epoch == 9
    with pytest.raises(ValueError, match="'my/v'"):
        sched.check_result({IT: 2, V: 1e-5, "loss": 0.3})


# ----------------------------------------------------------------------------------- errors
def test_missing_velocity_key_error_names_the_key_and_how_to_report_it():
    sched = NeVeScheduler()
    bad = {IT: 1, "time_total_s": 0.1, "trial_id": "x", "loss": 0.3, "acc": 0.9}
    with pytest.raises(ValueError) as err:
        sched.on_trial_result(None, new_trial(), bad)
    msg = str(err.value)
    assert "NeVeScheduler needs 'neve/model_velocity' in every result" in msg
    assert "tune.report({**neve.metrics(), **your_metrics})" in msg
    assert "neve_tune.ray.report_epoch(neve, your_metrics, model=model, optimizer=optimizer)" in msg
    assert "NeVeScheduler(allow_missing=True)" in msg
    assert "Reported keys: ['acc', 'loss']" in msg


def test_a_velocity_without_neves_flags_is_refused_with_the_fix():
    """Decisions come only from the flags the trial's NeVe reports: a bare velocity cannot be decided."""
    bare = {k: v for k, v in run("converges")[8].items() if k not in FLAGS}
    with pytest.raises(ValueError, match=r"needs 'neve/converged' in every result.*\*\*neve\.metrics\(\)"):
        NeVeScheduler().on_trial_result(None, new_trial(), bare)
    with pytest.raises(ValueError, match="'neve/converged'"):
        NeVeScheduler(allow_missing=True).check_result(bare)


def test_allow_missing_continues_on_sparse_results_but_keeps_max_t():
    sched, trial = NeVeScheduler(allow_missing=True, max_t=3), new_trial()
    results = run("converges")
    sparse = [{IT: 1, "loss": 0.5}, results[1], {IT: 3, "loss": 0.3}]
    assert drive(sched, trial, sparse) == [CONTINUE, CONTINUE, STOP]
    assert sched.stop_info(trial.trial_id) == StopInfo(StopReason.MAX_T, 3, 3.0, None)


def test_result_without_any_report_is_not_checked():
    """Tune's bookkeeping-only results (no key from the trainable) pass, like its strict metric check."""
    sched = NeVeScheduler()
    bookkeeping = {IT: 3, "time_total_s": 1.0, "trial_id": "x", "done": True, "pid": 1, "config": {}}
    assert sched.on_trial_result(None, new_trial(), bookkeeping) == CONTINUE


def test_missing_time_attr_and_non_numeric_velocity_are_explained():
    result = run("converges")[1]
    sched = NeVeScheduler(time_attr="epoch_count")
    with pytest.raises(ValueError, match=r"needs 'epoch_count' in every result.*pass `time_attr=`"):
        sched.check_result(result)
    with pytest.raises(TypeError, match=r"expects a number under 'neve/model_velocity'.*'fast' \(str\)"):
        NeVeScheduler().check_result({**result, V: "fast"})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"grace_period": -1}, r"grace_period must be a finite number >= 0, but got grace_period=-1"),
        ({"max_t": 0}, r"max_t must be None or a number > 0, but got max_t=0"),
        ({"max_t": 3, "grace_period": 5}, r"grace_period must be <= max_t"),
        ({"stop_threshold": -1.0}, r"stop_threshold must be None or a finite number > 0, but got stop_thr"),
        ({"stop_threshold": math.inf}, r"stop_threshold must be None or a finite number > 0"),
        ({"mode": "maximize"}, r"mode must be 'min', 'max' or None, but got mode='maximize'"),
        ({"velocity_key": ""}, r"velocity_key must be a non-empty string"),
    ],
)
def test_bad_arguments_are_rejected_eagerly(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NeVeScheduler(**kwargs)


def test_a_stop_threshold_given_here_only_warns_once_per_trial_and_never_changes_a_decision():
    """The trial's NeVe(stop_threshold=0.01) decides; a scheduler told 1e-3 warns, and stops where NeVe says."""
    results = run("converges", stop_threshold=0.01)
    own_stop = len(results)
    assert results[-1][keys.CONVERGED] == 1.0 and results[-1][keys.STOP_THRESHOLD] == 0.01
    # A scheduler deciding with 1e-3 itself would have stopped earlier: V fell under it while the loss still fell.
    assert any(r[V] < 1e-3 for r in results[:-1])
    follow, trial = NeVeScheduler(), new_trial()
    assert drive(follow, trial, results)[-1] == STOP and follow.stop_info(trial.trial_id).epoch == own_stop
    disagreeing, trial = NeVeScheduler(stop_threshold=1e-3), new_trial()
    both = r"given stop_threshold=0\.001, but the trial's NeVe reports stop_threshold=0\.01"
    with pytest.warns(UserWarning, match=both):
        decisions = drive(disagreeing, trial, results)
    assert decisions == [CONTINUE] * (own_stop - 1) + [STOP]
    assert disagreeing.stop_info(trial.trial_id).reason is StopReason.CONVERGED
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per trial: no second warning for the same trial
        disagreeing.on_trial_result(None, trial, results[0])
        NeVeScheduler(stop_threshold=0.01).on_trial_result(None, new_trial(), results[0])  # agrees: silent


# ----------------------------------------------------------------------------------- metric / mode
@pytest.mark.parametrize(
    ("init", "call"),
    [
        ((None, None), ("loss", "min")),
        ((None, None), (None, "max")),
        ((None, None), (None, None)),
        (("acc", "max"), ("loss", "min")),
        (("acc", "max"), ("loss", None)),
        (("acc", "max"), (None, "min")),
        (("acc", "max"), (None, None)),
        (("acc", None), (None, "max")),
        ((None, "max"), ("acc", None)),
    ],
)
def test_set_search_properties_is_exactly_ashas(init, call):
    ours = NeVeScheduler(metric=init[0], mode=init[1])
    asha = AsyncHyperBandScheduler(metric=init[0], mode=init[1])
    assert ours.set_search_properties(*call) == asha.set_search_properties(*call)
    assert (ours.metric, ours.mode) == (asha._metric, asha._mode)


def test_set_search_properties_results():
    sched = NeVeScheduler()
    assert sched.set_search_properties("loss", "min", config={}) is True
    assert (sched.metric, sched.mode) == ("loss", "min")
    assert sched.set_search_properties("acc", None) is False  # conflicting metric
    mode_only = NeVeScheduler()
    assert mode_only.set_search_properties(None, "max") and mode_only.metric == DEFAULT_METRIC
    with pytest.raises(ValueError, match="mode must be 'min', 'max' or None"):
        NeVeScheduler().set_search_properties("loss", "up")


def test_no_metric_or_mode_is_needed_unlike_asha():
    trial = new_trial()
    with pytest.raises(ValueError, match="without a valid `metric`"):
        AsyncHyperBandScheduler().on_trial_add(None, trial)
    sched = NeVeScheduler()
    sched.on_trial_add(None, trial)  # NeVe decides on its own keys: no metric/mode required
    assert sched.metric is None and sched.on_trial_result(None, trial, run("still")[1]) == STOP


# ----------------------------------------------------------------------------------- state and records
def test_live_state_is_keyed_by_trial_id_and_dropped_records_are_kept():
    sched = NeVeScheduler()
    trials = [new_trial() for _ in range(4)]
    for t in trials:
        sched.on_trial_add(None, t)
    assert sched.num_live_trials == 4
    stalled = run("still")[1]
    assert sched.on_trial_result(None, trials[0], stalled) == STOP
    sched.on_trial_complete(None, trials[0], stalled)
    sched.on_trial_remove(None, trials[1])
    sched.on_trial_error(None, trials[2])
    assert sched.num_live_trials == 1
    sched.on_trial_complete(None, trials[3], run("converges")[0])  # ended by itself: no record
    assert sched.num_live_trials == 0
    assert set(sched.stopped_trials) == {trials[0].trial_id}
    assert sched.stop_info(trials[3].trial_id) is None
    assert "stopped stalled=1" in sched.debug_string()


def test_result_for_a_trial_never_added_still_decides():
    """After Tuner.restore the scheduler may see results of trials it was never told about."""
    sched, trial = NeVeScheduler(), new_trial()
    assert sched.on_trial_result(None, trial, run("nan")[2]) == STOP
    assert sched.stop_info(trial.trial_id).reason is StopReason.DIVERGED


def test_on_trial_complete_writes_the_record_into_the_trials_last_result():
    sched, trial = NeVeScheduler(), new_trial()
    sched.on_trial_add(None, trial)
    last = run("converges")[8]
    trial.update_last_result(dict(last))
    assert sched.on_trial_result(None, trial, last) == STOP
    sched.on_trial_complete(None, trial, last)
    assert trial.last_result[keys.STOP_REASON] == "converged" and trial.last_result[keys.STOP_EPOCH] == 9
    assert trial.last_result["train_loss"] == last["train_loss"]  # the rest of the result is kept
    assert StopInfo.from_metrics(trial.last_result) == StopInfo(StopReason.CONVERGED, 9, 9.0, last[V])
    assert StopInfo.from_metrics(run("converges")[3]) is None
    # Tune persists trials through run_metadata's JSON: the record must be in it.
    assert '"neve/stop_reason": "converged"' in trial.run_metadata.get_json_state()


def test_a_scheduler_restored_as_pickled_at_construction_makes_the_same_decisions():
    """Ray 2.60's Tuner.restore: the scheduler comes back as pickled before the run, without save/restore."""
    constructed = NeVeScheduler(grace_period=4, max_t=12)
    pickled_at_construction = pickle.dumps(constructed)
    trial = new_trial()
    results = run("still")  # stalled from epoch 2, inside the grace period until epoch 4
    first = drive(constructed, trial, results[:3])  # the interrupted run saw epochs 1..3
    restored = pickle.loads(pickled_at_construction)  # the restored experiment sees epochs 4..
    assert restored.num_live_trials == 0 and restored.stopped_trials == {}
    rest = drive(restored, trial, results[3:])
    uninterrupted = drive(NeVeScheduler(grace_period=4, max_t=12), new_trial(), results)
    assert first + rest == uninterrupted == [CONTINUE] * 3 + [STOP]
    assert restored.stop_info(trial.trial_id).epoch == 4


def test_restore_re_records_trials_that_were_already_stopped():
    """Tuner.restore re-adds TERMINATED trials: their records come back from their last results."""
    sched, done, running = NeVeScheduler(), new_trial(), new_trial()
    diverged = run("nan")[2]
    sched.on_trial_add(None, done)
    done.update_last_result(diverged)
    sched.on_trial_result(None, done, diverged)
    sched.on_trial_complete(None, done, diverged)
    done.set_status(Trial.TERMINATED)

    restored = NeVeScheduler()
    restored.on_trial_add(None, done)
    restored.on_trial_add(None, running)
    info = restored.stop_info(done.trial_id)
    assert (info.reason, info.epoch) == (StopReason.DIVERGED, 3) and info.model_velocity == diverged[V]
    assert restored.num_live_trials == 1  # only the unfinished trial is live


def test_save_and_restore_round_trip_the_records(tmp_path):
    sched, trial = NeVeScheduler(max_t=3), new_trial()
    sched.on_trial_result(None, trial, run("converges")[2])
    sched.save(str(tmp_path / "sched.pkl"))
    other = NeVeScheduler()
    other.restore(str(tmp_path / "sched.pkl"))
    assert other.stopped_trials == sched.stopped_trials and other.max_t == 3
    assert other.stop_info(trial.trial_id).reason is StopReason.MAX_T


# ----------------------------------------------------------------------------------- trainable helpers
def _train_epoch(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    model.train()
    for idx in torch.randperm(len(y)).split(64):
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()


def _fresh(lr: float = 0.1):
    torch.manual_seed(0)
    model = DigitsCNN(width=8)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    neve = NeVe(model, opt, noise_aux((1, 8, 8), n=32, seed=0), patience=0)
    return model, opt, neve


def test_saved_training_state_resumes_with_identical_velocities_lrs_and_data_order(tmp_path):
    torch.set_num_threads(1)
    data = load_digits_splits()
    x, y = data.x_train[:512], data.y_train[:512]
    model, opt, neve = _fresh(lr=1.0)
    for _ in range(3):
        _train_epoch(model, opt, x, y)
        neve.step()
    save_training_state(tmp_path, model, opt, neve, epoch=3, extra_state={"best": 0.75})
    uninterrupted = []
    for _ in range(4):
        _train_epoch(model, opt, x, y)
        step = neve.step()
        uninterrupted.append((step.model_velocity, step.velocity_change, tuple(step.lrs)))
    assert len({lrs for _, _, lrs in uninterrupted}) > 1  # patience=0: the LR decays after the checkpoint

    torch.manual_seed(123)  # a restarted process: different RNG state, fresh objects
    model2, opt2, neve2 = _fresh(lr=1.0)
    extra: dict = {}
    assert load_training_state(tmp_path, model2, opt2, neve2, extra_state=extra) == 3
    assert extra == {"best": 0.75}
    resumed = []
    for _ in range(4):
        _train_epoch(model2, opt2, x, y)
        step = neve2.step()
        resumed.append((step.model_velocity, step.velocity_change, tuple(step.lrs)))
    assert resumed == uninterrupted  # exactly equal, not approximately
    assert neve2.metrics() == neve.metrics()


def test_load_training_state_errors(tmp_path):
    model, opt, neve = _fresh()
    with pytest.raises(FileNotFoundError, match=r"was not written by neve_tune\.ray\.report_epoch"):
        load_training_state(tmp_path, model, opt, neve)
    save_training_state(tmp_path, model, opt, None, epoch=1)
    with pytest.raises(ValueError, match="does not hold NeVe state but neve=a NeVe object"):
        load_training_state(tmp_path, model, opt, neve)


def test_select_device_logic():
    assert select_device([], cuda_available=True) == torch.device("cpu")
    assert select_device([], cuda_available=False) == torch.device("cpu")
    assert select_device(["3"], cuda_available=True) == torch.device("cuda", 0)  # Ray masks devices
    assert select_device([0, 1], cuda_available=True) == torch.device("cuda", 0)
    with pytest.warns(RuntimeWarning, match=r"assigned GPU\(s\) \[0\].*running on the cpu"):
        assert select_device([0], cuda_available=False) == torch.device("cpu")


def test_trial_device_outside_ray_uses_cuda_only_if_available():
    expected = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert trial_device() == expected


def test_report_epoch_reports_neves_metrics_key_for_key(monkeypatch):
    """Ray's report_epoch sends {**your_metrics, **neve.metrics()}: the one builder, num_decays included."""
    import ray.tune

    sent = []
    monkeypatch.setattr(ray.tune, "report", lambda metrics, checkpoint=None: sent.append((metrics, checkpoint)))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD([{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.01}], lr=0.1)
    # The model stands still: V = 0, and with patience=0 the LR decays from epoch 3 on.
    neve = NeVe(model, opt, torch.randn(16, 4), momentum=0.0, patience=0, min_epochs=0)
    for _ in range(4):
        step = neve.step()
        reported = report_epoch(neve, {"train_loss": 0.25}, model=model, optimizer=opt, checkpoint_every=2)
        assert reported == {"train_loss": 0.25, **neve.metrics()} == {"train_loss": 0.25, **step.metrics()}
        assert sent[-1][0] == reported
    assert [m[keys.NUM_DECAYS] for m, _ in sent] == [0.0, 0.0, 1.0, 1.0]
    assert [c is not None for _, c in sent] == [False, True, False, True]
    assert keys.lr_key(1) in sent[-1][0]
    # What the scheduler reads from such a report is the trial's own decision: a model that never moved
    # is stalled (issue 12), not converged.
    sched = NeVeScheduler()
    info = sched.check_result({IT: 4, **sent[-1][0]})
    assert info.reason is step.stop_reason is StopReason.STALLED


def test_report_epoch_with_train_loss_steps_neve_and_refuses_a_double_step(monkeypatch):
    import ray.tune

    sent = []
    monkeypatch.setattr(ray.tune, "report", lambda metrics, checkpoint=None: sent.append(metrics))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    neve = NeVe(model, opt, torch.randn(16, 4))
    report_epoch(neve, {"loss": 0.6}, model=model, optimizer=opt, train_loss=0.6, checkpoint_every=0)
    assert neve.last_epoch == 1 and sent[-1][keys.TRAIN_LOSS] == 0.6 and sent[-1]["loss"] == 0.6
    neve.step(0.5)  # the loop stepped too: a second step in one epoch would measure an unchanged model
    with pytest.raises(ValueError, match=r"neve.step\(\) was already called for this epoch"):
        report_epoch(neve, {}, model=model, optimizer=opt, train_loss=0.5, checkpoint_every=0)
    report_epoch(neve, {}, model=model, optimizer=opt, checkpoint_every=0)  # the plain form still works
    report_epoch(neve, {}, model=model, optimizer=opt, train_loss=0.4, checkpoint_every=0)
    assert neve.last_epoch == 3
    with pytest.raises(ValueError, match="needs a NeVe object"):
        report_epoch(None, {}, model=model, optimizer=opt, epoch=1, train_loss=0.4)
