"""NeVePruner and report_epoch, driven like Optuna's own pruner tests: study.ask() -> report -> should_prune.

Every study here lives in a real SQLite file under tmp_path (the pruner must decide from storage).
"""

from __future__ import annotations

import json
import math

import optuna
import pytest
from optuna.pruners import MedianPruner, ThresholdPruner
from optuna.trial import TrialState

from neve_tune import NeVe, StopReason, keys
from neve_tune.optuna import NeVePruner, report_epoch
from neve_tune.optuna._attrs import HISTORY_ATTR, NEVE_ATTR, STOP_EPOCH_ATTR, STOP_REASON_ATTR

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture
def storage_url(tmp_path):
    return f"sqlite:///{tmp_path}/optuna.db"


def make_study(storage_url, pruner, direction="maximize"):
    return optuna.create_study(storage=storage_url, pruner=pruner, direction=direction)


def neve_attr(step, velocity, change=None, **extra):
    """What report_epoch stores: the step plus NeVe.metrics() for epoch step+1."""
    entry = {"step": step, keys.EPOCH: float(step + 1), keys.MODEL_VELOCITY: velocity}
    if change is not None:
        entry[keys.VELOCITY_CHANGE] = change
    entry.update(extra)
    return entry


def report(trial, step, value, velocity, change=None, **flags):
    """Store NeVe's metrics (with its decision flags, as NeVe.metrics() has them) and report ``value``."""
    trial.set_user_attr(NEVE_ATTR, neve_attr(step, velocity, change, **{f"neve/{k}": v for k, v in flags.items()}))
    trial.report(value, step)
    return trial.should_prune()


def metrics(epoch, velocity, change=None, *, converged=0.0, diverged=0.0):
    out = {keys.EPOCH: float(epoch), keys.MODEL_VELOCITY: velocity, keys.LR: 0.1}
    if change is not None:
        out[keys.VELOCITY_CHANGE] = change
    out[keys.CONVERGED] = converged
    out[keys.DIVERGED] = diverged
    return out


# --- NeVePruner.prune, through should_prune -------------------------------------------------------------


def test_moving_trial_is_not_pruned(storage_url):
    study = make_study(storage_url, NeVePruner())
    trial = study.ask()
    assert report(trial, 0, 0.5, 0.4) is False
    assert report(trial, 1, 0.6, 0.2, 0.01) is False


def test_converged_trial_is_not_pruned_and_completes_as_best(storage_url):
    # The base pruner would prune any value under 0.5; convergence still wins: a converged trial is done.
    study = make_study(storage_url, NeVePruner(ThresholdPruner(lower=0.5), stop_threshold=1e-3))
    trial = study.ask()
    assert report(trial, 0, 0.9, 0.3) is False
    assert report(trial, 1, 0.4, 5e-4, 1e-5, converged=1.0) is False
    study.tell(trial, 0.4)
    (frozen,) = study.trials
    assert frozen.state is TrialState.COMPLETE
    assert frozen.value == 0.4
    assert study.best_trial.number == frozen.number


@pytest.mark.parametrize(
    ("velocity", "change"),
    [(math.nan, None), (math.inf, 0.1), (0.2, math.nan), (0.2, -math.inf), ("nan", None), (0.2, "inf")],
)
def test_non_finite_velocity_or_change_is_pruned(storage_url, velocity, change):
    study = make_study(storage_url, NeVePruner())
    trial = study.ask()
    assert report(trial, 0, 0.5, 0.3) is False
    assert report(trial, 1, 0.5, velocity, change) is True


def test_nan_intermediate_value_is_left_to_the_base_pruner(storage_url):
    study = make_study(storage_url, NeVePruner())
    trial = study.ask()
    assert report(trial, 0, math.nan, 0.3) is False
    study = make_study(storage_url.replace("optuna.db", "optuna2.db"), NeVePruner(ThresholdPruner(lower=0.0)))
    trial = study.ask()
    assert report(trial, 0, math.nan, 0.3) is True  # ThresholdPruner prunes NaN values


def test_rebaseline_step_without_velocity_gives_no_decision(storage_url):
    study = make_study(storage_url, NeVePruner())
    trial = study.ask()
    trial.set_user_attr(NEVE_ATTR, {"step": 0, keys.EPOCH: 1.0})
    trial.report(0.5, 0)
    assert trial.should_prune() is False


def test_warmup_steps(storage_url):
    study = make_study(storage_url, NeVePruner(n_warmup_steps=2))
    trial = study.ask()
    assert [report(trial, s, 0.5, math.nan) for s in range(4)] == [False, False, True, True]


def test_interval_steps(storage_url):
    study = make_study(storage_url, NeVePruner(n_warmup_steps=1, interval_steps=3))
    trial = study.ask()
    # checks at steps 1, 4, 7, ...
    assert [report(trial, s, 0.5, math.nan) for s in range(6)] == [False, True, False, False, True, False]


def test_interval_check_is_postponed_to_the_next_reported_step(storage_url):
    study = make_study(storage_url, NeVePruner(interval_steps=3))
    trial = study.ask()
    assert report(trial, 0, 0.5, 0.3) is False
    # step 3 (a check) is never reported; the check happens at step 5 instead.
    assert report(trial, 5, 0.5, math.nan) is True


@pytest.mark.parametrize(
    ("warmup", "interval", "steps"),
    [(0, 1, [0, 1, 2, 3]), (2, 1, [0, 1, 2, 5]), (0, 2, [0, 1, 2, 3, 4, 7, 8]), (3, 4, [0, 2, 3, 4, 6, 7, 9, 15, 16])],
)
def test_warmup_and_interval_match_optunas_own_pruners(tmp_path, warmup, interval, steps):
    """A diverged NeVe trial is pruned exactly where ThresholdPruner prunes a NaN value, with the same settings."""
    neve = make_study(f"sqlite:///{tmp_path}/neve.db", NeVePruner(n_warmup_steps=warmup, interval_steps=interval))
    thresh = optuna.create_study(pruner=ThresholdPruner(lower=0.0, n_warmup_steps=warmup, interval_steps=interval))
    pruned_somewhere = []
    for first_ok in range(len(steps)):  # the trial diverges at steps[first_ok]
        t_neve, t_thresh = neve.ask(), thresh.ask()
        ours, theirs = [], []
        for i, step in enumerate(steps):
            bad = i >= first_ok
            ours.append(report(t_neve, step, 0.5, math.nan if bad else 0.3))
            t_thresh.report(math.nan if bad else 0.5, step)
            theirs.append(t_thresh.should_prune())
        assert ours == theirs, (first_ok, steps)
        pruned_somewhere.append(any(ours))
    assert pruned_somewhere[0]  # a trial diverged from its first step is caught at the first check


def test_base_pruner_composition(storage_url):
    study = make_study(storage_url, NeVePruner(MedianPruner(n_startup_trials=1, n_min_trials=1)))
    good = study.ask()
    for step, value in enumerate([0.5, 0.7, 0.9]):
        assert report(good, step, value, 0.3) is False
    study.tell(good, 0.9)
    bad = study.ask()
    assert report(bad, 0, 0.1, 0.3) is True  # median of completed trials at step 0 is 0.5
    same_but_converged = study.ask()
    assert report(same_but_converged, 0, 0.1, 1e-4, converged=1.0) is False


def test_decisions_come_from_storage_alone(storage_url):
    """A fresh pruner in another Study object (as in another worker process) decides the same."""
    study = make_study(storage_url, NeVePruner(n_warmup_steps=1))
    running = study.ask()
    report(running, 0, 0.5, math.nan)
    report(running, 1, 0.5, math.nan)
    converged = study.ask()
    report(converged, 0, 0.5, 1e-5, converged=1.0)
    report(converged, 1, 0.5, 1e-5, converged=1.0)
    other = optuna.load_study(study_name=study.study_name, storage=storage_url, pruner=NeVePruner(n_warmup_steps=1))
    decisions = {t.number: (other.pruner.prune(other, t), other.pruner.neve_decision(t)) for t in other.trials}
    assert decisions == {0: (True, StopReason.DIVERGED), 1: (False, StopReason.CONVERGED)}


def test_missing_or_stale_neve_attr_says_how_to_report(storage_url):
    study = make_study(storage_url, NeVePruner())
    trial = study.ask()
    trial.report(0.5, 0)
    with pytest.raises(ValueError, match=r"no user attr 'neve'.*report_epoch\(trial, neve, value\)"):
        trial.should_prune()
    trial.set_user_attr(NEVE_ATTR, neve_attr(0, 0.3))
    trial.report(0.5, 1)
    with pytest.raises(ValueError, match=r"are for step 0, but its latest report is step 1"):
        trial.should_prune()
    trial.set_user_attr(NEVE_ATTR, {"model_velocity": 0.3})
    with pytest.raises(ValueError, match=r"must be a dict with keys 'step' and 'neve/epoch'"):
        trial.should_prune()


def test_no_report_no_decision(storage_url):
    study = make_study(storage_url, NeVePruner())
    assert study.ask().should_prune() is False


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"n_warmup_steps": -1}, ValueError, "Number of warmup steps cannot be negative, but got n_warmup_steps=-1."),
        ({"interval_steps": 0}, ValueError, "Pruning interval steps must be at least 1, but got interval_steps=0."),
        ({"stop_threshold": -1.0}, ValueError, "stop_threshold must be a finite number > 0"),
        ({"stop_threshold": math.nan}, ValueError, "stop_threshold must be a finite number > 0"),
        ({"base_pruner": "median"}, TypeError, "wrapped_pruner must be an optuna.pruners.BasePruner or None"),
        ({"base_pruner": NeVePruner()}, ValueError, "must not be another NeVePruner"),
    ],
)
def test_invalid_settings(kwargs, error, message):
    base = kwargs.pop("base_pruner", None)
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        NeVePruner(base, **kwargs)


def test_wrapped_pruner_is_optunas_spelling_and_base_pruner_its_alias():
    median = MedianPruner()
    assert NeVePruner(median).wrapped_pruner is median and NeVePruner(wrapped_pruner=median).base_pruner is median
    assert NeVePruner(base_pruner=median).wrapped_pruner is median
    with pytest.raises(ValueError, match="wrapped_pruner= .* or as its alias base_pruner=, not both"):
        NeVePruner(median, base_pruner=MedianPruner())


def test_keyword_only_settings():
    with pytest.raises(TypeError):
        NeVePruner(None, 1e-3)  # type: ignore[misc]


# --- report_epoch ---------------------------------------------------------------------------------------


def test_report_epoch_converged_returns_and_trial_completes(storage_url):
    study = make_study(storage_url, NeVePruner(stop_threshold=1e-3))
    trial = study.ask()
    assert report_epoch(trial, metrics(1, 0.5), 0.8) is None
    assert report_epoch(trial, metrics(2, 0.01, 0.02), 0.9) is None
    reason = report_epoch(trial, metrics(3, 5e-4, 1e-4, converged=1.0), 0.95)  # the trial's own decision
    assert reason is StopReason.CONVERGED and reason  # truthy: `if report_epoch(...): break`
    study.tell(trial, 0.95)

    (frozen,) = study.trials
    assert frozen.state is TrialState.COMPLETE and frozen.value == 0.95
    assert frozen.intermediate_values == {0: 0.8, 1: 0.9, 2: 0.95}
    assert frozen.user_attrs[STOP_REASON_ATTR] == "converged"
    assert frozen.user_attrs[STOP_EPOCH_ATTR] == 3
    assert frozen.user_attrs[NEVE_ATTR] == {"step": 2, "value": 0.95, **metrics(3, 5e-4, 1e-4, converged=1.0)}
    history = frozen.user_attrs[HISTORY_ATTR]
    assert [e["step"] for e in history] == [0, 1, 2]
    assert [e[keys.MODEL_VELOCITY] for e in history] == [0.5, 0.01, 5e-4]
    assert keys.VELOCITY_CHANGE not in history[0]
    json.dumps(frozen.user_attrs, allow_nan=False)  # strict JSON


def test_report_epoch_diverged_raises_pruned_and_records_reason(storage_url):
    study = make_study(storage_url, NeVePruner())
    trial = study.ask()
    report_epoch(trial, metrics(1, 0.5), 0.3)
    with pytest.raises(optuna.TrialPruned, match=r"Trial 0 diverged at epoch 2: model velocity nan"):
        report_epoch(trial, metrics(2, math.nan, math.nan, diverged=1.0), math.nan)
    study.tell(trial, state=TrialState.PRUNED)

    (frozen,) = study.trials
    assert frozen.state is TrialState.PRUNED
    assert frozen.user_attrs[STOP_REASON_ATTR] == "diverged"
    assert frozen.user_attrs[STOP_EPOCH_ATTR] == 2
    last = frozen.user_attrs[NEVE_ATTR]
    assert last[keys.MODEL_VELOCITY] == "nan" and last[keys.VELOCITY_CHANGE] == "nan" and last["value"] == "nan"
    assert math.isnan(float(last[keys.MODEL_VELOCITY]))
    json.dumps(frozen.user_attrs, allow_nan=False)


def test_report_epoch_base_pruner_rejection_is_reason_pruned(storage_url):
    study = make_study(storage_url, NeVePruner(ThresholdPruner(lower=0.5)))
    trial = study.ask()
    with pytest.raises(optuna.TrialPruned, match="pruned at epoch 1 on its reported value 0.2"):
        report_epoch(trial, metrics(1, 0.4), 0.2)
    assert trial.user_attrs[STOP_REASON_ATTR] == "pruned"
    assert trial.user_attrs[STOP_EPOCH_ATTR] == 1


def test_report_epoch_max_epochs(storage_url):
    study = make_study(storage_url, NeVePruner())
    trial = study.ask()
    assert report_epoch(trial, metrics(1, 0.4), 0.5, max_epochs=2) is None
    assert report_epoch(trial, metrics(2, 0.3), 0.6, max_epochs=2) is StopReason.MAX_T
    assert trial.user_attrs[STOP_REASON_ATTR] == "max_t"


def test_report_epoch_pruner_warmup_gates_pruning_not_the_trials_own_convergence(storage_url):
    study = make_study(storage_url, NeVePruner(n_warmup_steps=2))
    trial = study.ask()
    assert report_epoch(trial, metrics(1, 0.3, diverged=1.0), 0.5) is None  # step 0 < warmup: not pruned
    assert report_epoch(trial, metrics(2, 1e-5, 0.0, converged=1.0), 0.5) is StopReason.CONVERGED  # its own
    late = study.ask()
    report_epoch(late, metrics(1, 0.3), 0.5)
    report_epoch(late, metrics(2, 0.3, 0.0), 0.5)
    with pytest.raises(optuna.TrialPruned, match="diverged at epoch 3"):
        report_epoch(late, metrics(3, math.nan, 0.0, diverged=1.0), 0.5)  # step 2: the pruner's first check


def test_report_epoch_with_another_pruner_lets_that_pruner_alone_decide(storage_url):
    study = make_study(storage_url, MedianPruner(n_startup_trials=10))
    trial = study.ask()
    assert report_epoch(trial, metrics(1, 1e-5), 0.5) is None  # NeVe's own threshold did not fire
    assert report_epoch(trial, metrics(2, 1e-5, 0.0, converged=1.0), 0.5) is StopReason.CONVERGED
    other = study.ask()
    assert report_epoch(other, metrics(1, 0.3, diverged=1.0), 0.5) is None  # MedianPruner does not read NeVe
    wrapped = make_study(storage_url, NeVePruner(MedianPruner(n_startup_trials=10)))
    with pytest.raises(optuna.TrialPruned, match="diverged"):
        report_epoch(wrapped.ask(), metrics(1, math.inf), 0.5)  # non-finite even without the flag


def test_report_epoch_with_fixed_trial():
    trial = optuna.trial.FixedTrial({"lr": 0.1})
    assert report_epoch(trial, metrics(1, 0.3), 0.5) is None
    assert report_epoch(trial, metrics(2, 1e-5, 0.0, converged=1.0), 0.6) is StopReason.CONVERGED
    assert trial.user_attrs[STOP_EPOCH_ATTR] == 2
    assert len(trial.user_attrs[HISTORY_ATTR]) == 2


def test_report_epoch_stores_fresh_objects_in_memory_storage():
    study = optuna.create_study(pruner=NeVePruner())  # InMemoryStorage keeps references
    trial = study.ask()
    report_epoch(trial, metrics(1, 0.5), 0.1)
    first_history = study.trials[0].user_attrs[HISTORY_ATTR]
    first_entry = study.trials[0].user_attrs[NEVE_ATTR]
    report_epoch(trial, metrics(2, 0.4, 0.1), 0.2)
    assert len(first_history) == 1 and first_entry["step"] == 0
    assert [e["step"] for e in study.trials[0].user_attrs[HISTORY_ATTR]] == [0, 1]


def test_report_epoch_rerun_from_an_earlier_step_trims_history(storage_url):
    """A retried trial inherits its failed attempt's attrs; restarting at epoch 1 starts a new history."""
    study = make_study(storage_url, NeVePruner())
    study.enqueue_trial({}, user_attrs={HISTORY_ATTR: [neve_attr(s, 0.5) for s in range(4)]})
    trial = study.ask()
    report_epoch(trial, metrics(1, 0.45), 0.1)
    report_epoch(trial, metrics(2, 0.35, 0.1), 0.2)
    history = trial.user_attrs[HISTORY_ATTR]
    assert [(e["step"], e[keys.MODEL_VELOCITY]) for e in history] == [(0, 0.45), (1, 0.35)]


def test_report_epoch_accepts_a_neve_controller_and_a_step_result(storage_url):
    torch = pytest.importorskip("torch")
    from neve_tune import NeVe

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    neve = NeVe(model, opt, torch.randn(16, 4), stop_threshold=1e-3, min_epochs=0)
    study = make_study(storage_url, NeVePruner())
    trial = study.ask()
    result = neve.step()  # no training: the model never moved, V == 0: stalled (issue 12), not converged
    with pytest.raises(optuna.TrialPruned, match="stalled at epoch 1"):
        report_epoch(trial, neve, 0.5)
    assert trial.user_attrs[NEVE_ATTR] == {"step": 0, "value": 0.5, **neve.metrics()}
    assert trial.user_attrs[STOP_REASON_ATTR] == "stalled"
    other = study.ask()
    with pytest.raises(optuna.TrialPruned):
        report_epoch(other, result, 0.5)
    stored = other.user_attrs[NEVE_ATTR]
    assert stored[keys.MODEL_VELOCITY] == result.model_velocity and stored[keys.EPOCH] == 1.0


def test_report_epoch_rejects_bad_input(storage_url):
    study = make_study(storage_url, NeVePruner())
    trial = study.ask()
    with pytest.raises(ValueError, match=r"call neve.step\(\) after the epoch's training"):
        report_epoch(trial, {keys.EPOCH: 0.0}, 0.5)
    with pytest.raises(TypeError, match="expects a neve_tune.NeVe"):
        report_epoch(trial, 0.3, 0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_epochs must be at least 1"):
        report_epoch(trial, metrics(1, 0.3), 0.5, max_epochs=0)


def _still_neve(torch, *, stop_threshold=1e-12):
    """A NeVe whose model stands still: V = 0, so with patience=0 the LR decays from epoch 3 on."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.01}]
    opt = torch.optim.SGD(groups, lr=0.1)
    return NeVe(model, opt, torch.randn(16, 4), momentum=0.0, patience=0, stop_threshold=stop_threshold)


def test_report_epoch_metrics_are_neves_metrics_key_for_key(storage_url):
    """What report_epoch stores is NeVe.metrics(), for a NeVe and for a StepResult, num_decays included."""
    torch = pytest.importorskip("torch")
    neve = _still_neve(torch)
    study = make_study(storage_url, NeVePruner())
    from_neve, from_result = study.ask(), study.ask()
    for _ in range(4):
        result = neve.step()
        expected = neve.metrics()
        assert report_epoch(from_neve, neve, 0.5) is None
        assert report_epoch(from_result, result, 0.5) is None
        for trial in (from_neve, from_result):
            stored = dict(trial.user_attrs[NEVE_ATTR])
            assert (stored.pop("step"), stored.pop("value")) == (result.epoch - 1, 0.5)
            assert stored == expected  # key for key, value for value
    assert expected[keys.NUM_DECAYS] >= 1.0 and keys.lr_key(1) in expected
    assert [e[keys.NUM_DECAYS] for e in from_result.user_attrs[HISTORY_ATTR]] == [0.0, 0.0, 1.0, 1.0]


def test_report_epoch_prunes_on_the_pruners_check_steps_only(storage_url):
    """With a NeVePruner, a NeVe failure prunes exactly where ``pruner.prune`` checks."""
    pruner = NeVePruner(n_warmup_steps=1, interval_steps=2)
    study = make_study(storage_url, pruner)
    trial = study.ask()
    for epoch in range(1, 7):
        m = metrics(epoch, 0.3, 0.0 if epoch > 1 else None, diverged=float(epoch >= 3))
        if not pruner.is_check_step(epoch - 1, range(epoch)):
            assert report_epoch(trial, m, 0.5) is None, epoch
            continue
        if epoch >= 3:
            with pytest.raises(optuna.TrialPruned):
                report_epoch(trial, m, 0.5)
            break
        assert report_epoch(trial, m, 0.5) is None
    assert (epoch, trial.user_attrs[STOP_REASON_ATTR]) == (4, "diverged")  # steps 1, 3, 5 are checks
    assert [pruner.is_check_step(s, range(s + 1)) for s in range(6)] == [False, True, False, True, False, True]
    assert pruner.is_check_step(4, [0, 1, 2, 4])  # step 3 was not reported: its check moves to step 4


# --- issue 12: one decision source, every reason ---------------------------------------------------------


def _flags(**set_flags):
    out = {keys.CONVERGED: 0.0, keys.STALLED: 0.0, keys.COLLAPSED: 0.0, keys.DIVERGED: 0.0, keys.STOP_THRESHOLD: 1e-3}
    out.update({"neve/" + k: v for k, v in set_flags.items()})
    return out


@pytest.mark.parametrize("reason", ["stalled", "collapsed"])
def test_stalled_and_collapsed_trials_end_pruned_never_best(storage_url, reason):
    study = make_study(storage_url, NeVePruner())
    good = study.ask()
    assert report_epoch(good, {**metrics(1, 5e-4), **_flags(converged=1.0)}, 0.5) is StopReason.CONVERGED
    study.tell(good, 0.5)
    bad = study.ask()
    assert report_epoch(bad, {**metrics(1, 0.2), **_flags()}, 0.9) is None
    with pytest.raises(optuna.TrialPruned, match=f"Trial 1 {reason} at epoch 2"):
        report_epoch(bad, {**metrics(2, 5e-4, 1e-4), **_flags(**{reason: 1.0})}, 0.99)
    study.tell(bad, state=TrialState.PRUNED)
    frozen = study.trials[1]
    assert frozen.state is TrialState.PRUNED
    assert (frozen.user_attrs[STOP_REASON_ATTR], frozen.user_attrs[STOP_EPOCH_ATTR]) == (reason, 2)
    assert study.best_trial.number == 0  # the higher value of the pruned trial never counts
    # Through should_prune too (a hand-written loop): the pruner prunes on the trial's flag.
    other = study.ask()
    other.set_user_attr(NEVE_ATTR, {**neve_attr(0, 5e-4), **_flags(**{reason: 1.0})})
    other.report(0.1, 0)
    assert other.should_prune()


def test_pruner_follows_the_trials_own_threshold_and_warns_once(storage_url):
    """Issue 12 item 2: NeVe(stop_threshold=0.01) with NeVePruner(stop_threshold=1e-3) stops where NeVe says."""
    study = make_study(storage_url, NeVePruner(stop_threshold=1e-3))
    trial = study.ask()
    own = {keys.STOP_THRESHOLD: 0.01}
    both = r"NeVePruner \(trial 0\) was given stop_threshold=0.001.*reports stop_threshold=0.01"
    with pytest.warns(UserWarning, match=both):
        assert report_epoch(trial, {**metrics(1, 0.2), **own}, 0.5) is None
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per trial
        # V = 5e-3: under the trial's 0.01, so its NeVe said converged; the pruner's 1e-3 does not recompute it.
        reason = report_epoch(trial, {**metrics(2, 5e-3, 1e-4, converged=1.0), **own}, 0.6)
    assert reason is StopReason.CONVERGED
    # And the reverse: V = 5e-4 is under the pruner's 1e-3, but the trial did not say converged.
    follow = make_study(storage_url.replace("optuna.db", "b.db"), NeVePruner())
    t = follow.ask()
    assert report_epoch(t, {**metrics(1, 5e-4), **_flags(), keys.STOP_THRESHOLD: 1e-4}, 0.5) is None


def test_report_epoch_with_train_loss_steps_neve(storage_url):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    neve = NeVe(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.randn(16, 4))
    study = make_study(storage_url, NeVePruner())
    trial = study.ask()
    assert report_epoch(trial, neve, 0.5, train_loss=torch.tensor(0.69)) is None
    assert neve.last_epoch == 1 and trial.user_attrs[NEVE_ATTR][keys.TRAIN_LOSS] == pytest.approx(0.69)
    neve.step(0.6)
    with pytest.raises(ValueError, match=r"already called for this epoch"):
        report_epoch(trial, neve, 0.5, train_loss=0.6)
    with pytest.raises(TypeError, match="needs the neve_tune.NeVe controller"):
        report_epoch(trial, neve.metrics(), 0.5, train_loss=0.6)
