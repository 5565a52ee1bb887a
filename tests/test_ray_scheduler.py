"""NeVeScheduler driven by hand-built flat results, as Tune delivers them; trainable helpers without Ray.

No Ray instance is started here: ``on_trial_result`` gets real ``ray.tune.experiment.Trial`` objects and
flat dicts, exactly what ``TuneController`` passes, and the checkpoint helpers run on plain directories.
"""

from __future__ import annotations

import math
import pickle

import pytest
import torch
from ray.tune.experiment import Trial
from ray.tune.result import DEFAULT_METRIC
from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler
from torch import nn

from neve_tune import NeVe, NeVeRule, StopReason, decide, keys, noise_aux
from neve_tune.ray import (
    STOP_EPOCH,
    STOP_REASON,
    NeVeScheduler,
    StopInfo,
    load_training_state,
    report_epoch,
    save_training_state,
    select_device,
    trial_device,
)
from neve_tune.studies.builtin.digits import DigitsCNN, load_digits_splits

CONTINUE, STOP = TrialScheduler.CONTINUE, TrialScheduler.STOP
V, D, IT = keys.MODEL_VELOCITY, keys.VELOCITY_CHANGE, "training_iteration"


def result(it: int, v: float | None = 0.5, d: float | None = 0.01, **extra: float) -> dict:
    """A flat result like Tune's: auto-filled keys, the user's metric and NeVe's keys."""
    out = {IT: it, "time_total_s": 0.1 * it, "trial_id": "x", "done": False, "loss": 1.0 / it}
    out[keys.EPOCH] = float(it)
    if v is not None:
        out[V] = v
    if d is not None and it > 1:
        out[D] = d
    out.update(extra)
    return out


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


# ----------------------------------------------------------------------------------- decisions
def test_converged_trial_stops_at_first_low_velocity_after_grace_period():
    sched = NeVeScheduler(grace_period=3, stop_threshold=1e-3)
    trial = new_trial()
    sched.on_trial_add(None, trial)
    velocities = [0.5, 5e-4, 4e-4, 3e-4, 2e-4]  # under the threshold from epoch 2, grace ends at 3
    decisions = drive(sched, trial, [result(i + 1, v) for i, v in enumerate(velocities)])
    assert decisions == [CONTINUE, CONTINUE, STOP]
    info = sched.stop_info(trial.trial_id)
    assert info == StopInfo(StopReason.CONVERGED, epoch=3, time=3.0, model_velocity=4e-4)
    assert str(info.reason) == "converged"


def test_velocity_at_threshold_is_not_converged():
    sched = NeVeScheduler(stop_threshold=1e-3)
    assert sched.check_result(result(5, 1e-3)) is None
    assert sched.check_result(result(5, math.nextafter(1e-3, 0))).reason is StopReason.CONVERGED


@pytest.mark.parametrize(
    ("v", "d"),
    [
        (math.nan, 0.01),
        (math.inf, 0.01),
        (-math.inf, None),
        (0.3, math.nan),
        (0.3, math.inf),
        (1e-9, math.nan),
    ],
)
def test_non_finite_velocity_or_change_is_diverged_at_once_even_in_grace_period(v, d):
    sched = NeVeScheduler(grace_period=10, max_t=100)
    trial = new_trial()
    sched.on_trial_add(None, trial)
    assert drive(sched, trial, [result(1, 0.4), result(2, v, d)]) == [CONTINUE, STOP]
    info = sched.stop_info(trial.trial_id)
    assert info.reason is StopReason.DIVERGED and info.epoch == 2  # (1e-9, NaN) too: never "converged"


def test_max_t_stops_with_reason_max_t_and_honours_time_attr():
    sched = NeVeScheduler(max_t=4, time_attr="time_total_s")
    trial = new_trial()
    # time_total_s = 0.1 * it: reaches 4.0 at it = 40, not at training_iteration 4.
    assert drive(sched, trial, [result(i, 0.2) for i in range(1, 40)]) == [CONTINUE] * 39
    assert sched.on_trial_result(None, trial, result(40, 0.2)) == STOP
    info = sched.stop_info(trial.trial_id)
    assert (info.reason, info.epoch, info.time) == (StopReason.MAX_T, 40, pytest.approx(4.0))


def test_grace_period_follows_time_attr():
    sched = NeVeScheduler(grace_period=2.0, time_attr="time_total_s")
    low = [result(i, 1e-5) for i in range(1, 21)]  # time_total_s reaches 2.0 at iteration 20
    assert [sched.check_result(r) is not None for r in low] == [False] * 19 + [True]


def test_precedence_diverged_then_converged_then_max_t():
    sched = NeVeScheduler(max_t=5)
    assert sched.check_result(result(5, 1e-6)).reason is StopReason.CONVERGED
    assert sched.check_result(result(5, math.nan)).reason is StopReason.DIVERGED
    assert sched.check_result(result(5, 0.5)).reason is StopReason.MAX_T
    assert sched.check_result(result(6, 0.5)).reason is StopReason.MAX_T


def test_first_epoch_without_velocity_change_is_decided_on_velocity_alone():
    sched = NeVeScheduler()
    first = result(1, 1e-4, d=None)
    assert D not in first
    assert sched.check_result(first).reason is StopReason.CONVERGED


def test_decisions_are_the_rules_classify():
    """The scheduler never re-implements the rule: it agrees with NeVeRule.classify everywhere."""
    values = [0.0, 1e-5, 9.99e-4, 1e-3, 0.2, math.nan, math.inf, -math.inf]
    changes = [None, 0.0, 0.5, math.nan, math.inf]
    for thr in (1e-3, 0.25):
        rule, sched = NeVeRule(stop_threshold=thr), NeVeScheduler(stop_threshold=thr)
        for v in values:
            for d in changes:
                got = sched.check_result(result(3, v, d))
                assert (got and got.reason) == rule.classify(v, d), (thr, v, d)


def test_scheduler_stops_where_neve_itself_says_stop():
    """Real NeVe metrics (digits, a converging and a diverging LR) give the controller's own decision."""
    torch.set_num_threads(1)
    data = load_digits_splits()
    for lr, cap in ((0.05, 25), (1e4, 3)):
        torch.manual_seed(0)
        model = DigitsCNN(width=8)
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        neve = NeVe(model, opt, noise_aux((1, 8, 8), n=64, seed=0), patience=2)
        sched, trial = NeVeScheduler(), new_trial()
        for epoch in range(1, cap + 1):
            for idx in torch.randperm(len(data.y_train)).split(64):
                loss = nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            step = neve.step()
            flat = {IT: epoch, "train_loss": loss.item(), **neve.metrics()}
            decision = sched.on_trial_result(None, trial, flat)
            assert (decision == STOP) == step.should_stop, (lr, epoch, step)
            if step.should_stop:
                assert sched.stop_info(trial.trial_id).reason is step.stop_reason
                break
        assert step.should_stop, f"lr={lr} did not stop within {cap} epochs: {step}"
        expected = StopReason.CONVERGED if lr < 1 else StopReason.DIVERGED
        assert step.stop_reason is expected and sched.stop_info(trial.trial_id).epoch == step.epoch


def test_custom_keys():
    sched = NeVeScheduler(velocity_key="my/v", change_key="my/d", time_attr="epoch")
    assert sched.check_result({"epoch": 2, "my/v": 1e-5, "my/d": 0.0}).reason is StopReason.CONVERGED
    assert sched.check_result({"epoch": 2, "my/v": 0.5, "my/d": math.nan}).reason is StopReason.DIVERGED
    with pytest.raises(ValueError, match="'my/v'"):
        sched.check_result({"epoch": 2, V: 1e-5})


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


def test_allow_missing_continues_on_sparse_results_but_keeps_max_t():
    sched = NeVeScheduler(allow_missing=True, max_t=3)
    trial = new_trial()
    sparse = [result(1, None), result(2, 0.4), result(3, None)]
    assert drive(sched, trial, sparse) == [CONTINUE, CONTINUE, STOP]
    assert sched.stop_info(trial.trial_id) == StopInfo(StopReason.MAX_T, 3, 3.0, None)


def test_result_without_any_report_is_not_checked():
    """Tune's bookkeeping-only results (no key from the trainable) pass, like its strict metric check."""
    sched = NeVeScheduler()
    bookkeeping = {IT: 3, "time_total_s": 1.0, "trial_id": "x", "done": True, "pid": 1, "config": {}}
    assert sched.on_trial_result(None, new_trial(), bookkeeping) == CONTINUE


def test_missing_time_attr_and_non_numeric_velocity_are_explained():
    sched = NeVeScheduler(time_attr="neve/epoch")
    with pytest.raises(ValueError, match=r"needs 'neve/epoch' in every result.*pass `time_attr=`"):
        sched.check_result({IT: 1, V: 0.5, "loss": 1.0})
    with pytest.raises(TypeError, match=r"expects a number under 'neve/model_velocity'.*'fast' \(str\)"):
        sched.check_result({IT: 1, V: "fast", "neve/epoch": 1})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"grace_period": -1}, r"grace_period must be a finite number >= 0, but got grace_period=-1"),
        ({"max_t": 0}, r"max_t must be None or a number > 0, but got max_t=0"),
        ({"max_t": 3, "grace_period": 5}, r"grace_period must be <= max_t"),
        ({"stop_threshold": -1.0}, r"stop_threshold must be a finite number > 0"),
        ({"mode": "maximize"}, r"mode must be 'min', 'max' or None, but got mode='maximize'"),
        ({"velocity_key": ""}, r"velocity_key must be a non-empty string"),
    ],
)
def test_bad_arguments_are_rejected_eagerly(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NeVeScheduler(**kwargs)


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
    assert sched.metric is None and sched.on_trial_result(None, trial, result(2, 1e-5)) == STOP


# ----------------------------------------------------------------------------------- state and records
def test_live_state_is_keyed_by_trial_id_and_dropped_records_are_kept():
    sched = NeVeScheduler()
    trials = [new_trial() for _ in range(4)]
    for t in trials:
        sched.on_trial_add(None, t)
    assert sched.num_live_trials == 4
    assert sched.on_trial_result(None, trials[0], result(3, 1e-5)) == STOP
    sched.on_trial_complete(None, trials[0], result(3, 1e-5))
    sched.on_trial_remove(None, trials[1])
    sched.on_trial_error(None, trials[2])
    assert sched.num_live_trials == 1
    sched.on_trial_complete(None, trials[3], result(9, 0.2))  # ended by itself: no record
    assert sched.num_live_trials == 0
    assert set(sched.stopped_trials) == {trials[0].trial_id}
    assert sched.stop_info(trials[3].trial_id) is None
    assert "stopped converged=1" in sched.debug_string()


def test_result_for_a_trial_never_added_still_decides():
    """After Tuner.restore the scheduler may see results of trials it was never told about."""
    sched, trial = NeVeScheduler(), new_trial()
    assert sched.on_trial_result(None, trial, result(7, math.nan)) == STOP
    assert sched.stop_info(trial.trial_id).reason is StopReason.DIVERGED


def test_on_trial_complete_writes_the_record_into_the_trials_last_result():
    sched, trial = NeVeScheduler(), new_trial()
    sched.on_trial_add(None, trial)
    last = result(6, 2e-4)
    trial.update_last_result(dict(last))
    assert sched.on_trial_result(None, trial, last) == STOP
    sched.on_trial_complete(None, trial, last)
    assert trial.last_result[STOP_REASON] == "converged" and trial.last_result[STOP_EPOCH] == 6
    assert trial.last_result["loss"] == last["loss"]  # the rest of the result is kept
    assert StopInfo.from_metrics(trial.last_result) == StopInfo(StopReason.CONVERGED, 6, 6.0, 2e-4)
    assert StopInfo.from_metrics(result(6, 0.3)) is None
    # Tune persists trials through run_metadata's JSON: the record must be in it.
    assert '"neve/stop_reason": "converged"' in trial.run_metadata.get_json_state()


def test_a_scheduler_restored_as_pickled_at_construction_makes_the_same_decisions():
    """Ray 2.60's Tuner.restore: the scheduler comes back as pickled before the run, without save/restore."""
    constructed = NeVeScheduler(grace_period=4, max_t=12)
    pickled_at_construction = pickle.dumps(constructed)
    trial = new_trial()
    velocities = [0.6, 0.3, 5e-4, 0.1, 0.05, 0.01, 8e-4, 7e-4]
    run = [result(i + 1, v) for i, v in enumerate(velocities)]
    # The interrupted run: it saw epochs 1..3 (epoch 3 is low but inside the grace period).
    first = drive(constructed, trial, run[:3])
    # The restored experiment: a scheduler as pickled at construction sees epochs 4.. only.
    restored = pickle.loads(pickled_at_construction)
    assert restored.num_live_trials == 0 and restored.stopped_trials == {}
    rest = drive(restored, trial, run[3:])
    uninterrupted = drive(NeVeScheduler(grace_period=4, max_t=12), new_trial(), run)
    assert first + rest == uninterrupted == [CONTINUE] * 6 + [STOP]
    assert restored.stop_info(trial.trial_id).epoch == 7


def test_restore_re_records_trials_that_were_already_stopped():
    """Tuner.restore re-adds TERMINATED trials: their records come back from their last results."""
    sched, done, running = NeVeScheduler(), new_trial(), new_trial()
    sched.on_trial_add(None, done)
    done.update_last_result(result(2, math.nan))
    sched.on_trial_result(None, done, result(2, math.nan))
    sched.on_trial_complete(None, done, result(2, math.nan))
    done.set_status(Trial.TERMINATED)

    restored = NeVeScheduler()
    restored.on_trial_add(None, done)
    restored.on_trial_add(None, running)
    info = restored.stop_info(done.trial_id)
    assert (info.reason, info.epoch) == (StopReason.DIVERGED, 2) and math.isnan(info.model_velocity)
    assert restored.num_live_trials == 1  # only the unfinished trial is live


def test_save_and_restore_round_trip_the_records(tmp_path):
    sched, trial = NeVeScheduler(max_t=3), new_trial()
    sched.on_trial_result(None, trial, result(3, 0.5))
    sched.save(str(tmp_path / "sched.pkl"))
    other = NeVeScheduler()
    other.restore(str(tmp_path / "sched.pkl"))
    assert other.stopped_trials == sched.stopped_trials and other.max_t == 3


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
    assert info.reason is decide(sent[-1][0]) is StopReason.STALLED


def test_scheduler_decisions_are_the_public_decide():
    for thr in (1e-3, 0.25):
        sched = NeVeScheduler(stop_threshold=thr)
        for v in [0.0, 1e-5, 9.99e-4, 1e-3, 0.2, math.nan, math.inf, -math.inf]:
            for d in [None, 0.0, 0.5, math.nan, math.inf]:
                r = result(3, v, d)
                got = sched.check_result(r)
                assert (got and got.reason) == decide(r, stop_threshold=thr), (thr, v, d)


def test_a_scheduler_pickled_with_a_rule_object_still_restores(tmp_path):
    """Experiments saved before decide() pickled the scheduler with a NeVeRule holding stop_threshold."""
    sched = NeVeScheduler(stop_threshold=0.25, max_t=3)
    old = dict(sched.__dict__)
    old["_rule"] = NeVeRule(stop_threshold=old.pop("_stop_threshold"))
    path = tmp_path / "old.pkl"
    path.write_bytes(pickle.dumps(old))
    restored = NeVeScheduler()
    restored.restore(str(path))
    assert restored.stop_threshold == 0.25 and "_rule" not in restored.__dict__
    assert restored.check_result(result(2, 0.2)).reason is StopReason.CONVERGED
    unpickled = pickle.loads(pickle.dumps(restored))
    assert unpickled.stop_threshold == 0.25 and repr(unpickled) == repr(restored)


# --- issue 12: one decision source, every reason ---------------------------------------------------------


def _own_threshold_run(stop_threshold: float, epochs: int = 30) -> list[dict]:
    """Flat results of a real digits run whose NeVe has its own stop_threshold, until NeVe says stop."""
    splits = load_digits_splits()
    torch.manual_seed(0)
    model = DigitsCNN(width=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    neve = NeVe(model, opt, noise_aux((1, 8, 8), n=64, seed=0), patience=2, stop_threshold=stop_threshold)
    x, y = splits.x_train, splits.y_train
    out = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for epoch in range(1, epochs + 1):
            total = 0.0
            for idx in torch.randperm(len(y), generator=torch.Generator().manual_seed(epoch)).split(64):
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += loss.item() * len(idx) / len(y)
            neve.step(total)
            out.append({IT: epoch, "loss": total, **neve.metrics()})
            if neve.should_stop:
                break
    finally:
        torch.set_num_threads(threads)
    return out


def test_scheduler_follows_the_trials_own_threshold_and_warns_once_when_given_another():
    """Issue 12 item 2: NeVe(stop_threshold=0.01) stops where NeVe says, whatever the scheduler's threshold."""
    results = _own_threshold_run(0.01)
    own_stop = len(results)
    assert results[-1][keys.CONVERGED] == 1.0 and results[-1][keys.STOP_THRESHOLD] == 0.01
    assert results[-1][V] >= 1e-3  # a scheduler recomputing with 1e-3 (as on HEAD) would not stop here
    follow, trial = NeVeScheduler(), new_trial()
    assert drive(follow, trial, results)[-1] == STOP and follow.stop_info(trial.trial_id).epoch == own_stop
    disagreeing, trial = NeVeScheduler(stop_threshold=1e-3), new_trial()
    both = r"given stop_threshold=0\.001, but the trial's NeVe reports stop_threshold=0\.01"
    with pytest.warns(UserWarning, match=both):
        decisions = drive(disagreeing, trial, results)
    assert decisions[-1] == STOP and len(decisions) == own_stop
    assert disagreeing.stop_info(trial.trial_id).reason is StopReason.CONVERGED
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per trial: no second warning for the same trial
        disagreeing.on_trial_result(None, trial, results[0])


@pytest.mark.parametrize("reason", [StopReason.STALLED, StopReason.COLLAPSED])
def test_stalled_and_collapsed_trials_are_stopped_and_recorded(reason):
    flags = {keys.CONVERGED: 0.0, keys.STALLED: 0.0, keys.COLLAPSED: 0.0, keys.DIVERGED: 0.0}
    sched, trial = NeVeScheduler(grace_period=3, max_t=50), new_trial()
    sched.on_trial_add(None, trial)
    flagged = {**flags, keys.MODEL_VELOCITY: 1e-4, "neve/" + reason.value: 1.0}
    assert sched.on_trial_result(None, trial, result(2, **flagged)) == CONTINUE  # inside the grace period
    assert sched.on_trial_result(None, trial, result(3, **flagged)) == STOP
    info = sched.stop_info(trial.trial_id)
    assert (info.reason, info.epoch) == (reason, 3)
    trial.update_last_result(result(3, **flagged))
    sched.on_trial_complete(None, trial, trial.last_result)
    assert trial.last_result[STOP_REASON] == reason.value
    assert StopInfo.from_metrics(trial.last_result).reason is reason
    # A flagged result with a tiny V but no stop flag set continues: the trial's NeVe decides, not V.
    quiet = {**flags, keys.MODEL_VELOCITY: 1e-6}
    assert NeVeScheduler().on_trial_result(None, new_trial(), result(9, **quiet)) == CONTINUE


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
