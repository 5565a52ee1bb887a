"""The memorisation watch (neve_tune._memorize): flips counted by dataset index, LabelWave's rule, the kept weights."""

from __future__ import annotations

import copy
import pickle
import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn

from neve_tune import Memorization
from neve_tune._memorize import FlipCounter, MemorizationWatch, WaveTracker, class_predictions
from neve_tune._memorize.predictions import NoClassOutput, as_indices


def logits_for(classes: list[int], num_classes: int = 4) -> torch.Tensor:
    """Logits whose argmax is ``classes``."""
    out = torch.zeros(len(classes), num_classes)
    out[torch.arange(len(classes)), torch.tensor(classes)] = 1.0
    return out


def test_flips_count_changed_predictions_among_samples_seen_in_both_epochs():
    c = FlipCounter()
    c.add(class_predictions(logits_for([0, 1, 2, 3])), torch.tensor([0, 1, 2, 3]))
    assert c.end_epoch() is None  # nothing to compare at the first epoch
    c.add(class_predictions(logits_for([0, 2])), torch.tensor([1, 0]))  # sample 1: 1 -> 0, sample 0: 0 -> 2
    c.add(class_predictions(logits_for([2, 1])), torch.tensor([2, 7]))  # sample 2 same; 7 is new (not counted)
    e = c.end_epoch()
    assert e is not None and (e.flips, e.observed) == (2.0, 3) and e.fraction == pytest.approx(2 / 3)
    assert c.size == 8  # grows to the largest index seen
    c.add(class_predictions(logits_for([1])), torch.tensor([7]))  # only 7 again: compared with epoch 2
    e = c.end_epoch()
    assert (e.flips, e.observed) == (0.0, 1)
    assert c.end_epoch() is None  # an epoch with nothing observed: nothing in both


def test_token_flips_are_the_share_of_changed_tokens_per_sample():
    c = FlipCounter()
    first = torch.tensor([[0, 1, 2, 3], [1, 1, 1, 1]])
    c.add(first, torch.tensor([0, 1]))
    c.end_epoch()
    # sample 0: 1 of 4 tokens changed; sample 1 comes in a shorter (padded to 2) batch: 1 of its 2 compared tokens
    c.add(torch.tensor([[0, 1, 2, 0]]), torch.tensor([0]))
    c.add(torch.tensor([[1, 0]]), torch.tensor([1]))
    e = c.end_epoch()
    assert e.observed == 2 and e.flips == pytest.approx(0.25 + 0.5)
    with pytest.raises(ValueError, match="one layout"):
        c.add(torch.tensor([1, 2]), torch.tensor([0, 1]))


@pytest.mark.parametrize(
    "wrap",
    [lambda t: t, lambda t: {"logits": t, "loss": t.sum()}, lambda t: OrderedDict(logits=t), lambda t: _Output(t)],
    ids=["tensor", "dict", "mapping", "attribute"],
)
def test_predictions_read_logits_from_tensors_dicts_and_model_outputs(wrap):
    logits = logits_for([3, 0, 2])
    assert class_predictions(wrap(logits)).tolist() == [3, 0, 2]
    tokens = torch.randn(2, 5, 7)
    assert torch.equal(class_predictions(wrap(tokens)), tokens.argmax(-1))
    seg = torch.randn(2, 3, 4, 4)  # (N, C, H, W): one prediction per pixel, over dim 1
    assert torch.equal(class_predictions(wrap(seg)), seg.argmax(1).flatten(1))


def test_hugging_face_model_output():
    transformers = pytest.importorskip("transformers")
    out = transformers.modeling_outputs.SequenceClassifierOutput(loss=torch.tensor(1.0), logits=logits_for([1, 2]))
    assert class_predictions(out).tolist() == [1, 2]


class _Output:
    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits


@pytest.mark.parametrize(
    "outputs",
    [torch.randn(8, 1), torch.randn(8), torch.randint(0, 3, (8, 4)), torch.tensor(1.0)],
    ids=["regression", "flat", "integers", "scalar"],
)
def test_no_class_output_is_refused_by_the_reader(outputs):
    with pytest.raises(NoClassOutput):
        class_predictions(outputs)


def test_outputs_without_logits_say_what_was_there():
    with pytest.raises(TypeError, match=r"no 'logits' tensor \(keys: \['loss', 'scores'\]\)"):
        class_predictions({"loss": torch.tensor(0.0), "scores": torch.randn(2, 3)})
    with pytest.raises(TypeError, match="got tuple"):
        class_predictions((torch.randn(2, 3),))


def test_indices_are_checked():
    assert as_indices([3, 1], 2).tolist() == [3, 1]
    with pytest.raises(ValueError, match="got 3 indices for a batch of 2"):
        as_indices(torch.arange(3), 2)
    with pytest.raises(ValueError, match=r"negative dataset index \(-1\)"):
        as_indices(torch.tensor([0, -1]), 2)
    with pytest.raises(TypeError, match="integer dataset indices"):
        as_indices(torch.tensor([0.0, 1.0]), 2)


def test_tracker_smooths_keeps_the_minimum_and_waits_patience_epochs_after_it():
    t = WaveTracker(Memorization(window=3, patience=2, significance=0))
    flips = [None, 900, 600, 300, 300, 400, 500, 600]  # epochs 1..8, of 1000 samples
    new_min = [t.step(e, 0 if f is None else f, 0 if f is None else 1000) for e, f in enumerate(flips, start=1)]
    # smoothed from epoch 4 (3 fractions): 0.6, 0.4, 0.3333, 0.4, 0.4667
    assert new_min == [False, False, False, True, True, True, False, False]
    assert t.best_epoch == 6 and t.best == pytest.approx(1 / 3)
    assert t.memorizing  # epoch 8 is 2 epochs after the minimum and above it
    t2 = WaveTracker(Memorization(window=3, patience=2))
    t2.load_state_dict(t.state_dict())
    assert t2.state_dict() == t.state_dict()


def test_a_rise_within_the_counting_noise_is_not_memorisation():
    # 5 of 1,000 samples flip at the minimum, 8 later: sqrt(5 + 8) / 1000 = 0.0036 > the 0.003 rise
    t = WaveTracker(Memorization(window=1, patience=1, significance=1.0))
    t.step(1, 5, 1000)
    t.step(2, 8, 1000)
    assert not t.memorizing
    t.step(3, 12, 1000)  # sqrt(17) / 1000 = 0.0041 < 0.007: a rise
    assert t.memorizing
    strict = WaveTracker(Memorization(window=1, patience=1, significance=2.0))
    strict.load_state_dict({**t.state_dict(), "settings": {**t.state_dict()["settings"], "significance": 2.0}})
    assert not strict.memorizing  # 2 * 0.0041 > 0.007


def test_flips_rising_with_the_training_loss_are_an_unstable_phase_not_memorisation():
    t = WaveTracker(Memorization(window=1, patience=1, significance=0))
    t.step(1, 10, 1000, train_loss=0.02)
    t.step(2, 30, 1000, train_loss=0.04)  # the loss rose with the flips
    assert not t.memorizing
    t.step(3, 30, 1000, train_loss=0.01)  # the loss fell since the minimum: memorising
    assert t.memorizing
    t.step(4, 30, 1000, train_loss=None)  # a loss unknown: the flip test alone
    assert t.memorizing


def test_a_flat_curve_is_not_memorisation():
    t = WaveTracker(Memorization(window=1, patience=2, significance=0))
    for e in range(1, 10):
        t.step(e, 0.0, 100)  # a clean network that predicts the same every epoch
    assert t.best_epoch == 9 and not t.memorizing
    t.step(10, 0.0, 0)  # nothing compared: missing, nothing changes
    assert t.best_epoch == 9 and t.epoch == 10 and not t.memorizing


def test_settings_are_validated():
    with pytest.raises(ValueError, match="window must be an integer >= 1, but got window=0"):
        Memorization(window=0)
    with pytest.raises(ValueError, match="patience"):
        Memorization(patience=True)
    with pytest.raises(TypeError, match="restore_best_weights"):
        Memorization(restore_best_weights=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="significance must be a number >= 0, but got -1"):
        Memorization(significance=-1)


def test_watch_keeps_the_weights_of_the_minimum_and_restores_them():
    torch.manual_seed(0)
    model = nn.Linear(3, 4)
    watch = MemorizationWatch(model, Memorization(window=1, patience=1, significance=0))
    kept = None
    for epoch, classes in enumerate([[0] * 6, [1] * 6, [1] * 6, [2] * 6], start=1):  # flips 6, 0, 6
        with torch.no_grad():
            model.weight.add_(0.1)
        watch.observe(logits_for(classes), torch.arange(6))
        seen = watch.end_epoch(epoch)
        if epoch == 3:
            kept = copy.deepcopy(model.state_dict())
    assert (seen.fraction, seen.best_epoch, seen.memorizing) == (1.0, 3, True)
    assert watch.restore()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in kept.items())
    clone = pickle.loads(pickle.dumps(watch))
    assert torch.equal(clone.best_state["weight"], kept["weight"])
    other = MemorizationWatch(nn.Linear(3, 4), Memorization())
    other.load_state_dict(watch.state_dict())
    assert other.settings == Memorization(window=1, patience=1, significance=0) and other.tracker.best_epoch == 3


def test_watch_without_restore_keeps_no_copy():
    watch = MemorizationWatch(nn.Linear(3, 4), Memorization(window=1, restore_best_weights=False))
    for epoch in (1, 2):
        watch.observe(logits_for([0, 1]), [0, 1])
        watch.end_epoch(epoch)
    assert watch.tracker.best_epoch == 2 and watch.best_state is None and not watch.restore()


def test_no_class_output_warns_once_and_never_decides():
    watch = MemorizationWatch(nn.Linear(3, 1), Memorization(window=1, patience=1))
    with pytest.warns(UserWarning, match=r"no memorisation signal for this model") as record:
        for epoch in range(1, 6):
            watch.observe(torch.randn(4, 1), torch.arange(4))
            seen = watch.end_epoch(epoch)
    assert len(record) == 1 and not watch.active and seen.fraction is None and not seen.memorizing
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        watch.observe(torch.randn(4, 1), torch.arange(4))  # silent from now on


def test_observe_moves_only_the_argmax_to_the_host():
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    c = FlipCounter()
    logits = torch.randn(5, 3, device="cuda")
    c.add(class_predictions(logits), as_indices(torch.arange(5, device="cuda"), 5))
    assert c.state_dict()["current"].device.type == "cpu"
