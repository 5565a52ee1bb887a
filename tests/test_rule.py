"""NeVeRule: scripted velocity sequences give decays and stops at exactly the expected epochs."""

from __future__ import annotations

import ast
import doctest
import json
import math
from pathlib import Path

import pytest

import neve_tune
from neve_tune import NeVeRule, StopCriteria, StopReason, decide, keys


def run(rule: NeVeRule, script, lrs=(0.1,)):
    """Feed (V, D) pairs; return per-epoch (lrs, decayed, reason)."""
    out = []
    for v, d in script:
        decision = rule.step(v, d, lrs)
        lrs = decision.lrs
        out.append((decision.lrs, decision.lr_decayed, decision.stop_reason))
    return out


def test_decay_fires_when_bad_epochs_exceed_patience_then_best_resets():
    rule = NeVeRule(patience=2, factor=0.5)
    # epoch 1 has no D. D: 1.0 (best), then 3 bad epochs -> decay at the 3rd bad one (bad=3 > 2).
    script = [(0.5, None), (0.5, 1.0), (0.5, 1.0), (0.5, 2.0), (0.5, 1.5), (0.5, 9.0), (0.5, 9.0), (0.5, 9.0)]
    result = run(rule, script)
    decays = [epoch for epoch, (_, decayed, _) in enumerate(result, start=1) if decayed]
    assert decays == [5]
    assert [r[0][0] for r in result] == [0.1, 0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.05]
    # after the decay best=+inf: 9.0 (epoch 6) is an improvement, epochs 7-8 are bad (2, not > 2)
    assert rule.best == 9.0 and rule.bad_epochs == 2 and rule.num_decays == 1


def test_equal_value_is_not_an_improvement_threshold_zero():
    rule = NeVeRule(patience=0)
    assert not rule.step(1.0, 0.3, [1.0]).lr_decayed  # improvement from +inf
    assert rule.step(1.0, 0.3, [1.0]).lr_decayed  # equal: bad epoch 1 > patience 0
    assert not rule.step(1.0, 0.29, [0.5]).lr_decayed  # best was reset, any finite value improves


def test_patience_zero_and_large_patience():
    strictly_decreasing = [(1.0, None)] + [(1.0, 1.0 / k) for k in range(1, 30)]
    assert not any(d for _, d, _ in run(NeVeRule(patience=0), strictly_decreasing))
    flat = [(1.0, None)] + [(1.0, 0.5)] * 30
    epochs = [i + 1 for i, (_, d, _) in enumerate(run(NeVeRule(patience=10), flat)) if d]
    # epoch 2 sets best; epochs 3..13 are bad 1..11; 11 > 10 at epoch 13; then 14 sets best, 25 decays
    assert epochs == [13, 25]


def test_min_lr_floor_scalar_and_per_group():
    rule = NeVeRule(patience=0, factor=0.1, min_lr=0.02)
    rule.step(1.0, None, [0.1])
    rule.step(1.0, 1.0, [0.1])
    d = rule.step(1.0, 2.0, [0.1])
    assert d.lrs == [0.02] and d.lr_decayed
    rule.step(1.0, 1.0, d.lrs)
    d = rule.step(1.0, 2.0, (0.02,))
    assert d.lrs == [0.02] and not d.lr_decayed and rule.num_decays == 1  # already at the floor

    rule = NeVeRule(patience=0, factor=0.5, min_lr=[0.0, 0.3])
    rule.step(1.0, 1.0, [1.0, 0.4])
    d = rule.step(1.0, 2.0, [1.0, 0.4])
    assert d.lrs == [0.5, 0.3]
    with pytest.raises(ValueError, match="expected 3 min_lrs"):
        rule.step(1.0, 1.0, [1.0, 1.0, 1.0])


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_velocity_or_change_means_diverged_and_is_not_a_bad_epoch(bad):
    rule = NeVeRule(patience=0)
    rule.step(1.0, 1.0, [0.1])
    d = rule.step(bad, 0.5, [0.1])
    assert d.stop_reason is StopReason.DIVERGED and d.diverged and d.should_stop
    assert not d.lr_decayed and rule.bad_epochs == 0
    d = rule.step(0.5, bad, [0.1])
    assert d.diverged and not d.lr_decayed and rule.bad_epochs == 0 and rule.best == 1.0


def test_stop_when_velocity_under_threshold():
    rule = NeVeRule(stop_threshold=1e-3, min_epochs=0)  # no warm-up: the bare stop test
    reasons = [r for _, _, r in run(rule, [(0.5, None), (0.01, 0.1), (0.0011, 0.01), (0.00099, 0.001)])]
    assert reasons == [None, None, None, StopReason.CONVERGED]
    assert str(StopReason.CONVERGED) == "converged"


def test_plateau_on_model_velocity():
    rule = NeVeRule(patience=1, plateau_on="model_velocity")
    result = run(rule, [(0.5, None), (0.6, 0.1), (0.7, 0.01)])
    assert [d for _, d, _ in result] == [False, False, True]  # V counted from epoch 1


def test_state_dict_is_json_and_resumes_identically():
    script = [(0.5, None)] + [(0.5, 1.0 / (1 + (k % 4))) for k in range(20)]
    full = NeVeRule(patience=2)
    expected = run(full, script)
    first = NeVeRule(patience=2)
    head = run(first, script[:9])
    state = json.loads(json.dumps(first.state_dict()))
    resumed = NeVeRule()
    resumed.load_state_dict(state)
    tail = run(resumed, script[9:], lrs=head[-1][0])
    assert head + tail == expected


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"factor": 1.0}, "factor must be between 0 and 1"),
        ({"factor": 0.0}, "factor must be between 0 and 1"),
        ({"patience": -1}, "patience must be a non-negative integer"),
        ({"stop_threshold": math.nan}, "stop_threshold must be a finite number"),
        ({"min_lr": -1.0}, "min_lr must be a number >= 0"),
        ({"plateau_on": "loss"}, "plateau_on must be"),
    ],
)
def test_invalid_settings_are_rejected_eagerly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NeVeRule(**kwargs)


# ----------------------------------------------------------------------------------- decide()
def metrics(v, d=None, **flags):
    """A flat metrics dict as NeVe.metrics() reports it (only the keys decide() reads)."""
    out = {keys.EPOCH: 3.0, keys.MODEL_VELOCITY: v, keys.LR: 0.1}
    if d is not None:
        out[keys.VELOCITY_CHANGE] = d
    out.update({getattr(keys, name.upper()): value for name, value in flags.items()})
    return out


def _real_metrics(lr: float, epochs: int, *, min_epochs: int = 2, seed: int = 0) -> list[dict[str, float]]:
    """``NeVe.metrics()`` after each epoch of a tiny real model trained with ``lr`` (full-batch SGD)."""
    import torch
    from torch import nn

    from neve_tune import NeVe

    torch.manual_seed(seed)
    x = torch.randn(64, 4)
    y = (x[:, 0] > 0).long()
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    neve = NeVe(model, opt, torch.randn(16, 4), min_epochs=min_epochs, patience=2)
    out = []
    for _ in range(epochs):
        for _ in range(5):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        neve.step(loss.item())
        out.append(neve.metrics())
        if neve.should_stop:
            break
    return out


def test_decide_on_a_real_run_that_never_moves_says_stalled():
    history = _real_metrics(lr=0.0, epochs=10, min_epochs=3)
    assert [decide(m) for m in history] == [None] * 5 + [StopReason.STALLED]
    assert history[-1][keys.EPOCH] == 6.0 and history[-1][keys.STALLED] == 1.0
    assert all(m[keys.MODEL_VELOCITY] == 0.0 for m in history)


def test_decide_on_a_real_run_that_learns_says_converged_at_the_epoch_neve_stopped():
    history = _real_metrics(lr=0.5, epochs=200)
    assert [decide(m) for m in history] == [None] * 12 + [StopReason.CONVERGED]
    last = history[-1]
    assert last[keys.EPOCH] == 13.0 and last[keys.CONVERGED] == 1.0
    # V fell under the threshold at epoch 6, but the loss still fell: NeVe kept training until 13.
    under = [int(m[keys.EPOCH]) for m in history if m[keys.MODEL_VELOCITY] < m[keys.STOP_THRESHOLD]]
    assert under[0] == 6 and under[-1] == 13


def test_decide_on_a_real_run_whose_loss_turns_nan_says_diverged():
    history = _real_metrics(lr=0.5, epochs=2)
    poisoned = {**history[-1], keys.MODEL_VELOCITY: math.nan}
    assert decide(history[-1]) is None and decide(poisoned) is StopReason.DIVERGED


def test_decide_nan_policy_non_finite_is_diverged_never_converged():
    for bad in (math.nan, math.inf, -math.inf):
        assert decide(metrics(bad)) is StopReason.DIVERGED
        assert decide(metrics(1e-9, bad)) is StopReason.DIVERGED  # V tiny, D broken
        assert decide(metrics(bad, converged=1.0)) is StopReason.DIVERGED  # non-finite beats the flag
        assert decide(metrics(1e-9, bad, converged=1.0)) is StopReason.DIVERGED
    # Optuna user attributes store non-finite floats as strings.
    assert decide(metrics("nan")) is StopReason.DIVERGED
    assert decide(metrics(0.5, "-inf")) is StopReason.DIVERGED
    assert decide(metrics("0.0005", "0.0", converged="1.0")) is StopReason.CONVERGED


def test_decide_reads_the_trials_own_flags_never_a_threshold():
    assert decide(metrics(1e-5)) is None  # the trial's own NeVe did not say converged
    assert decide(metrics(1e-5, 0.0, converged=1.0)) is StopReason.CONVERGED
    assert decide(metrics(0.5, 0.1, converged=1.0)) is StopReason.CONVERGED  # its own threshold decided
    assert decide(metrics(0.5, 0.1, diverged=1.0)) is StopReason.DIVERGED
    assert decide(metrics(0.5, 0.1, converged=0.0, diverged=0.0)) is None
    assert decide(metrics(1e-5, 0.0, converged=0.0)) is None  # V tiny, but the trial did not say so


def test_decide_without_a_velocity_is_no_decision():
    assert decide({}) is None
    assert decide({keys.EPOCH: 2.0, keys.LR: 0.1}) is None  # a re-baseline step
    assert decide({keys.MODEL_VELOCITY: None, keys.DIVERGED: 1.0}) is None
    assert decide({keys.VELOCITY_CHANGE: math.nan}) is None


def test_decide_custom_keys_and_extra_keys_are_ignored():
    result = {"my/v": 1e-5, "my/d": math.inf, keys.MODEL_VELOCITY: 0.5, "loss": "not a number"}
    assert decide(result, velocity_key="my/v", change_key="my/d") is StopReason.DIVERGED
    assert decide(result) is None


def test_decide_is_stateless_and_does_not_touch_its_input():
    m = metrics(4e-4, 1e-6, converged=1.0)
    before = dict(m)
    decisions = {decide(m) for _ in range(3)}
    assert decisions == {StopReason.CONVERGED} and m == before
    assert decide(m)  # a StopReason is truthy: `if decide(m): stop`
    assert decide(metrics(0.5, 0.1)) is None


def test_decide_errors_name_the_key_and_the_fix():
    with pytest.raises(TypeError, match=r"expects a number under 'neve/model_velocity'.*'fast' \(str\)"):
        decide(metrics("fast"))
    with pytest.raises(TypeError, match=r"under 'neve/velocity_change'.*\[0.1\] \(list\).*neve.metrics\(\)"):
        decide(metrics(0.5, [0.1]))
    with pytest.raises(TypeError, match=r"under 'neve/stalled'.*'yes' \(str\)"):
        decide(metrics(0.5, stalled="yes"))


def test_decide_docstring_example_runs():
    finder = doctest.DocTestFinder()
    (test,) = finder.find(decide, "decide", globs={})
    result = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS).run(test)
    assert result.attempted >= 4 and result.failed == 0


def test_stop_reason_is_spelled_once_in_keys():
    assert neve_tune.StopReason is keys.StopReason is StopReason
    assert [r.value for r in StopReason] == [
        "converged", "stalled", "collapsed", "memorizing", "diverged", "max_t", "pruned"
    ]
    assert [r.value for r in StopReason if r.is_failure] == ["stalled", "collapsed", "diverged", "pruned"]
    assert str(StopReason.MAX_T) == "max_t" and StopReason("diverged") is StopReason.DIVERGED
    assert "StopReason" in keys.__all__ and "decide" in neve_tune.__all__


# The integrations decide through public names only: `neve_tune`, `neve_tune.keys`, and their own package.
INTEGRATION_MODULES = [
    "neve_tune/ray/_scheduler.py",
    "neve_tune/ray/_trainable.py",
    "neve_tune/optuna/_pruner.py",
    "neve_tune/optuna/_report.py",
]


@pytest.mark.parametrize("path", INTEGRATION_MODULES)
def test_integrations_import_no_private_core_module(path):
    source = Path(__file__).resolve().parents[1] / path
    own = "neve_tune." + source.parent.name
    imported = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: use absolute imports of public names"
            imported.add(node.module or "")
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    ours = {m for m in imported if m == "neve_tune" or m.startswith("neve_tune.")}
    allowed = {"neve_tune", "neve_tune.keys"}
    bad = sorted(m for m in ours if m not in allowed and not (m == own or m.startswith(own + ".")))
    assert not bad, f"{path} imports {bad}; use the public `neve_tune` / `neve_tune.keys` names"


# --- issue 12: converged / stalled / collapsed (the StopDetector inside NeVeRule) --------------------------


def decisions(rule, script):
    """Feed (V, u, loss) triples (D is V's change); return the per-epoch (reason, detail)."""
    out = []
    previous = None
    for v, u, loss in script:
        d = None if previous is None else (v - previous) ** 2
        previous = v
        decision = rule.step(v, d, (0.1,), raw_change=u, train_loss=loss)
        out.append((decision.stop_reason, decision.detail))
    return out


def test_warm_up_decides_only_divergence():
    rule = NeVeRule(min_epochs=3)
    reasons = [r for r, _ in decisions(rule, [(0.5, 0.5, None), (1e-4, 1e-4, None), (1e-4, 1e-4, None)])]
    assert reasons == [None, None, StopReason.CONVERGED]  # V < thr from epoch 2, decided at epoch 3
    rule = NeVeRule(min_epochs=30)
    assert decisions(rule, [(0.5, 0.5, None), (math.nan, 0.5, None)])[-1][0] is StopReason.DIVERGED
    rule = NeVeRule(min_epochs=30)
    reason, detail = decisions(rule, [(0.5, 0.5, 2.3), (0.4, 0.5, math.inf)])[-1]
    assert reason is StopReason.DIVERGED and detail == "the training loss is inf"


def test_without_loss_a_network_that_never_moved_is_stalled():
    peak = 1.9e-3  # under peak_ratio (2) * stop_threshold (1e-3)
    rule = NeVeRule(min_epochs=2)
    got = decisions(rule, [(peak, peak, None), (5e-4, 5e-4, None)])
    assert got[-1] == (StopReason.STALLED, "it never moved: peak model velocity 0.0019")
    rule = NeVeRule(min_epochs=2)
    assert decisions(rule, [(2e-3, 2e-3, None), (5e-4, 5e-4, None)])[-1][0] is StopReason.CONVERGED
    rule = NeVeRule(min_epochs=2, criteria=StopCriteria(peak_ratio=20))
    assert decisions(rule, [(1e-2, 1e-2, None), (5e-4, 5e-4, None)])[-1][0] is StopReason.STALLED


def test_an_abrupt_freeze_is_collapsed_after_the_warm_up_unless_the_loss_says_it_learned():
    frozen = [(0.9, 0.9, None), (0.8, 0.8, None), (0.5, 0.5, None), (0.4, 4e-5, None), (0.2, 1e-9, None)]
    rule = NeVeRule(min_epochs=5)
    got = decisions(rule, frozen)
    assert [r for r, _ in got] == [None, None, None, None, StopReason.COLLAPSED]
    assert "froze at epoch 4" in got[-1][1]
    assert rule.detector.froze_at == 4
    # The same freeze in a network whose loss fell to 10% of log(10): never collapsed.
    learned = [(v, u, 0.2) for v, u, _ in frozen]
    assert all(r is None for r, _ in decisions(NeVeRule(min_epochs=5, num_classes=10), learned))
    # A gradual decay (1e-3x in 3 epochs, steeper than any healthy run measured) is not a freeze.
    gradual = [(0.9, 0.9, None), (0.5, 0.1, None), (0.2, 0.01, None), (0.1, 9e-4, None), (0.05, 5e-4, None)]
    assert all(r is None for r, _ in decisions(NeVeRule(min_epochs=5), gradual))


def test_with_loss_converged_needs_half_the_chance_loss_removed():
    chance = math.log(10)
    moving = [(0.5, 0.5, chance)] * 4
    rule = NeVeRule(min_epochs=5, num_classes=10)
    got = decisions(rule, [*moving, (5e-4, 5e-4, 0.4 * chance), (5e-4, 5e-4, 0.4 * chance)])
    assert got[-2][0] is None  # the loss fell a lot over the last window: still learning
    rule = NeVeRule(min_epochs=5, num_classes=10)
    got = decisions(rule, [(0.5, 0.5, 0.3)] * 4 + [(5e-4, 5e-4, 0.3)])
    assert got[-1][0] is StopReason.CONVERGED  # p = 0.87
    rule = NeVeRule(min_epochs=5, num_classes=10)
    got = decisions(rule, [(0.5, 0.5, 0.97 * chance)] * 6 + [(5e-4, 5e-4, 0.97 * chance)])
    assert got[-1] == (StopReason.STALLED, "only 3% of the chance-level loss removed, and the loss no longer falls")


def test_with_loss_a_slow_learner_keeps_training_while_its_loss_falls():
    chance = math.log(10)
    # 4% of log C per epoch for 15 epochs, then flat; V is under the threshold throughout.
    losses = [chance * (1 - 0.04 * min(t, 15)) for t in range(20)]
    rule = NeVeRule(min_epochs=5, num_classes=10)
    got = decisions(rule, [(5e-4, 5e-4, loss) for loss in losses])
    first_stop = next(t for t, (r, _) in enumerate(got, 1) if r is not None)
    # p passes learned=0.25 at epoch 9, but the loss still falls by 4% per epoch: it is not done, whatever V
    # says (before this rule it was called converged there, mid-descent). The loss is flat from epoch 16;
    # the slope over two 3-epoch windows first drops under min_slope=1% at epoch 20 (0.44%).
    assert got[first_stop - 1][0] is StopReason.CONVERGED and first_stop == 20
    assert rule.detector.slope() == pytest.approx(0.04 / 9, rel=1e-9)


def test_with_loss_a_trial_stuck_at_chance_while_moving_is_stalled_unsettled():
    rule = NeVeRule(min_epochs=5, num_classes=5, criteria=StopCriteria(chance_epochs=4))
    got = decisions(rule, [(1e-2, 1e-2, math.log(5))] * 20)
    epoch = next(t for t, (r, _) in enumerate(got, 1) if r is not None)
    # The slope exists from epoch 6 (two loss windows): epochs 6-9 without progress.
    assert epoch == 9 and got[epoch - 1][0] is StopReason.STALLED
    assert got[epoch - 1][1].startswith("unsettled: not learning while still moving")
    # Without the loss the same trial never stops (nothing validation-free separates it from learning).
    assert all(r is None for r, _ in decisions(NeVeRule(min_epochs=5), [(1e-2, 1e-2, None)] * 20))


def test_unknown_classes_use_the_first_loss_as_reference():
    rule = NeVeRule(min_epochs=3, num_classes=None)
    got = decisions(rule, [(0.5, 0.5, 100.0), (0.5, 0.5, 10.0), (5e-4, 5e-4, 10.0)])
    assert rule.detector.reference_loss == 100.0 and got[-1][0] is StopReason.CONVERGED  # p = 0.6
    rule = NeVeRule(min_epochs=2, num_classes=None)
    got = decisions(rule, [(0.5, 0.5, -1.0), (5e-4, 5e-4, -2.0)])  # L_ref <= 0: judged as without a loss
    assert got[-1][0] is StopReason.CONVERGED and rule.detector.progress() is None


def test_detector_state_round_trip_mid_run_gives_identical_decisions():
    import json

    script = [(0.9, 0.9, 2.3), (0.8, 0.8, 2.2), (0.5, 0.5, 2.3), (0.4, 4e-5, 2.3), (0.2, 1e-9, 2.3)]
    whole = decisions(NeVeRule(num_classes=10), script)
    first = NeVeRule(num_classes=10)
    decisions(first, script[:3])
    resumed = NeVeRule()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert resumed.num_classes == 10 and resumed.min_epochs == 5
    # D at the resume point is recomputed from V by the helper, so compare reasons only.
    assert [r for r, _ in decisions(resumed, script[3:])] == [r for r, _ in whole[3:]] == [None, StopReason.COLLAPSED]


def test_a_state_missing_entries_is_refused_and_changes_nothing():
    rule = NeVeRule(criteria=StopCriteria(peak_ratio=3.0), min_epochs=2)
    state = rule.state_dict()
    del state["detector"], state["min_epochs"]
    with pytest.raises(ValueError, match=r"lacks \['detector', 'min_epochs'\].*not written by NeVeRule.state_dict"):
        rule.load_state_dict(state)
    assert rule.criteria.peak_ratio == 3.0 and rule.min_epochs == 2  # the user's settings are kept


def test_a_state_restores_the_users_criteria_not_the_defaults():
    rule = NeVeRule(criteria=StopCriteria(peak_ratio=3.0, learned=0.4), num_classes=10)
    other = NeVeRule()
    other.load_state_dict(json.loads(json.dumps(rule.state_dict())))
    assert other.criteria == rule.criteria and other.num_classes == 10


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"peak_ratio": 0.0}, r"peak_ratio must be a finite number > 0, but got peak_ratio=0.0."),
        ({"freeze_ratio": math.inf}, r"freeze_ratio must be a finite number > 0, but got freeze_ratio=inf."),
        ({"learned": 1.5}, r"learned must be in \(0, 1\], but got learned=1.5."),
        ({"chance_progress": 0.0}, r"chance_progress must be in \(0, 1\], but got chance_progress=0.0."),
        ({"chance_epochs": 0}, r"chance_epochs must be an integer >= 1, but got chance_epochs=0."),
        ({"loss_window": 1.5}, r"loss_window must be an integer >= 1, but got loss_window=1.5."),
    ],
)
def test_stop_criteria_are_validated_with_their_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StopCriteria(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"stop_threshold": 0.0}, r"stop_threshold must be a finite number > 0, but got stop_threshold=0.0."),
        ({"min_epochs": -1}, r"min_epochs must be an integer >= 0, but got min_epochs=-1."),
        ({"num_classes": 1}, r"num_classes must be None, 0 \(unknown\) or an integer >= 2, but got num_classes=1."),
    ],
)
def test_rule_settings_are_validated_with_their_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NeVeRule(**kwargs)


def test_decide_reads_every_reason_from_the_flags_in_a_fixed_order():
    assert decide(metrics(1e-4, stalled=1.0, converged=0.0)) is StopReason.STALLED
    assert decide(metrics(1e-4, collapsed=1.0, stalled=1.0)) is StopReason.COLLAPSED
    assert decide(metrics(1e-4, diverged=1.0, collapsed=1.0)) is StopReason.DIVERGED
    assert decide(metrics(1e-4, stalled=0.0, collapsed=0.0, converged=0.0, diverged=0.0)) is None
    assert decide(metrics(1e-4, stalled="1.0")) is StopReason.STALLED  # Optuna attrs may hold strings


def test_settings_disagreement_names_both_values():
    from neve_tune._decide.decide import settings_disagreement

    assert "settings_disagreement" not in neve_tune.__all__

    m = {keys.STOP_THRESHOLD: 0.01}
    message = settings_disagreement(m, 1e-3, "NeVePruner")
    assert "NeVePruner was given stop_threshold=0.001" in message and "reports stop_threshold=0.01" in message
    assert settings_disagreement(m, 0.01, "x") is None and settings_disagreement(m, None, "x") is None
    assert settings_disagreement({}, 1e-3, "x") is None  # nothing reported to compare with
