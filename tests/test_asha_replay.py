"""studies/sequence/asha_replay.py follows Ray's ASHAScheduler rung by rung (the evidence behind the listops
study's note on trial-epochs)."""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

PATH = Path(__file__).resolve().parents[1] / "studies" / "sequence" / "asha_replay.py"


def _replay():
    spec = importlib.util.spec_from_file_location("asha_replay", PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["asha_replay"] = module
    spec.loader.exec_module(module)
    return module


def test_rungs_and_a_cap_that_ends_every_trial_at_the_first_rung():
    replay = _replay()
    assert (
        replay.rungs(3, 3, 16) == [3, 9]
        and replay.rungs(3, 3, 32) == [3, 9, 27]
        and replay.rungs(1, 2, 8) == [1, 2, 4, 8]
    )
    curves = replay.random_curves(10, 16, random.Random(1))
    assert replay.trial_epochs(curves, end=3) == 30  # every trial's own rule ends it at 3: nothing to promote
    assert replay.trial_epochs(curves, cap=16, grace=16) == 160  # no rung below the cap: FIFO


@pytest.mark.slow
def test_one_worker_stops_the_trials_ray_stops():
    from ray.tune.schedulers import TrialScheduler
    from ray.tune.schedulers.async_hyperband import _Bracket

    replay = _replay()
    rng = random.Random(3)
    for _ in range(20):
        curves = replay.random_curves(10, 16, rng)
        bracket = _Bracket(min_t=3, max_t=16, reduction_factor=3, s=0)
        ray_total = 0
        for config in sorted(curves):  # one worker: each trial runs until Ray stops it or the cap
            for epoch in range(1, 17):
                ray_total += 1
                trial = SimpleNamespace(trial_id=str(config))
                if bracket.on_result(trial, epoch, curves[config][epoch]) == TrialScheduler.STOP:
                    break
        assert replay.trial_epochs(curves, workers=1) == ray_total
