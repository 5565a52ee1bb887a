"""studies/memorization_scoring.py: the LabelWave detector and the cross-trial signals, on synthetic rows."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "studies" / "memorization_scoring.py"
_spec = importlib.util.spec_from_file_location("memorization_scoring", _PATH)
assert _spec is not None and _spec.loader is not None
ms = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ms)

# a flip curve that falls to its minimum at epoch 7 (smoothed over 3 epochs) and then climbs: memorisation
V_CURVE = [None, 0.8, 0.6, 0.4, 0.2, 0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 0.9]


def _trial(flips, losses, tests, *, reason="converged", susc=0.1, acc=0.5, wave=None, preds=None):
    rows = [
        {
            "epoch": i + 1,
            "loss": loss,
            "acc": acc,
            "flips": f,
            "test": t,
            "susc": susc,
            "susc_probe": susc / 10,
            "lr": 0.1,
        }
        for i, (f, loss, t) in enumerate(zip(flips, losses, tests, strict=True))
    ]
    p = preds or [0, 1, 2, 3]
    return {
        "config": {"config_id": 0, "lr": 0.1},
        "reason": reason,
        "rows": rows,
        "wave": wave,
        "preds": {"12": p, "today": p, "restored": p, "final": p},
        "labels": [0, 1, 2, 3],
    }


def test_smoothing_waits_for_k_defined_counts():
    assert ms.smoothed([None, 0.6, 0.3, 0.3, 0.0]) == [None, None, None, pytest.approx(0.4), pytest.approx(0.2)]


def test_labelwave_fires_patience_epochs_after_the_minimum_of_the_smoothed_count():
    assert ms.labelwave(V_CURVE) == (7, 12)
    assert ms.labelwave(V_CURVE[:11]) == (7, None)  # four epochs past the minimum: not yet
    assert ms.labelwave([None, 0.5, 0.4, 0.3, 0.2, 0.1]) == (6, None)  # a falling count never fires
    assert ms.labelwave([None, 0.5]) == (None, None)


def test_rise_measures_the_climb_after_the_minimum():
    t = _trial(V_CURVE, [1.0] * 12, [0.5] * 12)
    assert ms.rise(t) == pytest.approx((0.8 + 0.9 + 0.9) / 3 / 0.2 - 1)
    assert ms.rise(_trial([None, 0.5, 0.4, 0.3, 0.2, 0.1], [1.0] * 6, [0.5] * 6)) == 0.0


def test_rise_and_minimum_only_see_the_constant_lr_phase():
    t = _trial([*V_CURVE, 0.0, 0.0, 0.0], [1.0] * 15, [0.5] * 15)
    for row in t["rows"][12:]:
        row["lr"] = 0.05  # a cooldown: flips vanish, which is no minimum of the memorisation curve
    assert len(ms.constant_phase(t)) == 12
    assert ms.min_smoothed(t) == pytest.approx(0.2)
    assert ms.rise(t) == pytest.approx((0.8 + 0.9 + 0.9) / 3 / 0.2 - 1)


def test_outcome_of_each_variant():
    wave = {"min_epoch": 7, "stop_epoch": 12, "anneal": [{"test": 0.7}, {"test": 0.8}, {"test": 0.9}]}
    tests = [0.1 * i / 2 for i in range(12)]
    t = _trial(V_CURVE, [1.0] * 12, tests, wave=wave)
    assert ms.outcome(t, "today") == (tests[-1], 12)
    assert ms.outcome(t, "restore") == (tests[6], 12)
    assert ms.outcome(t, "restore+anneal") == (0.9, 15)
    assert ms.memorization_point(t) == 7
    assert ms.outcome(_trial(V_CURVE, [1.0] * 12, tests), "restore+anneal") == (tests[-1], 12)  # never fired


def test_rho_and_regret_pick_the_highest_value():
    rho, regret, pick = ms.rho_and_regret([1.0, 2.0, 3.0, 4.0], [0.1, 0.3, 0.2, 0.4])
    assert rho == pytest.approx(0.8)  # 1 - 6 * 2 / (4 * 15)
    assert (regret, pick) == (0.0, 3)
    rho, regret, pick = ms.rho_and_regret([4.0, math.nan, 3.0], [0.5, 0.9, 0.7])
    assert (regret, pick) == (pytest.approx(0.4), 0)


def test_signals_use_the_rows_up_to_the_memorisation_point_and_skip_stalled_trials():
    wave = {
        "min_epoch": 2,
        "stop_epoch": 7,
        "anneal": [{"test": 0.6, "loss": 0.9, "acc": 0.6}],
        "susc_probe_final": 0.02,
        "susc_probe_restored": 0.05,
    }
    memorises = _trial([None, 0.3, 0.2, 0.2], [2.0, 1.0, 0.1, 0.01], [0.5] * 4, wave=wave, susc=0.4)
    resists = _trial([None, 0.3, 0.2, 0.2], [2.0, 1.0, 0.8, 0.6], [0.7] * 4, susc=0.2)
    stalled = _trial([None, 0.0, 0.0, 0.0], [2.3] * 4, [0.1] * 4, reason="stalled")
    assert ms.pool([memorises, resists, stalled]) == [memorises, resists]
    sig = ms.pool_signals([memorises, resists], "restore+anneal")
    assert sig["(a) mean train loss to the memorisation point"] == [pytest.approx(-1.5), pytest.approx(-1.1)]
    assert sig["today: mean train loss of the whole run (shipped pick)"] == [
        pytest.approx(-3.11 / 4),
        pytest.approx(-1.1),
    ]
    assert sig["(c) susceptibility zeta to the memorisation point (low)"] == [pytest.approx(-0.4), pytest.approx(-0.2)]
    assert sig["(c) susceptibility, probe LR, final weights (low)"] == [pytest.approx(-0.02), pytest.approx(-0.02)]
    # what today's pick rule would see under the new policy: epochs 1..stop and the cooldown
    assert sig["shipped rule on the variant's run: mean train loss over every epoch it trained"] == [
        pytest.approx(-4.01 / 5),
        pytest.approx(-1.1),
    ]
    assert sig["(c) zeta / LR (low)"] == [pytest.approx(-4.0), pytest.approx(-2.0)]
    assert sig["final train loss of the variant's run"] == [-0.9, -0.6]
    table = {
        name: (rho, regret, picked)
        for name, rho, regret, picked in ms.score_table([memorises, resists, stalled], "restore+anneal")
    }
    # the memorising trial ends at 0.6 after its restore and cooldown, the other at 0.7: today's pick takes the
    # memorising one (its whole run's mean loss is lower), (a) the other
    assert table["today: mean train loss of the whole run (shipped pick)"][1:] == (pytest.approx(0.1), 0.6)
    assert table["(a) mean train loss to the memorisation point"][1:] == (0.0, 0.7)


def test_consensus_agreement_and_vote():
    assert ms.vote([[0, 1, 2], [0, 2, 2], [1, 2, 2]]) == [0, 2, 2]
    assert ms.agreement([0, 1, 2, 3], [0, 1, 0, 0]) == 0.5


def test_stable_and_fitted_counts_unchanged_predictions_that_match_the_label():
    t = _trial([None, 0.5, 0.5, 0.5], [1.0] * 4, [0.5] * 4)
    t["pass_preds"] = [[9, 9, 9, 9], [0, 1, 0, 3], [0, 1, 2, 3], [0, 2, 2, 3]]
    # span 3 ending at epoch 4: sample 0 (stable, label 0), sample 3 (stable, label 3); 1 and 2 changed
    assert ms.stable_fitted(t) == 0.5


def test_noise_estimate_and_the_switch_between_loss_and_consensus():
    labels = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    noisy = [0, 1, 2, 3, 4, 5, 6, 7, 9, 8]  # the trials agree on the true classes; two labels are flipped

    def trial(preds, loss):
        t = _trial([None, 0.5, 0.5, 0.5], [loss] * 4, [0.5] * 4, preds=preds)
        t["labels"] = labels
        return t

    majority = [trial(noisy, 1.0), trial(noisy, 0.9), trial([0, 1, 2, 3, 4, 5, 6, 7, 8, 8], 0.2)]
    assert ms.noise_estimate(majority, "restore+anneal") == pytest.approx(0.2)
    noisy, used, values = ms.switch_values(majority, "restore+anneal", detector="vote")
    # noisy labels: the vote decides; the memoriser (lowest loss, fits label 8) agrees with it on 9 of 10
    # the first two agree equally: the lower mean loss (0.9) ranks first
    assert (noisy, used) == (True, "consensus agreement")
    assert values == [pytest.approx(1.0 - 1e-6), pytest.approx(1.0 - 0.9e-6), pytest.approx(0.9 - 0.2e-6)]
    assert values[1] > values[0] > values[2]
    # the flip detector: every trial's flip count stayed at 0.5 (> 0.1): noisy too
    assert ms.flip_level(majority) == pytest.approx(0.5)
    assert ms.switch_values(majority, "restore+anneal")[:2] == (True, "consensus agreement")
    clean = [trial(labels, 1.0), trial(labels, 0.9), trial(labels, 0.2)]
    assert ms.switch_values(clean, "restore+anneal", detector="vote") == (False, "mean train loss", [-1.0, -0.9, -0.2])
    for row in clean[1]["rows"][1:]:
        row["flips"] = 0.0  # one trial whose training-pass predictions settle: clean labels by the flip level
    assert ms.flip_level(clean) == 0.0
    assert ms.switch_values(clean, "restore+anneal")[:2] == (False, "mean train loss")
    assert ms.noise_estimate(majority, "today", samples=[8, 9]) == 1.0


def test_the_rise_gate_waits_for_the_count_to_climb_above_its_minimum():
    plateau = [None, 0.8, 0.6, 0.4, 0.2, 0.2, 0.2, 0.21, 0.2, 0.2, 0.21, 0.2, 0.2]  # flat after its minimum
    t = _trial(plateau, [1.0] * 13, [0.5] * 13)
    assert ms.labelwave(plateau)[1] is not None  # plain LabelWave stops on the plateau
    assert ms.guarded(t, 0.2) == (7, None)  # the gate does not (the minimum, 0.2, came at epoch 7)
    v = _trial(V_CURVE, [1.0] * 12, [0.5] * 12)
    assert ms.guarded(v, 0.0) == ms.labelwave(V_CURVE) == (7, 12)
    assert ms.guarded(v, 2.0) == (7, 12)  # 0.867 >= 3 x 0.2 at epoch 12
    assert ms.guarded(v, 4.0) == (7, None)
