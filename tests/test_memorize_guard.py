"""The memorisation watch's warm-up guard (``Memorization.learned``): no minimum from a slow start's first phase."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from neve_tune import Memorization
from neve_tune._memorize import MemorizationWatch, WaveTracker
from neve_tune._memorize.predictions import num_classes

CHANCE = math.log(10)

# A slow start, shaped as MNIST-1D at lr 0.005 (studies/overfitting/results.md): epochs 1-4 predict one or a
# few classes for everything, so few predictions flip and the loss stays at chance; the network then leaves
# that phase (the flips jump, the loss falls) and learns, the flips falling again slowly. Per 1,000 of 4,000 samples.
SLOW_FLIPS = [None, 420, 440, 380, 490, 480, 460, 440, 430, 420, 410, 400, 390]
SLOW_LOSS = [2.30, 2.29, 2.25, 2.10, 1.83, 1.68, 1.58, 1.51, 1.46, 1.42, 1.39, 1.37, 1.35]


def run(tracker: WaveTracker, flips: list[int | None], losses: list[float], start: int = 1) -> list[bool]:
    seen = []
    for epoch, (f, loss) in enumerate(zip(flips, losses, strict=True), start=start):
        tracker.step(epoch, 0 if f is None else 4 * f, 0 if f is None else 4000, loss, CHANCE)
        seen.append(tracker.memorizing)
    return seen


def test_a_slow_start_is_not_memorisation():
    unguarded = WaveTracker(Memorization(learned=0.0))
    fired = run(unguarded, SLOW_FLIPS[:9], SLOW_LOSS[:9])
    assert fired[-1] and not any(fired[:-1]) and unguarded.best_epoch == 4  # LabelWave fires at 9, minimum at 4
    guarded = WaveTracker(Memorization())
    assert not any(run(guarded, SLOW_FLIPS, SLOW_LOSS))
    # the guard opened at epoch 5 (1 - 1.83 / log 10 = 0.205 >= 0.1 at the first time); its first minimum is
    # the first window made of epochs 5.. only (epoch 7), and the curve falls from there
    assert guarded.learned_epoch == 5 and guarded.best_epoch == 13


def test_memorisation_after_the_warm_up_is_still_seen():
    t = WaveTracker(Memorization())
    run(t, SLOW_FLIPS, SLOW_LOSS)
    seen = run(t, [380, 370, 400, 440, 470, 490, 500, 510], [1.33, 1.30, 1.28, 1.25, 1.22, 1.2, 1.18, 1.15], 14)
    assert t.best_epoch == 15 and seen[-1]  # the minimum of epochs 13-15, then a rise with a falling loss


def test_the_first_minimum_needs_a_whole_window_after_the_guard_opened():
    t = WaveTracker(Memorization(window=3, patience=1, significance=0))
    losses = [2.3, 2.3, 1.5, 1.4, 1.3, 1.2]  # the guard opens at epoch 3
    for epoch, (f, loss) in enumerate(zip([None, 100, 100, 300, 300, 300], losses, strict=True), start=1):
        t.step(epoch, 0 if f is None else f, 0 if f is None else 1000, loss, CHANCE)
        if epoch < 5:
            assert t.best_epoch is None  # windows holding epoch 2 (before the guard) never count
    assert t.learned_epoch == 3 and t.best_epoch == 5  # epochs 3-5, although epoch 4's window was lower


def test_without_a_loss_or_a_chance_level_the_guard_is_open():
    for loss, chance in ((None, CHANCE), (math.nan, CHANCE), (2.3, None)):
        t = WaveTracker(Memorization(window=1))
        t.step(1, 100, 1000, loss, chance)
        assert t.learned_epoch == 1 and t.best_epoch == 1


def test_the_guard_survives_a_state_round_trip():
    t = WaveTracker(Memorization())
    run(t, SLOW_FLIPS[:6], SLOW_LOSS[:6])
    t2 = WaveTracker(Memorization(learned=0.0))
    t2.load_state_dict(t.state_dict())
    assert t2.state_dict() == t.state_dict() and t2.settings.learned == 0.1
    assert (t2.learned_epoch, t2.since_learned, t2.best_epoch) == (5, 2, None)


@pytest.mark.parametrize("learned", [1.0, -0.1, math.nan, True, "0.1"])
def test_learned_is_validated(learned):
    with pytest.raises(ValueError, match=r"learned must be a number in \[0, 1\)"):
        Memorization(learned=learned)


def test_the_watch_measures_against_the_chance_level_of_its_outputs():
    watch = MemorizationWatch(nn.Linear(3, 4), Memorization(window=1))
    for epoch in (1, 2, 3):
        watch.observe(torch.eye(4)[[0, 1, 2, 3, epoch % 4]], torch.arange(5))
        seen = watch.end_epoch(epoch, train_loss=0.95 * math.log(4))  # 5% of log 4 removed: still at chance
    assert watch.classes == 4 and watch.tracker.learned_epoch is None and seen.best_epoch is None
    watch.observe(torch.eye(4)[[0, 1, 2, 3, 0]], torch.arange(5))
    seen = watch.end_epoch(4, train_loss=0.8 * math.log(4))
    assert watch.tracker.learned_epoch == 4 and seen.best_epoch == 4
    other = MemorizationWatch(nn.Linear(3, 4), Memorization())
    other.load_state_dict(watch.state_dict())
    assert other.classes == 4


def test_num_classes_reads_the_argmax_axis():
    assert num_classes(torch.zeros(2, 7)) == 7
    assert num_classes({"logits": torch.zeros(2, 5, 11)}) == 11  # token logits (N, T, C)
    assert num_classes(torch.zeros(2, 3, 4, 4)) == 3  # a segmentation map (N, C, H, W)
