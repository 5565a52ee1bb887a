"""The optional ``schedulefree`` arm: Schedule-Free SGD at the fixed budget, its train/eval switches, the
BatchNorm recomputation at the evaluation weights, and a tiny real study next to FIFO."""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

pytest.importorskip("schedulefree")

from schedulefree import SGDScheduleFree

from neve_tune.studies import ARMS, StudyError, TrialSpec, get_arm, get_study, run_trial
from neve_tune.studies._schedulefree import (
    BN_BATCHES,
    ScheduleFreePolicy,
    recompute_batch_norm,
    warmup_steps,
)


def test_the_arm_is_optional_validation_free_and_runs_the_fixed_budget() -> None:
    arm = get_arm("schedulefree")
    budget = get_study("digits").budget
    assert arm.name not in ARMS  # not in the default --arms
    assert arm.policy is ScheduleFreePolicy and not arm.uses_neve
    assert not arm.holds_out_validation and arm.train_fraction(budget) == 1.0
    assert (arm.objective, arm.direction) == ("train/loss", "minimize")
    params = arm.params(budget)
    assert params["optimizer"] == "schedulefree.SGDScheduleFree" and params["scheduler"] == "FIFOScheduler"
    assert params["momentum"] == budget.momentum and params["warmup_fraction"] == 0.05
    assert warmup_steps(dataclasses.replace(budget, max_epochs=5), 22) == 6  # 5% of 110 steps, rounded
    assert warmup_steps(dataclasses.replace(budget, max_epochs=1), 3) == 1  # at least one


def _policy(budget: Any) -> tuple[nn.Module, torch.optim.Optimizer, ScheduleFreePolicy]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    optimizer = ScheduleFreePolicy.build_optimizer(model, {"lr": 0.5, "weight_decay": 1e-4}, budget, 10)
    return model, optimizer, ScheduleFreePolicy(model, optimizer, torch.zeros(2, 4), budget)


def test_the_policy_moves_the_weights_between_the_training_and_the_evaluation_point() -> None:
    budget = dataclasses.replace(get_study("digits").budget, max_epochs=4, monitor_baselines=False)
    model, optimizer, policy = _policy(budget)
    assert isinstance(optimizer, SGDScheduleFree)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"], group["warmup_steps"]) == (0.5, 0.9, 1e-4, 2)
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    policy.before_train()
    assert group["train_mode"]
    for _ in range(5):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    at_y = [p.detach().clone() for p in model.parameters()]
    policy.before_eval([(x, y)], torch.device("cpu"))
    assert not group["train_mode"]
    # Eval mode holds the average x, train mode the interpolation y = (1 - beta) z + beta x.
    beta = group["momentum"]
    assert not torch.allclose(model[0].weight, at_y[0])  # the weights moved from y to x
    for p, py in zip(model.parameters(), at_y, strict=True):
        torch.testing.assert_close((1 - beta) * optimizer.state[p]["z"] + beta * p, py)
    policy.before_train()
    for p, py in zip(model.parameters(), at_y, strict=True):
        torch.testing.assert_close(p, py)
    assert policy.after_epoch(0.5).stop_reason is None  # no schedule, no stop: the budget decides


def test_batch_norm_statistics_are_recomputed_at_the_current_weights() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    model.eval()
    bn = model[1]
    bn.momentum = 0.1
    batches = [(torch.randn(16, 4) * (i + 1), torch.zeros(16, dtype=torch.long)) for i in range(BN_BATCHES + 5)]
    assert recompute_batch_norm(model, iter(batches), torch.device("cpu")) == BN_BATCHES
    with torch.no_grad():
        outs = [model[0](x) for x, _ in batches[:BN_BATCHES]]
    # The plain average over the first BN_BATCHES batches (not a momentum average), at these weights.
    torch.testing.assert_close(bn.running_mean, torch.stack([o.mean(0) for o in outs]).mean(0))
    torch.testing.assert_close(bn.running_var, torch.stack([o.var(0, unbiased=True) for o in outs]).mean(0))
    assert bn.momentum == 0.1 and not model.training  # restored
    assert recompute_batch_norm(nn.Linear(2, 2), iter(batches), torch.device("cpu")) == 0  # no BN: nothing


class _Reporter:
    """Records the optimizer's mode and the trial's numbers at each report (checkpointing every epoch)."""

    def __init__(self) -> None:
        self.modes: list[bool] = []
        self.metrics: list[dict[str, Any]] = []
        self.optimizers: list[Any] = []

    def needs_state(self, epoch: int) -> bool:
        return True

    def restore(self, model: Any, optimizer: Any, neve: Any, extra: dict) -> int:
        return 0

    def report(
        self, metrics: dict, *, neve: Any, model: Any, optimizer: Any, epoch: int, extra: dict, final: bool
    ) -> None:
        self.modes.append(optimizer.param_groups[0]["train_mode"])
        self.optimizers.append(type(optimizer).__name__)
        self.metrics.append(dict(metrics))


def test_a_trial_trains_in_train_mode_and_is_evaluated_and_saved_in_eval_mode() -> None:
    digits = get_study("digits")
    spec = TrialSpec("digits", "schedulefree", dataclasses.replace(digits.budget, max_epochs=3))
    reporter = _Reporter()
    config = digits.configs(3, 0)[2]
    outcome = run_trial(spec, config, reporter)  # SGDScheduleFree.step raises unless in train mode
    assert outcome.epochs == 3 and outcome.stop_reason == "max_t"
    assert reporter.optimizers == ["SGDScheduleFree"] * 3
    assert reporter.modes == [False, False, False]  # every evaluation and checkpoint at the x point
    assert not any(k.startswith(("val/", "neve/")) for k in reporter.metrics[-1])  # no validation data
    assert [m["lr"] for m in reporter.metrics] == [config["lr"]] * 3  # no LR schedule
    assert math.isfinite(reporter.metrics[-1]["train/loss"])


def test_a_missing_schedulefree_package_is_refused_before_anything_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from neve_tune.studies import run_study

    monkeypatch.setitem(sys.modules, "schedulefree", None)  # as if it were not installed
    with pytest.raises(StudyError, match=r"The schedulefree arm needs the schedulefree package .*pip install"):
        run_study("digits", arms=["fifo", "schedulefree"], output_dir=tmp_path, track=False)
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_a_tiny_study_next_to_fifo(tmp_path: Path) -> None:
    pytest.importorskip("optuna")
    from mlflow import MlflowClient

    from neve_tune.studies import run_study

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_study(
        "digits",
        backend="optuna",
        arms=["schedulefree", "fifo"],
        trials=3,
        max_epochs=5,
        tracking_uri=uri,
        output_dir=tmp_path / "out",
        progress=False,
    )
    rows = {s.arm: s for s in result.summaries}
    sf = rows["schedulefree"]
    assert sf.trial_epochs == 3 * 5 and sf.stop_reasons == {"max_t": 3} and sf.stop_epochs == (5, 5, 5)
    assert sf.train_fraction == 1.0 and sf.picked_test_acc > 0.8  # it trains: chance is 0.1
    assert sf.pick_rule == "lowest final train loss at the fixed budget (validation-free)"
    records = result.arms["schedulefree"].records
    picked = min(records, key=lambda r: r.metric("train/loss"))
    assert sf.picked_config_id == picked.config_id  # the lowest final train loss, never the test accuracy
    # The same configurations as FIFO's.
    assert sorted(r.config["lr"] for r in records) == sorted(r.config["lr"] for r in result.arms["fifo"].records)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("neve-tune-digits")
    trials = client.search_runs([exp.experiment_id], "tags.role = 'trial' and tags.arm = 'schedulefree'")
    assert len(trials) == 3 and {t.data.tags["neve/stop_reason"] for t in trials} == {"max_t"}
    assert {t.info.status for t in trials} == {"FINISHED"}
