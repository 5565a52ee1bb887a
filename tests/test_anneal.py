"""Anneal on convergence (issue 14): the cooldown's LRs and stop, scripted and on a real tiny model."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from neve_tune import Anneal, NeVe, NeVeRule, StopReason, noise_aux

HIGH, LOW = 0.5, 1e-4  # a model velocity above / under the default stop threshold 1e-3


def _drive(rule: NeVeRule, velocities, lr=1.0):
    """Step the rule on scripted velocities (D = 0), feeding back its LRs; the decisions until a stop."""
    lrs = [lr]
    out = []
    for v in velocities:
        d = rule.step(v, 0.0, lrs)
        lrs = list(d.lrs)
        out.append(d)
        if d.stop_reason is not None:
            break
    return out


def test_default_rule_is_the_papers_stop_at_first_convergence():
    rule = NeVeRule(min_epochs=0)
    decisions = _drive(rule, [HIGH, HIGH, LOW, LOW])
    assert rule.anneal is None
    assert [d.stop_reason for d in decisions] == [None, None, StopReason.CONVERGED]


def test_linear_cooldown_after_a_convergence_at_epoch_20():
    rule = NeVeRule(min_epochs=0, patience=100, anneal=Anneal(fraction=0.25, min_length=3))
    decisions = _drive(rule, [HIGH] * 19 + [LOW] * 10)
    # converged at epoch 20 -> a cooldown of ceil(0.25 * 20) = 5 epochs, LR x (1 - j/6), then converged
    assert len(decisions) == 25
    assert [d.stop_reason for d in decisions[:24]] == [None] * 24
    assert decisions[24].stop_reason is StopReason.CONVERGED
    lrs = [d.lrs[0] for d in decisions[19:]]
    assert lrs == pytest.approx([5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6, 1 / 6])
    assert [d.lr_decayed for d in decisions[19:]] == [True] * 5 + [False]
    assert rule.num_decays == 0  # the cooldown is not a plateau decay


@pytest.mark.parametrize(
    ("shape", "expected"),
    [("cosine", [0.5 * (1 + math.cos(math.pi * j / 4)) for j in (1, 2, 3)]), ("step", [0.1, 0.1, 0.1])],
)
def test_cosine_and_step_shapes(shape, expected):
    rule = NeVeRule(min_epochs=0, anneal=Anneal(shape=shape))
    decisions = _drive(rule, [HIGH, LOW, LOW, LOW, LOW, LOW])
    assert [d.lrs[0] for d in decisions[1:4]] == pytest.approx(expected)
    assert decisions[-1].stop_reason is StopReason.CONVERGED and len(decisions) == 5


def test_the_cap_cooldown_is_a_fraction_of_the_cap_and_a_convergence_cooldown_of_its_epoch():
    # cap 60: the unconverged trial starts ceil(0.2 * 60) = 12 cooldown epochs after epoch 48 ...
    rule = NeVeRule(min_epochs=0, patience=1000, anneal=Anneal(max_epochs=60))
    decisions = _drive(rule, [HIGH] * 60)
    lrs = [d.lrs[0] for d in decisions]
    assert lrs[:47] == pytest.approx([1.0] * 47) and lrs[47:59] == pytest.approx([1 - j / 13 for j in range(1, 13)])
    assert rule.annealer is not None and rule.annealer.by_cap and rule.annealer.length == 12
    # ... while one that converged at epoch 40 cools down for max(3, ceil(0.1 * 40)) = 4 epochs and stops
    rule = NeVeRule(min_epochs=0, patience=1000, anneal=Anneal(max_epochs=60))
    decisions = _drive(rule, [HIGH] * 39 + [LOW] * 10)
    assert len(decisions) == 44 and decisions[-1].stop_reason is StopReason.CONVERGED
    assert [d.lrs[0] for d in decisions[39:43]] == pytest.approx([0.8, 0.6, 0.4, 0.2])
    with pytest.raises(ValueError, match="cap_fraction"):
        Anneal(cap_fraction=1.0)


def test_a_trial_that_never_converges_is_annealed_into_the_cap():
    rule = NeVeRule(min_epochs=0, patience=100, anneal=Anneal(max_epochs=10))
    decisions = _drive(rule, [HIGH] * 10)
    # epoch 7 is the first with 7 + max(3, ceil(7/4)) >= 10: 3 cooldown epochs (8, 9, 10), no stop of its own
    assert [d.lrs[0] for d in decisions] == pytest.approx([1.0] * 6 + [0.75, 0.5, 0.25, 0.25])
    assert all(d.stop_reason is None for d in decisions)
    assert rule.annealer is not None and rule.annealer.by_cap and rule.annealer.done(10)


def test_a_convergence_near_the_cap_cools_down_only_until_the_cap():
    rule = NeVeRule(min_epochs=0, anneal=Anneal(fraction=0.5, max_epochs=10))
    decisions = _drive(rule, [HIGH, HIGH, HIGH, HIGH, LOW] + [LOW] * 10)
    # converged at epoch 5: ceil(2.5) = 3 epochs fit before the cap
    assert [d.lrs[0] for d in decisions[4:]] == pytest.approx([0.75, 0.5, 0.25, 0.25])
    assert decisions[-1].stop_reason is StopReason.CONVERGED and len(decisions) == 8


def test_divergence_during_the_cooldown_stops_it():
    rule = NeVeRule(min_epochs=0, anneal=Anneal())
    decisions = _drive(rule, [HIGH, LOW, math.nan, LOW])
    assert [d.stop_reason for d in decisions] == [None, None, StopReason.DIVERGED]


def test_stalled_is_not_annealed():
    rule = NeVeRule(min_epochs=0, anneal=Anneal())
    decisions = _drive(rule, [LOW, LOW])  # never moved: stalled at once, no cooldown
    assert decisions[0].stop_reason is StopReason.STALLED and decisions[0].lrs == [1.0]


def test_state_round_trip_mid_cooldown_is_json_and_decides_the_same():
    a = NeVeRule(min_epochs=0, anneal=Anneal(fraction=0.5, shape="cosine"))
    _drive(a, [HIGH] * 5 + [LOW] * 2)  # converged at 6, one cooldown step taken
    state = json.loads(json.dumps(a.state_dict()))
    b = NeVeRule(min_epochs=0)  # the settings come from the state
    b.load_state_dict(state)
    assert b.anneal == a.anneal and b.annealer.start == 6
    lrs = list(a.step(LOW, 0.0, [0.5]).lrs)
    assert list(b.step(LOW, 0.0, [0.5]).lrs) == lrs
    for _ in range(5):
        da, db = a.step(LOW, 0.0, lrs), b.step(LOW, 0.0, lrs)
        assert da == db
        lrs = list(da.lrs)


def test_a_state_carries_its_anneal_setting():
    cooled = NeVeRule(min_epochs=0, anneal=Anneal())
    plain = NeVeRule(min_epochs=0)
    plain.load_state_dict(cooled.state_dict())
    assert plain.anneal == Anneal() and not plain.annealer.cooling
    paper = NeVeRule(min_epochs=0, anneal=Anneal())
    paper.load_state_dict(NeVeRule(min_epochs=0).state_dict())  # a state of a rule without anneal
    assert paper.anneal is None
    state = NeVeRule(min_epochs=0).state_dict()
    del state["anneal"]
    with pytest.raises(ValueError, match=r"lacks \['anneal'\]"):
        paper.load_state_dict(state)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fraction": -0.1}, "fraction"),
        ({"min_length": 0}, "min_length"),
        ({"shape": "exp"}, "shape"),
        ({"step_factor": 1.0}, "step_factor"),
        ({"max_epochs": 0}, "max_epochs"),
    ],
)
def test_bad_anneal_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Anneal(**kwargs)
    with pytest.raises(TypeError, match="Anneal"):
        NeVeRule(anneal=0.25)  # type: ignore[arg-type]


# ---------------------------------------------------------------- a real tiny model


def _digits_run(anneal, epochs=60):
    """The README's digits loop (seed 0, one thread): per epoch (V, LR used next, decision)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        data = load_digits()
        x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16
        y = torch.tensor(data.target)
        x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, stratify=y, random_state=0)
        model = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(256, 10),
        )  # fmt: skip
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        neve = NeVe(model, opt, noise_aux((1, 8, 8), n=100), anneal=anneal)
        steps = []
        for _ in range(epochs):
            model.train()
            total = 0.0
            for xb, yb in zip(x_tr.split(64), y_tr.split(64), strict=True):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(xb), yb)
                loss.backward()
                opt.step()
                total += loss.item() * len(yb)
            step = neve.step(total / len(y_tr))
            steps.append((step.model_velocity, opt.param_groups[0]["lr"], step.stop_reason))
            if neve.should_stop:
                break
        model.eval()
        with torch.no_grad():
            acc = (model(x_te).argmax(1) == y_te).float().mean().item()
        return steps, acc
    finally:
        torch.set_num_threads(threads)


def test_real_model_anneals_after_its_first_convergence_and_then_converges():
    pure, pure_acc = _digits_run(None)
    cooled, cooled_acc = _digits_run(Anneal())
    assert len(pure) == 18 and pure[-1][2] is StopReason.CONVERGED  # the paper's rule stops at epoch 18
    assert [v for v, _, _ in cooled[:18]] == [v for v, _, _ in pure]  # identical up to the convergence
    # then max(3, ceil(18 / 10)) = 3 cooldown epochs at 0.1 x (3/4, 2/4, 1/4), and converged
    assert len(cooled) == 21 and cooled[-1][2] is StopReason.CONVERGED
    assert [lr for _, lr, _ in cooled[17:20]] == pytest.approx([0.1 * k / 4 for k in (3, 2, 1)])
    assert all(reason is None for _, _, reason in cooled[:-1])
    assert cooled_acc >= pure_acc - 0.005 and cooled_acc >= 0.98


def test_the_neve_arms_policy_anneals_into_the_studys_cap_and_neve_pure_does_not():
    from neve_tune.studies import NeVePolicy, get_study
    from neve_tune.studies._policy import AnnealingNeVePolicy

    budget = get_study("digits").budget
    policies = []
    for cls in (AnnealingNeVePolicy, NeVePolicy):
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        policies.append(cls(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.randn(10, 4), budget))
    annealing, pure = policies
    assert annealing.neve.rule.anneal == Anneal(fraction=0.1, cap_fraction=0.2, max_epochs=budget.max_epochs)
    assert pure.neve.rule.anneal is None
    for p in policies:
        p.close()


def test_step_result_says_it_is_annealing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    neve = NeVe(model, opt, torch.randn(16, 4), min_epochs=0, anneal=Anneal())
    neve.rule.detector.peak_velocity = 1.0  # it moved before: the next still epoch is a convergence
    first = neve.step(0.1)  # the model did not move: V = 0 < threshold, with a learned loss: converged
    assert first.stop_reason is None and first.annealing and first.lr_decayed
    assert opt.param_groups[0]["lr"] == pytest.approx(0.075) and "annealing after convergence" in first.message
