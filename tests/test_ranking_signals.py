"""studies/ranking_signals.py: its statistics and its trial loop are the studies' own (issue 14)."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from pathlib import Path

import pytest
from scipy.stats import spearmanr

from neve_tune.studies import get_study
from neve_tune.studies._trial import training_speed

_PATH = Path(__file__).resolve().parents[1] / "studies" / "ranking_signals.py"
_spec = importlib.util.spec_from_file_location("ranking_signals", _PATH)
assert _spec is not None and _spec.loader is not None
rs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rs)


def test_spearman_matches_scipy_with_ties_and_skips_nan():
    xs = [0.3, 0.1, 0.1, 0.7, 0.5, math.nan]
    ys = [1.0, 3.0, 2.0, 0.5, 0.5, 9.0]
    assert rs.spearman(xs, ys) == pytest.approx(spearmanr(xs[:5], ys[:5]).statistic)


def test_tse_ema_is_the_study_trials_signal():
    rows = [{"loss": x} for x in (2.0, 1.0, 0.5, 0.4)]
    speed = (0.0, 0.0)
    for row in rows:
        speed = training_speed(speed, row["loss"])
    assert (rs.tse(rows), rs.tse_ema(rows)) == pytest.approx(speed)
    assert rs.tse_ema(rows) == pytest.approx(0.9**3 * 2 + 0.9**2 * 1 + 0.9 * 0.5 + 0.4)


def test_score_orients_signals_and_the_pick_skips_stalled_runs():
    def run(loss, test, reason="converged"):
        return {"reason": reason, "rows": [{"loss": loss, "acc": 1 - loss, "V": 1e-4, "test": test}]}

    runs = [run(0.1, 0.9), run(0.2, 0.8), run(0.3, 0.7), run(0.01, 0.1, "stalled")]
    rho_own, rho_fifo, regret_own, regret_fifo = rs.score(runs[:3], runs[:3], "final train loss", None)
    assert (rho_own, rho_fifo, regret_own, regret_fifo) == pytest.approx((1.0, 1.0, 0.0, 0.0))
    # the stalled run has the lowest loss but is never picked: the pick is 0.9, the best 0.9
    assert rs.score(runs, runs, "final train loss", None)[2] == pytest.approx(0.0)


def test_run_one_trains_like_the_study_and_records_every_epoch():
    study = get_study("digits")
    short = dataclasses.replace(study, budget=dataclasses.replace(study.budget, max_epochs=2))
    config = short.configs(seed=0)[3]
    out = rs.run_one(short, config, "anneal-linear-0.25")
    assert out["reason"] in ("max_t", "stalled", "diverged") and 1 <= len(out["rows"]) <= 2
    assert {"epoch", "loss", "acc", "V", "D", "lr", "test"} <= set(out["rows"][0])
    fifo = rs.run_one(short, config, "fifo")
    assert fifo["rows"][0]["loss"] == pytest.approx(out["rows"][0]["loss"])  # same init, data order, first LR
