"""The built-in ``listops`` study: ListOps generated in code, a GRU over token ids, AdamW, a token aux set."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import pytest
import torch

from neve_tune.studies import DataRequest, TrialSpec, get_study, list_studies, run_trial
from neve_tune.studies.builtin import listops


def _parse(ids: list[int]) -> int:
    """An independent evaluator: a stack machine over the token ids (not the generator's tree)."""
    stack: list[tuple[str, list[int]]] = []
    value = -1
    for tok in (listops.VOCAB[i] for i in ids if i != listops.PAD):
        if tok in listops.OPERATORS:
            stack.append((tok, []))
            continue
        if tok == "]":
            op, args = stack.pop()
            value = listops.evaluate_tree((op, list(args)))
        else:
            value = int(tok)
        if stack:
            stack[-1][1].append(value)
    assert not stack
    return value


@pytest.mark.parametrize(
    ("expression", "value"),
    [
        ("[MAX 2 9 [MIN 4 7 ] 0 ]", 9),
        ("[MIN 5 [MAX 3 8 ] 6 ]", 5),
        ("[MED 1 2 3 4 ]", 2),  # even count: the mean of the middle two, rounded down
        ("[MED 7 1 5 ]", 5),
        ("[SM 9 8 [SM 4 4 ] ]", 5),
    ],
)
def test_operators_follow_the_listops_definitions(expression: str, value: int) -> None:
    ids = [listops.TOKEN_ID[t] for t in expression.split()]
    assert _parse(ids) == value


def test_generation_is_deterministic_balanced_correct_and_leaves_the_global_rng_alone() -> None:
    state = random.getstate()
    torch_state = torch.random.get_rng_state()
    x, y = listops.generate_listops(200, seed=7)
    assert random.getstate() == state and torch.equal(torch.random.get_rng_state(), torch_state)
    x2, y2 = listops.generate_listops(200, seed=7)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = listops.generate_listops(200, seed=8)
    assert not torch.equal(x, x3)
    assert x.shape == (200, listops.MAX_LEN) and x.dtype == torch.long and y.shape == (200,)
    assert torch.bincount(y, minlength=10).tolist() == [20] * 10
    lengths = (x != listops.PAD).sum(1)
    assert int(lengths.max()) <= 26 and int(lengths.min()) >= 4  # "[OP d d ]" at least
    for row, label in zip(x.tolist(), y.tolist(), strict=True):
        real = [i for i in row if i != listops.PAD]
        assert row[: len(real)] == real  # right-padded
        assert _parse(real) == label
    assert any(sum(1 for i in row if listops.VOCAB[i] in listops.OPERATORS) > 1 for row in x.tolist())  # nested
    with pytest.raises(ValueError, match="multiple of 10"):
        listops.generate_listops(25, seed=0)


def test_splits_are_fixed_disjoint_and_the_validation_hold_out_follows_the_study_seed() -> None:
    x, y, x_test, y_test = listops.listops_splits()
    assert (len(y), len(y_test)) == (listops.NUM_TRAIN, listops.NUM_TEST)
    train = {tuple(r) for r in x.tolist()}
    assert not train & {tuple(r) for r in x_test.tolist()}
    full = listops.load_data(DataRequest(val_fraction=0.0, seed=0, batch_size=128))
    assert (full.num_train, full.num_val, full.num_test) == (4000, 0, 1000)
    held = listops.load_data(DataRequest(val_fraction=0.1, seed=0, batch_size=128))
    assert (held.num_train, held.num_val, held.num_test) == (3600, 400, 1000)
    again = listops.load_data(DataRequest(val_fraction=0.1, seed=0, batch_size=128))
    other = listops.load_data(DataRequest(val_fraction=0.1, seed=1, batch_size=128))
    assert torch.equal(held.x_val, again.x_val) and not torch.equal(held.x_val, other.x_val)
    assert torch.equal(held.x_test, other.x_test)
    assert {tuple(r) for r in held.x_val.tolist()} | {tuple(r) for r in held.x_train.tolist()} == train


def test_the_gru_ignores_padding_and_takes_token_ids() -> None:
    torch.manual_seed(0)
    model = listops.build_model({"width": 32}).eval()
    x, _ = listops.generate_listops(20, seed=3)
    out = model(x)
    assert out.shape == (20, 10)
    longer = torch.cat([x, torch.zeros(20, 8, dtype=torch.long)], 1)  # more padding changes nothing
    torch.testing.assert_close(model(longer), out)
    torch.testing.assert_close(model(x[:1]), out[:1], atol=1e-6, rtol=1e-5)  # nor does the batch's other rows
    with pytest.raises((IndexError, RuntimeError)):
        model(torch.randn(2, listops.MAX_LEN))  # float noise is no input for an Embedding


def test_the_definition_builds_adamw_and_a_token_aux_set() -> None:
    assert "listops" in list_studies()
    study = get_study("listops")
    assert study is listops.STUDY and study.num_classes == 10
    configs = study.configs(seed=0)
    assert len(configs) == study.budget.trials == 10 and {c["width"] for c in configs} <= {32, 64}
    assert all(3e-4 <= c["lr"] <= 1e-2 and 1e-3 <= c["weight_decay"] <= 1e-1 for c in configs)
    assert study.make_aux is not None and study.build_optimizer is not None
    assert study.make_aux is listops.make_aux
    aux = listops.make_aux(100, 0)
    assert aux.shape == (100, listops.MAX_LEN) and aux.dtype == torch.long
    assert int(aux.min()) >= 1 and int(aux.max()) < listops.VOCAB_SIZE  # never the padding id
    assert torch.equal(aux, listops.make_aux(100, 0)) and not torch.equal(aux, listops.make_aux(100, 1))
    model = study.build_model(configs[0])
    optimizer = study.build_optimizer(model.parameters(), configs[0])
    assert isinstance(optimizer, torch.optim.AdamW)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"]) == (configs[0]["lr"], configs[0]["weight_decay"])
    assert model(aux).shape == (100, 10)


class _Recorder:
    def __init__(self) -> None:
        self.reports: list[dict[str, Any]] = []

    def needs_state(self, epoch: int) -> bool:
        return False

    def restore(self, model: Any, optimizer: Any, neve: Any, extra: dict) -> int:
        return 0

    def report(
        self, metrics: dict, *, neve: Any, model: Any, optimizer: Any, epoch: int, extra: dict, final: bool
    ) -> None:
        self.reports.append({**metrics, "optimizer": type(optimizer).__name__})


@pytest.mark.parametrize("arm", ["neve", "asha"])
def test_a_tiny_trial_trains_with_adamw_and_measures_the_token_aux_set(arm: str) -> None:
    study = get_study("listops")
    spec = TrialSpec("listops", arm, dataclasses.replace(study.budget, max_epochs=2))
    config = {**study.configs(seed=0)[0], "lr": 3e-3, "width": 32}
    seen: list[dict[str, Any]] = []
    outcome = run_trial(spec, config, recorder := _Recorder(), on_epoch=lambda e, m: seen.append(m))
    assert outcome.epochs == 2 and outcome.stop_reason == "max_t"
    assert [r["optimizer"] for r in recorder.reports] == ["AdamW", "AdamW"]
    first, last = recorder.reports
    assert last["train/loss"] < first["train/loss"] < 2.31  # below chance (ln 10) and falling
    assert 0.15 < last["test/acc"] < 0.97
    velocity = seen[-1]["neve/model_velocity" if arm == "neve" else "monitor/model_velocity"]
    assert 0 < velocity < 1
