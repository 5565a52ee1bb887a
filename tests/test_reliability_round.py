"""Issue 23, last item: a new user's pass over what this round added, the memorisation probe
(``NeVe.observe``), the restored weights of the memorizing stop, and ``StudyDefinition(make_aux=...,
build_optimizer=...)``. One test per case, R1..R44; each docstring says what the user does and what happens now
(``CASES.md`` at the worktree root lists what main did).

The memorisation cases drive the watch with synthetic logits of known flips (``FLIPS``) while a tiny model
trains on random batches (so the velocity rule keeps going): the flip minimum is at epoch 4 and the watch
(``window=1, patience=2, significance=0``) fires at epoch 6.
"""

from __future__ import annotations

import dataclasses
import io
import math
import warnings
from typing import Any

import pytest
import torch
from torch import nn

import neve_tune as nt
from neve_tune import Anneal, Memorization, NeVe, StopReason, keys

N, C = 100, 4
#: Samples whose prediction changes at each epoch (epoch 1 has nothing to compare with).
FLIPS = [0, 40, 20, 5, 10, 20, 30, 40, 40, 40, 40, 40, 40, 40]
FAST = Memorization(window=1, patience=2, significance=0.0, anneal=False)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, C))


def _setup(
    memorization: Any = FAST, model: nn.Module | None = None, **options: Any
) -> tuple[nn.Module, torch.optim.Optimizer, NeVe]:
    model = _model() if model is None else model
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    aux = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    return model, opt, NeVe(model, opt, aux, min_epochs=3, memorization=memorization, **options)


def _predictions(epoch: int) -> torch.Tensor:
    """Each sample's predicted class at ``epoch``: the first ``FLIPS[e]`` samples move on at every epoch e."""
    current = torch.zeros(N, dtype=torch.long)
    for e in range(1, epoch + 1):
        current[: FLIPS[e - 1]] = (current[: FLIPS[e - 1]] + 1) % C
    return current


def _logits(epoch: int) -> torch.Tensor:
    return nn.functional.one_hot(_predictions(epoch), C).float() * 5


def _train(model: nn.Module, opt: torch.optim.Optimizer, epoch: int) -> float:
    """One SGD step on a random batch; the loss NeVe is given falls by 0.05 per epoch."""
    g = torch.Generator().manual_seed(100 + epoch)
    x, y = torch.randn(64, 8, generator=g), torch.randint(0, C, (64,), generator=g)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x.to(next(model.parameters()).dtype)), y).backward()
    opt.step()
    return 1.2 - 0.05 * epoch


def _epoch(model: nn.Module, opt: torch.optim.Optimizer, neve: NeVe, epoch: int, observe: bool = True) -> nt.StepResult:
    loss = _train(model, opt, epoch)
    if observe:
        neve.observe(_logits(epoch), torch.arange(N))
    return neve.step(loss)


def _run(model: nn.Module, opt: torch.optim.Optimizer, neve: NeVe, first: int = 1, last: int = 14) -> list[Any]:
    results = []
    for epoch in range(first, last + 1):
        results.append(_epoch(model, opt, neve, epoch))
        if neve.should_stop:
            break
    return results


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k].to(a[k].dtype)) for k in a)


def test_the_synthetic_flips_fire_at_epoch_6_with_the_weights_of_epoch_4() -> None:
    """The driver every memorisation case uses: the minimum at epoch 4, the stop at epoch 6, weights back."""
    model, opt, neve = _setup()
    kept: dict[int, dict[str, torch.Tensor]] = {}
    for epoch in range(1, 15):
        result = _epoch(model, opt, neve, epoch)
        kept[epoch] = _weights(model)
        if neve.should_stop:
            break
    assert result.epoch == 6 and result.stop_reason is StopReason.MEMORIZING
    assert result.flip_fraction == pytest.approx(0.2) and result.restored_epoch == result.flip_min_epoch == 4
    assert _same(_weights(model), kept[4]) and not _same(kept[5], kept[4])


# ---------------------------------------------------------------------------- the probe: observe()


def test_r01_indices_of_the_wrong_length_are_refused() -> None:
    """R1: 3 indices for 4 outputs. ValueError naming both counts and what to pass."""
    _, _, neve = _setup()
    with pytest.raises(ValueError, match=r"got 3 indices for a batch of 4 outputs.*one dataset index per sample"):
        neve.observe(torch.randn(4, C), [0, 1, 2])


def test_r02_negative_indices_are_refused() -> None:
    """R2: a -1 among the indices (a padded sampler). ValueError showing it."""
    _, _, neve = _setup()
    with pytest.raises(ValueError, match=r"negative dataset index \(-1\)"):
        neve.observe(torch.randn(3, C), [0, -1, 2])


def test_r03_float_indices_name_the_fix() -> None:
    """R3: indices as a float tensor (collated from a float column). Main: a TypeError naming the dtype only;
    now it shows the values and names ``indices.long()``; integer indices from NumPy still work."""
    _, _, neve = _setup()
    with pytest.raises(TypeError, match=r"torch\.float32 tensor \[0\.0, 1\.0, 2\.0\].*indices\.long\(\)"):
        neve.observe(torch.randn(3, C), torch.tensor([0.0, 1.0, 2.0]))
    import numpy as np

    neve.observe(torch.randn(3, C), np.array([0, 1, 2]))
    assert neve.watch is not None and neve.watch.counter.size == 3


def test_r04_string_ids_as_indices_say_positions_are_needed() -> None:
    """R4: a Hugging Face ``id`` column (strings) passed as indices. Main: ``ValueError: too many dimensions
    'str'`` from torch; now a TypeError that shows them and says positions, with the ``with_indices`` map."""
    _, _, neve = _setup()
    with pytest.raises(TypeError, match=r"got list \['a', 'b', 'c'\].*not ids or names.*with_indices=True"):
        neve.observe(torch.randn(3, C), ["a", "b", "c"])


def test_r05_none_indices_say_what_to_pass() -> None:
    """R5: ``observe(logits, batch.get("index"))`` on a batch without the column. Main: ``RuntimeError: Could
    not infer dtype of NoneType``; now a TypeError naming ``indices=None`` and the fix."""
    _, _, neve = _setup()
    with pytest.raises(TypeError, match=r"indices=None.*Dataset that returns \(x, y, index\)"):
        neve.observe(torch.randn(3, C), None)


def test_r06_batch_positions_instead_of_dataset_indices_warn() -> None:
    """R6: ``observe(out, torch.arange(len(x)))``, the positions in each batch of 10. Main: silently a flip
    fraction of 0.0 at every epoch (the last batch of each epoch compared with the last batch of the previous),
    so it never stopped; now it warns once, at the first epoch's step, with the counts."""
    model, opt, neve = _setup()
    with pytest.warns(UserWarning, match=r"given 100 samples in epoch 1 but only 10 distinct.*about 10 times"):
        for epoch in range(1, 4):
            loss = _train(model, opt, epoch)
            for start in range(0, N, 10):
                neve.observe(_logits(epoch)[start : start + 10], torch.arange(10))
            result = neve.step(loss)
    assert result.flip_fraction == 0.0  # still counted (a sampler with replacement repeats indices legitimately)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _setup()[2].observe(torch.randn(N, C), torch.randint(0, N, (N,)))  # sampling with replacement: no warning


def test_r07_a_sample_id_as_index_is_refused_before_allocating() -> None:
    """R7: sample ids (``10**9``) passed as indices. Main: two int32 tables of 10**9 rows (8 GB) allocated;
    now a ValueError before any allocation, naming positions; indices up to 10**8 - 1 still work."""
    _, _, neve = _setup()
    with pytest.raises(ValueError, match=r"dataset index 1000000000.*1,000,000,001 rows.*not sample ids"):
        neve.observe(torch.randn(2, C), [3, 10**9])
    assert neve.watch is not None and neve.watch.counter.size == 0  # nothing stored


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_r08_half_precision_logits_are_observed(dtype: torch.dtype) -> None:
    """R8: ``observe`` on autocast logits (float16 / bfloat16). Counted as float32 logits are: the same flips."""
    model, opt, neve = _setup()
    fractions = []
    for epoch in range(1, 4):
        loss = _train(model, opt, epoch)
        neve.observe(_logits(epoch).to(dtype), torch.arange(N))
        fractions.append(neve.step(loss).flip_fraction)
    assert fractions == [None, 0.4, 0.2]


def test_r09_regression_outputs_warn_once_and_change_nothing() -> None:
    """R9: ``(N,)`` outputs of a regression head. One warning, no flip metrics, the same decisions as without."""
    model, opt, neve = _setup()
    plain_model, plain_opt, plain = _setup()
    with pytest.warns(UserWarning, match=r"shape \(100,\) hold one value per sample.*will not stop for memorization"):
        for epoch in range(1, 5):
            loss = _train(model, opt, epoch)
            neve.observe(torch.randn(N), torch.arange(N))
            a = neve.step(loss)
            b = plain.step(_train(plain_model, plain_opt, epoch))
            assert a == b and a.flip_fraction is None
    assert keys.FLIP_FRACTION not in neve.metrics()


def test_r10_a_diverged_model_stops_as_diverged_not_memorizing() -> None:
    """R10: the weights go NaN, so do the logits observed (argmax of NaN). NeVe stops as diverged; the watch's
    counting of NaN predictions decides nothing."""
    model, opt, neve = _setup()
    _run(model, opt, neve, last=3)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    logits = model(torch.randn(N, 8))
    assert bool(logits.isnan().all())
    neve.observe(logits, torch.arange(N))
    result = neve.step(float("nan"))
    assert result.stop_reason is StopReason.DIVERGED and result.restored_epoch is None


def test_r11_model_output_without_logits_names_its_keys() -> None:
    """R11: a Hugging Face ``ModelOutput`` without logits (a base model's ``last_hidden_state``). TypeError
    listing its keys; one with ``logits`` is observed."""
    from transformers.modeling_outputs import BaseModelOutput, SequenceClassifierOutput

    _, _, neve = _setup()
    with pytest.raises(TypeError, match=r"no 'logits' tensor \(keys: \['last_hidden_state'\]\)"):
        neve.observe(BaseModelOutput(last_hidden_state=torch.randn(3, 5, 8)), [0, 1, 2])
    neve.observe(SequenceClassifierOutput(logits=torch.randn(3, C)), [0, 1, 2])
    assert neve.watch is not None and neve.watch.active


def test_r12_padded_token_logits_compare_only_the_tokens_both_epochs_have() -> None:
    """R12: token logits ``(N, T, C)`` padded to each batch's longest sequence (T = 6, then 4). A sample counts
    the share of its compared tokens that changed; tokens beyond the shorter padding are not compared."""
    _, _, neve = _setup(memorization=Memorization())
    watch = neve.watch
    assert watch is not None
    first = torch.zeros(2, 6, dtype=torch.long)
    second = first[:, :4].clone()
    second[0, 0] = 1  # sample 0: 1 of its 4 compared tokens changed; sample 1: none
    watch.observe(nn.functional.one_hot(first, C).float(), [0, 1])
    watch.end_epoch(1)
    watch.observe(nn.functional.one_hot(second, C).float(), [0, 1])
    step = watch.end_epoch(2)
    assert step.flips == pytest.approx(0.25) and step.fraction == pytest.approx(0.125)


def test_r13_a_layout_change_mid_run_is_refused() -> None:
    """R13: class logits ``(N, C)``, then token logits ``(N, T, C)`` (a model swapped mid-run). ValueError."""
    _, _, neve = _setup()
    neve.observe(torch.randn(3, C), [0, 1, 2])
    with pytest.raises(ValueError, match=r"after one class per sample \(N,\).*one layout for the whole run"):
        neve.observe(torch.randn(3, 5, C), [0, 1, 2])


def test_r14_observe_in_eval_mode_warns() -> None:
    """R14: ``observe`` fed from a pass over the training set in eval mode after each epoch (where the flips
    only fall). Main: silent, and the watch never fires; now one warning naming the training forward."""
    model, opt, neve = _setup()
    loss = _train(model, opt, 1)
    model.eval()
    with pytest.warns(UserWarning, match=r"model is in eval mode.*only fall.*right after the training forward"):
        neve.observe(_logits(1), torch.arange(N))
        neve.observe(_logits(1), torch.arange(N))  # once
    model.train()
    assert neve.step(loss).epoch == 1


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"window": 0}, ValueError, r"window must be an integer >= 1, but got window=0"),
        ({"patience": -1}, ValueError, r"patience must be an integer >= 1, but got patience=-1"),
        ({"window": 2.0}, ValueError, r"window=2\.0"),
        ({"significance": float("nan")}, ValueError, r"significance must be a number >= 0, but got nan"),
        ({"significance": -1}, ValueError, r"significance must be a number >= 0, but got -1"),
        ({"restore_best_weights": "yes"}, TypeError, r"restore_best_weights must be True or False, but got 'yes'"),
        ({"anneal": None}, TypeError, r"anneal must be True or False, but got None"),
    ],
)
def test_r15_memorization_options_out_of_range_are_refused(options: dict, error: type, match: str) -> None:
    """R15: ``Memorization(window=0)``, a negative patience, a NaN significance, ... Each refused, with the value."""
    with pytest.raises(error, match=match):
        Memorization(**options)


@pytest.mark.parametrize("value", [False, True, Memorization])
def test_r16_memorization_false_says_none_turns_it_off(value: Any) -> None:
    """R16: ``NeVe(memorization=False)`` to turn the watch off. Main: "must be a neve_tune.Memorization or None,
    but got bool"; now it shows the value and says ``memorization=None`` turns it off."""
    with pytest.raises(TypeError, match=r"but got .*: pass memorization=None to turn the memorisation watch off"):
        _setup(memorization=value)
    assert _setup(memorization=None)[2].watch is None


def test_r17_observing_only_the_first_epochs_decides_nothing_on_stale_flips() -> None:
    """R17: ``observe`` called in epochs 1-3 only (a flag turned off). The epochs without it have no flip
    fraction, the minimum stays that of epoch 3, and the watch never fires on the old numbers."""
    model, opt, neve = _setup()
    results = [_epoch(model, opt, neve, epoch, observe=epoch <= 3) for epoch in range(1, 10)]
    assert [r.flip_fraction for r in results[:3]] == [None, 0.4, 0.2]
    assert all(r.flip_fraction is None and r.flip_min_epoch == 3 for r in results[3:])
    assert all(r.stop_reason is not StopReason.MEMORIZING for r in results)


def test_r18_step_without_observe_decides_as_memorization_none() -> None:
    """R18: the default ``NeVe`` (memorisation on) but ``observe`` never called. The same results as
    ``memorization=None``, and no flip metric."""
    model, opt, neve = _setup(memorization=Memorization())
    off_model, off_opt, off = _setup(memorization=None)
    for epoch in range(1, 8):
        a = _epoch(model, opt, neve, epoch, observe=False)
        assert a == _epoch(off_model, off_opt, off, epoch, observe=False)
    assert not any(k.startswith("neve/flip") for k in neve.metrics())


def test_r19_restore_off_keeps_the_latest_weights() -> None:
    """R19: ``Memorization(restore_best_weights=False)``. Stops as memorizing at the same epoch, keeps no copy,
    and the model keeps its latest weights."""
    model, opt, neve = _setup(
        memorization=Memorization(window=1, patience=2, significance=0.0, restore_best_weights=False, anneal=False)
    )
    results = _run(model, opt, neve)
    latest = _weights(model)
    assert results[-1].epoch == 6 and results[-1].stop_reason is StopReason.MEMORIZING
    assert results[-1].restored_epoch is None and neve.watch is not None and neve.watch.best_state is None
    assert _same(_weights(model), latest)


def test_r20_stepping_on_after_the_memorizing_stop_keeps_saying_memorizing() -> None:
    """R20: the loop steps NeVe again after the memorizing stop (``Trainer(min_epochs=...)``, a loop that checks
    ``should_stop`` later). Main: ``should_stop`` turned back to False at the next step (the rule's own stops
    repeat); now every later step says memorizing, and the weights are not restored again."""
    model, opt, neve = _setup()
    assert _run(model, opt, neve)[-1].stop_reason is StopReason.MEMORIZING
    later = [_epoch(model, opt, neve, epoch) for epoch in range(7, 10)]
    assert all(r.stop_reason is StopReason.MEMORIZING and r.restored_epoch is None for r in later)
    assert neve.should_stop and neve.metrics()[keys.MEMORIZING] == 1.0
    twin = _setup()[2]
    twin.load_state_dict(neve.state_dict())  # the stop survives a checkpoint
    assert twin.should_stop and twin.stop_reason is StopReason.MEMORIZING


# ---------------------------------------------------------------------------- state and the restored weights

COOL = Memorization(window=1, patience=2, significance=0.0, anneal=True)


def _checkpoint(model: nn.Module, opt: torch.optim.Optimizer, neve: NeVe, weights_only: bool = False) -> dict:
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "neve": neve.state_dict()}, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=weights_only)


def test_r21_a_checkpoint_in_the_middle_of_the_cooldown_resumes_identically() -> None:
    """R21: save model, optimizer and NeVe one epoch into the cooldown after the restore, load them into fresh
    objects. The resumed run takes the same LRs and stops at the same epoch as the uninterrupted one."""
    model, opt, neve = _setup(memorization=COOL, anneal=Anneal(min_length=4))
    first = _run(model, opt, neve, last=7)
    assert first[5].restored_epoch == 4 and first[5].annealing and first[6].annealing
    saved = _checkpoint(model, opt, neve)
    expected = _run(model, opt, neve, first=8)
    model2, opt2, neve2 = _setup(memorization=COOL, anneal=Anneal(min_length=4))
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    neve2.load_state_dict(saved["neve"])
    got = _run(model2, opt2, neve2, first=8)
    assert got == expected and got[-1].stop_reason is StopReason.MEMORIZING and got[-1].epoch == 10
    assert _same(_weights(model2), _weights(model))


def test_r22_a_state_with_the_watch_into_memorization_none_is_refused() -> None:
    """R22: a checkpoint written with the watch on, loaded into ``NeVe(memorization=None)`` (and the reverse).
    ValueError naming both settings; nothing is half-loaded (the NeVe keeps its epoch)."""
    model, opt, neve = _setup()
    _run(model, opt, neve, last=4)
    off = _setup(memorization=None)[2]
    off.step(1.0)
    with pytest.raises(
        ValueError, match=r"saved with memorization=Memorization\(\.\.\.\) but this NeVe has memorization=None"
    ):
        off.load_state_dict(neve.state_dict())
    with pytest.raises(ValueError, match=r"saved with memorization=None but this NeVe has memorization=Memorization"):
        _setup()[2].load_state_dict(off.state_dict())
    assert off.last_epoch == 1 and off.rule.num_steps == 1  # the failed load changed nothing


def test_r23_a_state_with_other_memorization_settings_warns_that_it_wins() -> None:
    """R23: a NeVe built with ``Memorization(window=3, patience=9)`` loads a state written with
    ``window=1, patience=2``. Main: the settings were silently replaced; now a warning names both (the state
    wins, as for the rule's settings), and the resumed run decides with the state's."""
    model, opt, neve = _setup()
    _run(model, opt, neve, last=4)
    other = _setup(memorization=Memorization(window=3, patience=9))[2]
    with pytest.warns(
        UserWarning,
        match=r"replaces this NeVe's memorization=Memorization\(window=3, patience=9.*"
        r"Memorization\(window=1, patience=2",
    ):
        other.load_state_dict(neve.state_dict())
    assert other.watch is not None and other.watch.settings == FAST
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _setup()[2].load_state_dict(neve.state_dict())  # the same settings: silent


def test_r24_the_state_with_kept_weights_loads_with_weights_only() -> None:
    """R24: ``torch.load(..., weights_only=True)`` (the Hugging Face callback's load, torch's default) of a
    state holding the kept weights and the prediction tables. Loads, and the resumed run stops identically."""
    model, opt, neve = _setup()
    _run(model, opt, neve, last=4)
    saved = _checkpoint(model, opt, neve, weights_only=True)
    expected = _run(model, opt, neve, first=5)
    model2, opt2, neve2 = _setup()
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    neve2.load_state_dict(saved["neve"])
    assert _run(model2, opt2, neve2, first=5) == expected and expected[-1].restored_epoch == 4
    assert _same(_weights(model2), _weights(model))


def test_r25_batchnorm_running_statistics_come_back_with_the_weights() -> None:
    """R25: a model with ``BatchNorm1d``. The restore puts back its running mean, variance and batch count of the
    minimum's epoch too (buffers are in the kept copy), bit for bit."""
    torch.manual_seed(0)
    net: nn.Module = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, C))
    model, opt, neve = _setup(model=net)
    kept = {}
    for epoch in range(1, 15):
        result = _epoch(model, opt, neve, epoch)
        kept[epoch] = _weights(model)
        if neve.should_stop:
            break
    assert result.restored_epoch == 4 and {"1.running_mean", "1.running_var", "1.num_batches_tracked"} <= set(kept[4])
    assert _same(_weights(model), kept[4]) and int(model.state_dict()["1.num_batches_tracked"]) == 4


def test_r26_a_model_moved_to_float64_mid_run_names_the_aux_dtype_fix() -> None:
    """R26: ``model.double()`` after NeVe was built (its aux set and kept weights are float32). The next step
    raises a ValueError naming the dtype clash and both fixes; nothing is measured on mixed dtypes."""
    model, opt, neve = _setup()
    _run(model, opt, neve, last=4)
    model.double()
    loss = _train(model, opt, 5)
    neve.observe(_logits(5), torch.arange(N))
    with pytest.raises(
        ValueError, match=r"aux set's dtype \(float32\) is not the model's \(float64\).*model\.float\(\)"
    ):
        neve.step(loss)


def test_r27_neve_anneal_settings_shape_the_cooldown_after_the_restore() -> None:
    """R27: ``NeVe(anneal=Anneal(min_length=5), memorization=Memorization(anneal=True))``. The restore at epoch 6
    starts a cooldown of ``Anneal``'s 5 epochs (not the default 3), linear from the LR, then memorizing."""
    model, opt, neve = _setup(memorization=COOL, anneal=Anneal(min_length=5))
    results = _run(model, opt, neve)
    assert results[5].restored_epoch == 4 and [r.annealing for r in results[5:]] == [True] * 5 + [False]
    assert [round(r.lrs[0], 6) for r in results[5:10]] == [round(0.1 * (1 - j / 6), 6) for j in range(1, 6)]
    assert results[-1].epoch == 11 and results[-1].stop_reason is StopReason.MEMORIZING


# ---------------------------------------------------------------------------- the integrations


def _lightning_fit(returned: tuple[str, ...], **options: Any) -> Any:
    """Fit a tiny LightningModule for 2 epochs whose ``training_step`` returns ``loss`` plus ``returned``."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from neve_tune.lightning import NeVeCallback

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _model()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
            x, y, idx = batch
            logits = self(x)
            out = {"loss": nn.functional.cross_entropy(logits, y), "logits": logits, "indices": idx}
            return {k: v for k, v in out.items() if k == "loss" or k in returned}

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 8, generator=g), torch.randint(0, C, (32,), generator=g), torch.arange(32))
    callback = NeVeCallback(torch.randn(16, 8, generator=g), log=False, **options)
    trainer = pl.Trainer(
        max_epochs=2,
        callbacks=[callback],
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(Module(), DataLoader(data, batch_size=8))
    return callback


def test_r28_lightning_with_memorization_none_ignores_returned_logits() -> None:
    """R28: ``NeVeCallback(aux, memorization=None)`` with a ``training_step`` that returns ``logits`` and
    ``indices`` (for its own metrics). Main: the fit died with "this NeVe was built with memorization=None ...
    drop the observe() call", a call the user never wrote; now the callback does not observe and the fit runs."""
    callback = _lightning_fit(("logits", "indices"), memorization=None)
    assert callback.neve.watch is None and callback.neve.last_epoch == 2


def test_r29_lightning_logits_without_indices_warn_once() -> None:
    """R29: ``training_step`` returns ``{"loss", "logits"}`` but no ``indices``. Main: the watch silently saw
    nothing (never a memorizing stop); now one warning names the dict to return. Both keys: observed, silent."""
    with pytest.warns(UserWarning, match=r"returned 'logits' but no 'indices'.*'indices': idx") as record:
        callback = _lightning_fit(("logits",))
    assert sum("but no 'indices'" in str(w.message) for w in record) == 1
    assert callback.neve.watch is not None and not callback.neve.watch.active
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        callback = _lightning_fit(("logits", "indices"))
    assert callback.neve.watch.counter.size == 32 and callback.last_result.flip_fraction is not None


def _hf_train(tmp_path: Any, rows: Any, **options: Any) -> Any:
    pytest.importorskip("transformers")
    from torch.utils.data import Dataset
    from transformers import TrainingArguments
    from transformers.modeling_outputs import SequenceClassifierOutput

    from neve_tune.transformers import NeVeCallback, NeVeTrainer

    class Classifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = _model()

        def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> SequenceClassifierOutput:
            logits = self.net(x)
            loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
            return SequenceClassifierOutput(loss=loss, logits=logits)

    class Rows(Dataset):
        def __len__(self) -> int:
            return len(rows)

        def __getitem__(self, i: int) -> dict[str, Any]:
            return rows[i]

    args = TrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to=[],
        per_device_train_batch_size=8,
        save_strategy="no",
        logging_strategy="epoch",
        disable_tqdm=True,
        seed=0,
        num_train_epochs=2,
        log_level="error",
    )
    callback = NeVeCallback({"x": torch.randn(16, 8)}, **options)
    NeVeTrainer(model=Classifier(), args=args, train_dataset=Rows(), callbacks=[callback]).train()
    return callback


def _rows(index: bool) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 8, generator=g), torch.randint(0, C, (32,), generator=g)
    return [{"x": x[i], "labels": y[i], **({"index": i} if index else {})} for i in range(32)]


def test_r30_neve_trainer_without_an_index_column_warns(tmp_path: Any) -> None:
    """R30: ``NeVeTrainer`` on a dataset with no ``"index"`` column. Main: silently nothing observed (the
    trainer exists only to observe); now one warning naming the ``.map(..., with_indices=True)`` fix."""
    with pytest.warns(UserWarning, match=r"no 'index' column.*with_indices=True") as record:
        callback = _hf_train(tmp_path, _rows(index=False))
    assert sum("no 'index' column" in str(w.message) for w in record) == 1
    assert callback.neve.last_epoch == 2 and not callback.neve.watch.active


def test_r31_neve_trainer_with_memorization_none_trains_without_observing(tmp_path: Any) -> None:
    """R31: ``NeVeTrainer`` with ``NeVeCallback(aux, memorization=None)`` and an index column. Main: the first
    batch raised "built with memorization=None ... drop the observe() call" (the user wrote none); now it
    trains, observing nothing. With the watch on, the same rows are observed."""
    callback = _hf_train(tmp_path, _rows(index=True), memorization=None)
    assert callback.neve.watch is None and callback.neve.last_epoch == 2
    callback = _hf_train(tmp_path, _rows(index=True))
    assert callback.neve.watch.counter.size == 32 and callback.last_result.flip_fraction is not None


def test_r32_ray_checkpoint_mid_memorisation_resumes_to_the_same_restored_weights(tmp_path: Any) -> None:
    """R32: ``neve_tune.ray.save_training_state`` after epoch 5 (the minimum's weights kept, not yet restored),
    a worker restart, ``load_training_state`` into fresh objects. The resumed trial stops at epoch 6 and puts
    back the same epoch-4 weights, bit for bit (they travel in the checkpoint)."""
    from neve_tune.ray import load_training_state, save_training_state

    model, opt, neve = _setup()
    _run(model, opt, neve, last=5)
    save_training_state(tmp_path, model, opt, neve, epoch=5)
    expected = _run(model, opt, neve, first=6)
    model2, opt2, neve2 = _setup()
    assert load_training_state(tmp_path, model2, opt2, neve2) == 5
    got = _run(model2, opt2, neve2, first=6)
    assert got == expected and got[-1].epoch == 6 and got[-1].restored_epoch == 4
    assert _same(_weights(model2), _weights(model))


def test_r33_optuna_value_reported_with_train_loss_before_the_restore_warns() -> None:
    """R33: the Optuna idiom ``value = evaluate(model); report_epoch(trial, neve, value, train_loss=loss)``. At
    the memorizing stop the step inside ``report_epoch`` puts back epoch 4's weights after ``value`` was measured.
    Main: the trial silently completed with the value of epoch 6's weights while the model holds epoch 4's;
    now a warning says so and how to keep the right value (evaluate again, or step before evaluating)."""
    import optuna

    from neve_tune.optuna import report_epoch

    model, opt, neve = _setup()
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    probe = torch.randn(32, 8, generator=torch.Generator().manual_seed(2))
    for epoch in range(1, 15):
        loss = _train(model, opt, epoch)
        neve.observe(_logits(epoch), torch.arange(N))
        with torch.no_grad():
            value = float(model(probe).sum())  # this epoch's weights
        if epoch < 6:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                assert report_epoch(trial, neve, value, train_loss=loss) is None
            continue
        with pytest.warns(UserWarning, match=r"put back the weights of epoch 4: the value.*Evaluate the model again"):
            assert report_epoch(trial, neve, value, train_loss=loss) is StopReason.MEMORIZING
        break
    with torch.no_grad():
        assert float(model(probe).sum()) != value  # the model now holds other weights than the value's
    assert trial.user_attrs["neve_stop_reason"] == "memorizing"


# ---------------------------------------------------------------------------- make_aux=, build_optimizer=


def load_blobs(request: Any) -> Any:
    """120 points of 3 Gaussian classes in 8-D: 96 for training (``val_fraction`` of them held out), 24 test."""
    from neve_tune.studies import TensorData

    g = torch.Generator().manual_seed(request.seed)
    y = torch.randint(0, 3, (120,), generator=g)
    x = torch.randn(3, 8, generator=g)[y] + 0.5 * torch.randn(120, 8, generator=g)
    n_val = round(request.val_fraction * 96)
    return TensorData(x[n_val:96], y[n_val:96], x[:n_val], y[:n_val], x[96:], y[96:], batch_size=request.batch_size)


def build_mlp(config: Any) -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def _blobs(**changes: Any) -> Any:
    from neve_tune.studies import Budget, LogUniform, NeVeSettings, StudyDefinition

    definition = StudyDefinition(
        name="blobs",
        description="three Gaussian blobs, an MLP",
        input_shape=(8,),
        num_classes=3,
        build_model=build_mlp,
        load_data=load_blobs,
        search_space={"lr": LogUniform(0.01, 0.1)},
        budget=Budget(trials=1, max_epochs=3, batch_size=32, neve=NeVeSettings(aux_samples=8)),
    )
    return dataclasses.replace(definition, **changes)


def _seeded(n: int, seed: int, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _study_check(definition: Any, tmp_path: Any) -> None:
    """What ``run_study`` does before any trial: the plan (options, output folder) and the aux-set check."""
    from neve_tune.studies import StudyOptions
    from neve_tune.studies._plan import check_aux_set, make_plan

    options = StudyOptions(backend="optuna", output_dir=str(tmp_path / "out"), track=False, progress=False)
    plan, _ = make_plan(definition, options)
    check_aux_set(plan)


class _Recorder:
    """A reporter that keeps each epoch's metrics and the optimizer, and an in-memory checkpoint of each epoch."""

    def __init__(self, resume_from: bytes | None = None, crash_after: int | None = None) -> None:
        self.metrics: list[dict[str, Any]] = []
        self.optimizer: Any = None
        self.model: Any = None
        self.resume_from, self.crash_after = resume_from, crash_after
        self.checkpoint = b""

    def needs_state(self, epoch: int) -> bool:
        return True

    def restore(self, model: Any, optimizer: Any, neve: Any, extra: dict) -> int:
        if self.resume_from is None:
            return 0
        state = torch.load(io.BytesIO(self.resume_from), weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if neve is not None:
            neve.load_state_dict(state["neve"])
        extra.update(state["extra"])
        return int(state["epoch"])

    def report(
        self, metrics: dict, *, neve: Any, model: Any, optimizer: Any, epoch: int, extra: dict, final: bool
    ) -> None:
        self.metrics.append({**dict(metrics), **({} if neve is None else neve.metrics())})
        self.optimizer, self.model = optimizer, model
        buffer = io.BytesIO()
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "extra": extra, "epoch": epoch}
        torch.save({**state, "neve": None if neve is None else neve.state_dict()}, buffer)
        self.checkpoint = buffer.getvalue()
        if self.crash_after == epoch:
            raise RuntimeError("the worker died")


def _trial(definition: Any, arm: str = "neve", lr: float = 0.05, **recorder: Any) -> _Recorder:
    from neve_tune.studies import TrialSpec, run_trial

    record = _Recorder(**recorder)
    config = {**definition.configs(1, 0)[0], "lr": lr}
    run_trial(TrialSpec(definition, arm, definition.budget), config, record)
    return record


def test_r34_make_aux_of_the_wrong_shape_is_refused_before_any_trial(tmp_path: Any) -> None:
    """R34: ``make_aux`` gives ``(n, 7)`` inputs to a model of 8 features. StudyError before any trial, with the
    model's own error and the shape it expects; nothing is created."""
    from neve_tune.studies import StudyError

    with pytest.raises(StudyError, match=r"does not go through its model \(make_aux=.*\(8, 7\).*expects inputs shaped"):
        _study_check(_blobs(make_aux=lambda n, seed: _seeded(n, seed, 7)), tmp_path)
    assert not (tmp_path / "out").exists()


def _boom(n: int, seed: int) -> torch.Tensor:
    raise FileNotFoundError("aux_images/ is missing")


def test_r35_make_aux_that_raises_is_named_as_the_culprit(tmp_path: Any) -> None:
    """R35: ``make_aux`` itself raises (a missing file). Main: "the aux set ... does not go through its model",
    blaming the model; now "could not build its aux set: make_aux=_boom raised ..." with the error."""
    from neve_tune.studies import StudyError

    with pytest.raises(
        StudyError, match=r"could not build its aux set: make_aux=_boom raised .*aux_images/ is missing"
    ):
        _study_check(_blobs(make_aux=_boom), tmp_path)


def test_r36_make_aux_returning_numpy_names_torch_as_tensor(tmp_path: Any) -> None:
    """R36: ``make_aux`` returns a NumPy array. StudyError naming ``torch.as_tensor``, before any trial."""
    import numpy as np

    from neve_tune.studies import StudyError

    numpy_aux = _blobs(make_aux=lambda n, seed: np.random.default_rng(seed).standard_normal((n, 8)).astype("float32"))
    with pytest.raises(StudyError, match=r"numpy\.ndarray of shape \(8, 8\).*torch\.as_tensor\(aux\)"):
        _study_check(numpy_aux, tmp_path)


def test_r37_make_aux_dict_for_a_positional_model_shows_the_models_error(tmp_path: Any) -> None:
    """R37: ``make_aux`` returns ``{"x": tensor}`` (so the monitor calls ``model(x=...)``) for an
    ``nn.Sequential``. StudyError with the model's own error; a plain tensor passes."""
    from neve_tune.studies import StudyError

    with pytest.raises(StudyError, match=r"unexpected keyword argument 'x'"):
        _study_check(_blobs(make_aux=lambda n, seed: {"x": _seeded(n, seed, 8)}), tmp_path)
    _study_check(_blobs(make_aux=lambda n, seed: _seeded(n, seed, 8)), tmp_path)


def test_r38_make_aux_that_ignores_its_seed_is_refused(tmp_path: Any) -> None:
    """R38: ``make_aux=lambda n, seed: torch.randn(n, 8)`` (the global RNG). Main: silently a different aux set
    in each trial (seeded per config) and after each resume, so arms and resumed trials measured on other
    inputs; now a StudyError naming a seeded generator. The check leaves the global RNG as it was."""
    from neve_tune.studies import StudyError

    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    with pytest.raises(StudyError, match=r"gave different aux sets for the same \(n, seed\) = \(8, 0\).*manual_seed"):
        _study_check(_blobs(make_aux=lambda n, seed: torch.randn(n, 8)), tmp_path)
    assert torch.equal(torch.rand(3), expected)


def test_r39_make_aux_returning_none_is_refused(tmp_path: Any) -> None:
    """R39: a ``make_aux`` that forgets its ``return``. StudyError naming the aux builders."""
    from neve_tune.studies import StudyError

    with pytest.raises(StudyError, match=r"got NoneType.*noise_aux"):
        _study_check(_blobs(make_aux=lambda n, seed: None), tmp_path)


def test_r40_the_drivers_aux_check_does_not_warn_about_its_own_two_samples(tmp_path: Any) -> None:
    """R40: any study run (the default aux set, ``aux_samples=8``). Main: every run warned "The aux set holds
    only 2 sample(s) ... Use about 100 samples", about the driver's own 2-sample check; now silent. A study whose
    ``make_aux`` really gives 1 sample still warns in its trials."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _study_check(_blobs(), tmp_path)
    with pytest.warns(UserWarning, match=r"only 1 sample\(s\)"):
        _trial(_blobs(make_aux=lambda n, seed: _seeded(1, seed, 8)))


def test_r41_make_aux_of_another_dtype_names_the_fix() -> None:
    """R41: ``make_aux`` gives float64 inputs to a float32 model. The trial's first measurement raises a
    ValueError naming both dtypes and ``aux.to(torch.float32)``."""
    with pytest.raises(
        ValueError, match=r"dtype \(float64\) is not the model's \(float32\).*aux\.to\(torch\.float32\)"
    ):
        _trial(_blobs(make_aux=lambda n, seed: _seeded(n, seed, 8, dtype=torch.float64)))


@pytest.mark.parametrize(
    ("returned", "match"),
    [
        (None, r"returned NoneType\. Return e\.g\."),
        ("tuple", r"returned tuple \(return only the optimizer: the arm owns the LR schedule\)"),
    ],
)
def test_r42_build_optimizer_returning_no_optimizer_is_refused(returned: Any, match: str) -> None:
    """R42: ``build_optimizer`` returns ``None`` or ``(optimizer, scheduler)``. StudyError; for the tuple it now
    says to return the optimizer alone (main: only "returned tuple")."""
    from neve_tune.studies import StudyError

    def build(params: Any, config: Any) -> Any:
        if returned is None:
            return None
        optimizer = torch.optim.SGD(params, lr=config["lr"])
        return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, 1)

    with pytest.raises(StudyError, match=match):
        _trial(_blobs(build_optimizer=build))


def test_r43_build_optimizer_that_ignores_the_configs_lr_warns() -> None:
    """R43: ``build_optimizer=lambda params, c: torch.optim.SGD(params, lr=1e-3)``. Main: silently every trial
    trained at 1e-3 whatever its sampled lr; now a warning with both LRs. It still trains at 1e-3."""
    with pytest.warns(
        UserWarning, match=r"at lr=\[0\.001\] for a trial whose config has lr=0\.05.*ignores the sampled lr"
    ):
        record = _trial(_blobs(build_optimizer=lambda params, config: torch.optim.SGD(params, lr=1e-3)), arm="fifo")
    assert record.metrics[0]["lr"] < 1e-3  # cosine from 1e-3
    with warnings.catch_warnings():  # a group at config['lr'] (the head) and one scaled (the body): silent
        warnings.simplefilter("error")
        _trial(
            _blobs(
                build_optimizer=lambda p, c: torch.optim.SGD(
                    [{"params": p[:2], "lr": c["lr"] / 10}, {"params": p[2:]}], lr=c["lr"]
                )
            )
        )


def test_r44_build_optimizer_over_another_models_parameters_is_refused() -> None:
    """R44: ``build_optimizer`` ignores ``params`` and builds on a module captured from elsewhere. Main: the trial
    ran three epochs, its model never trained (the test accuracy stayed that of the untrained model) and the LR
    schedule decayed an optimizer that moved nothing; now a StudyError counting the foreign tensors."""
    from neve_tune.studies import StudyError

    other = nn.Linear(8, 3)
    with pytest.raises(StudyError, match=r"over 2 tensor\(s\), 2 of them not parameters of the trial's model \(4 "):
        _trial(_blobs(build_optimizer=lambda params, config: torch.optim.SGD(other.parameters(), lr=config["lr"])))


def _two_passes(params: Any, config: Any) -> torch.optim.Optimizer:
    """Counts the parameters, then builds on them: a second pass over ``params``."""
    assert len(list(params)) == 4
    return torch.optim.SGD(params, lr=config["lr"])


def test_r45_build_optimizer_that_iterates_params_twice_works() -> None:
    """R45: ``build_optimizer`` reads ``params`` twice (counts them, then builds). Main: ``ValueError: optimizer got
    an empty parameter list`` from torch (``params`` was a one-shot generator); now it gets a list and trains."""
    record = _trial(_blobs(build_optimizer=_two_passes), arm="fifo")
    assert len(record.metrics) == 3 and len(record.optimizer.param_groups[0]["params"]) == 4


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (
            lambda p, c: torch.optim.Adam(p, lr=c["lr"], betas=c["betas"]),
            r"raised KeyError: 'betas'.*\['config_id', 'lr'\]",
        ),
        (
            lambda p: torch.optim.SGD(p, lr=0.1),
            r"raised TypeError: .*takes 1 positional argument.*build_optimizer\(params,",
        ),
    ],
)
def test_r46_build_optimizer_that_raises_names_the_call_and_the_configs_keys(build: Any, match: str) -> None:
    """R46: ``build_optimizer`` reads ``config["betas"]`` (not in the search space), or takes one argument. Main:
    a bare ``KeyError: 'betas'`` / ``TypeError`` from inside the trial; now a StudyError naming the call
    ``build_optimizer(params, config)`` and the config's keys."""
    from neve_tune.studies import StudyError

    with pytest.raises(StudyError, match=match):
        _trial(_blobs(build_optimizer=build))


def _adamw_no_decay_on_biases(params: Any, config: Any) -> torch.optim.Optimizer:
    weights = [p for p in params if p.dim() > 1]
    biases = [p for p in params if p.dim() <= 1]
    groups = [{"params": weights, "weight_decay": 0.01}, {"params": biases, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config["lr"])


def test_r47_adamw_weight_decay_groups_under_neve_resume_from_a_checkpoint() -> None:
    """R47: AdamW with a no-decay group for biases, in the ``neve`` arm (patience 1: decays come early), the trial
    killed after epoch 2 and resumed from its checkpoint. Both groups' LRs fall together, each keeps its
    ``weight_decay``, and the resumed epochs repeat the uninterrupted ones."""
    from neve_tune.studies import NeVeSettings

    definition = _blobs(build_optimizer=_adamw_no_decay_on_biases)
    budget = dataclasses.replace(
        definition.budget, max_epochs=5, neve=NeVeSettings(aux_samples=8, patience=1, stop_threshold=1e-9)
    )
    definition = _blobs(build_optimizer=_adamw_no_decay_on_biases, budget=budget)
    whole = _trial(definition, lr=0.02)
    groups = whole.optimizer.param_groups
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0] and groups[0]["lr"] == groups[1]["lr"] < 0.02
    crashed = _Recorder(crash_after=2)
    with pytest.raises(RuntimeError, match="the worker died"):
        from neve_tune.studies import TrialSpec, run_trial

        run_trial(TrialSpec(definition, "neve", budget), {**definition.configs(1, 0)[0], "lr": 0.02}, crashed)
    resumed = _trial(definition, lr=0.02, resume_from=crashed.checkpoint)
    assert [m["lr"] for m in resumed.metrics] == pytest.approx([m["lr"] for m in whole.metrics[2:]])
    assert [m["train/loss"] for m in resumed.metrics] == pytest.approx([m["train/loss"] for m in whole.metrics[2:]])
    assert [g["weight_decay"] for g in resumed.optimizer.param_groups] == [0.01, 0.0]


def test_r48_stepping_every_few_batches_warns_that_no_flip_can_be_counted(tmp_path: Any) -> None:
    """R48: ``NeVeTrainer`` with ``NeVeCallback(every_n_steps=2)`` (4 steps per epoch): each NeVe step sees other
    samples than the one before. Main: silently no flip was ever counted (documented in the mixin only); now
    one warning says NeVe must step once per epoch. Once per epoch: no such warning."""
    with pytest.warns(UserWarning, match=r"saw no sample in step 2 that it saw in the step before.*once per epoch"):
        callback = _hf_train(tmp_path, _rows(index=True), every_n_steps=2)
    assert callback.neve.last_epoch == 4 and callback.last_result.flip_fraction is None
    model, opt, neve = _setup()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _run(model, opt, neve, last=3)


def test_r49_make_aux_returning_a_generator_of_batches_is_measured_every_epoch(tmp_path: Any) -> None:
    """R49: ``make_aux`` returns a generator of two batches (a one-shot iterable). The driver check passes, and
    the trial measures the velocity on both batches at every epoch (the set is kept, not exhausted)."""
    definition = _blobs(make_aux=lambda n, seed: (_seeded(4, seed + i, 8) for i in range(2)))
    _study_check(definition, tmp_path)
    record = _trial(definition)
    assert [m[keys.EPOCH] for m in record.metrics] == [1, 2, 3]
    assert all(math.isfinite(m[keys.MODEL_VELOCITY]) and m[keys.MODEL_VELOCITY] > 0 for m in record.metrics)
