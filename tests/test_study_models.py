"""Studies for any model and optimizer (issue 21): a token model with AdamW and a token aux set, end to end on
Ray and Optuna; the driver's aux-set check; an arm whose every trial failed; checkpoints with AdamW groups.

The token task is generated here: sequences of 12 ids over a vocabulary of 16, labelled 1 when more than half
of the ids lie in the lower half of the vocabulary. An Embedding + mean-pool classifier learns it in a few
epochs; its first layer takes integer ids only, so float noise cannot go through it.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from neve_tune import token_aux
from neve_tune.studies import (
    Budget,
    DataRequest,
    LogUniform,
    NeVeSettings,
    StudyDefinition,
    StudyError,
    TensorData,
    TrialSpec,
    run_trial,
)

VOCAB, SEQ = 16, 12


def _tokens(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    return x, ((x < VOCAB // 2).sum(1) > SEQ // 2).long()


def load_tokens(request: DataRequest) -> TensorData:
    """320 training sequences (``val_fraction`` of them held out), 160 test sequences."""
    x, y = _tokens(320, request.seed)
    n_val = round(request.val_fraction * len(y))
    xt, yt = _tokens(160, 10_000 + request.seed)
    return TensorData(x[n_val:], y[n_val:], x[:n_val], y[:n_val], xt, yt, batch_size=request.batch_size)


class MeanPool(nn.Module):
    """Embedding, mean over the sequence, linear head."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.head = nn.Linear(width, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids).mean(1))


def build_mean_pool(config: Mapping[str, Any]) -> nn.Module:
    return MeanPool()


def make_token_aux(n: int, seed: int) -> Any:
    return token_aux(VOCAB, SEQ, n=n, seed=seed)


def build_adamw(params: Iterable[nn.Parameter], config: Mapping[str, Any]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=config["lr"], weight_decay=config["weight_decay"], betas=(0.9, 0.98))


def build_adamw_two_groups(params: Iterable[nn.Parameter], config: Mapping[str, Any]) -> torch.optim.Optimizer:
    """Two param groups: the embedding at a tenth of the head's LR."""
    params = list(params)
    return torch.optim.AdamW(
        [{"params": params[:1], "lr": config["lr"] / 10}, {"params": params[1:]}],
        lr=config["lr"],
        weight_decay=config["weight_decay"],
    )


TOKENS = StudyDefinition(
    name="tokens-test",
    description="a generated token task, Embedding + mean pool, AdamW",
    input_shape=(SEQ,),
    num_classes=2,
    build_model=build_mean_pool,
    load_data=load_tokens,
    search_space={"lr": LogUniform(3e-3, 3e-2), "weight_decay": LogUniform(1e-4, 1e-2)},
    budget=Budget(
        trials=2, max_epochs=3, batch_size=32, grace_period=1, reduction_factor=2, neve=NeVeSettings(aux_samples=8)
    ),
    make_aux=make_token_aux,
    build_optimizer=build_adamw,
)
#: The same study without make_aux: float noise into an Embedding.
TOKENS_ON_NOISE = dataclasses.replace(TOKENS, name="tokens-noise", make_aux=None)


def load_no_unlabelled_split(request: DataRequest) -> TensorData:
    """Fails for an arm that holds out no validation data (the neve arm), as a broken loader would."""
    if request.val_fraction == 0:
        raise RuntimeError("this loader needs a validation split (val_fraction=0)")
    return load_tokens(request)


FAILS_WITHOUT_VALIDATION = dataclasses.replace(TOKENS, name="tokens-fail", load_data=load_no_unlabelled_split)


# ---------------------------------------------------------------------------- fast: one trial in this process


class Recorder:
    """A reporter that records each epoch's optimizer and keeps an in-memory checkpoint of every epoch."""

    def __init__(self, *, crash_after: int | None = None, resume_from: dict[str, Any] | None = None) -> None:
        self.crash_after, self.resume_from = crash_after, resume_from
        self.metrics: list[dict[str, Any]] = []
        self.optimizers: list[tuple[str, list[float]]] = []
        self.checkpoint: dict[str, Any] | None = None

    def needs_state(self, epoch: int) -> bool:
        return True

    def restore(self, model: Any, optimizer: Any, neve: Any, extra: dict) -> int:
        if self.resume_from is None:
            return 0
        state = torch.load(io.BytesIO(self.resume_from["bytes"]), weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if neve is not None:
            neve.load_state_dict(state["neve"])
        extra.update(state["extra"])
        return int(state["epoch"])

    def report(
        self, metrics: dict, *, neve: Any, model: Any, optimizer: Any, epoch: int, extra: dict, final: bool
    ) -> None:
        self.metrics.append(dict(metrics))
        self.optimizers.append((type(optimizer).__name__, [g["lr"] for g in optimizer.param_groups]))
        buffer = io.BytesIO()
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "extra": extra, "epoch": epoch}
        torch.save({**state, "neve": None if neve is None else neve.state_dict()}, buffer)
        self.checkpoint = {"bytes": buffer.getvalue()}
        if self.crash_after == epoch:
            raise RuntimeError("the worker died")


@pytest.mark.parametrize("arm", ["neve", "asha"])
def test_adamw_param_groups_follow_the_arms_schedule_and_resume_from_a_checkpoint(arm: str) -> None:
    definition = dataclasses.replace(TOKENS, build_optimizer=build_adamw_two_groups)
    budget = dataclasses.replace(
        definition.budget, max_epochs=6, neve=NeVeSettings(aux_samples=8, patience=1, stop_threshold=1e-9)
    )
    spec = TrialSpec(definition, arm, budget, seed=1)
    config = {**definition.configs(1, 1)[0], "lr": 0.02}
    whole = Recorder()
    run_trial(spec, config, whole)
    kinds = {kind for kind, _ in whole.optimizers}
    assert kinds == {"AdamW"}  # the study's optimizer, in every epoch
    lrs = [lr for _, lr in whole.optimizers]
    # Both groups move together: the embedding's LR stays a tenth of the head's, whatever the schedule did.
    assert all(emb == pytest.approx(head / 10) for emb, head in lrs)
    assert lrs[-1][1] < 0.02  # NeVe's decay/anneal or the cosine schedule lowered it
    if arm == "asha":  # cosine to 0 at max_epochs: after epoch e, lr = 0.02 * (1 + cos(pi e / 6)) / 2
        import math

        assert [head for _, head in lrs] == pytest.approx([0.01 * (1 + math.cos(math.pi * e / 6)) for e in range(1, 7)])
    # A trial that dies after epoch 3 and resumes from its checkpoint gives the same numbers.
    crashed = Recorder(crash_after=3)
    with pytest.raises(RuntimeError, match="the worker died"):
        run_trial(spec, config, crashed)
    resumed = Recorder(resume_from=crashed.checkpoint)
    run_trial(spec, config, resumed)
    assert len(resumed.metrics) == len(whole.metrics) - 3
    for again, first in zip(resumed.metrics, whole.metrics[3:], strict=True):
        assert again["epoch"] == first["epoch"] and again["lr"] == pytest.approx(first["lr"])
        assert again["train/loss"] == pytest.approx(first["train/loss"], rel=1e-5)
        assert again["test/acc"] == first["test/acc"]


def test_a_model_that_cannot_take_float_noise_is_refused_before_any_trial(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from neve_tune.cli import EXIT_USAGE, main
    from neve_tune.studies import run_study

    with pytest.raises(StudyError, match=r"make_aux=.*token_aux") as info:
        run_study(TOKENS_ON_NOISE, backend="optuna", output_dir=tmp_path / "out", track=False, progress=False)
    assert "float noise shaped like input_shape=(12,)" in str(info.value)
    assert "indices" in str(info.value)  # the model's own error, shown
    assert not (tmp_path / "out").exists()  # nothing ran
    monkeypatch.chdir(tmp_path)
    code = main(["study", "run", "tests.test_study_models:TOKENS_ON_NOISE", "--backend", "optuna", "--no-progress"])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE and "make_aux=" in err and "neve_tune.token_aux" in err
    assert not any(tmp_path.iterdir())  # no mlflow.db, no results


def test_make_aux_and_build_optimizer_reach_the_trial() -> None:
    aux: Any = TOKENS.aux(5, 3)
    noise: Any = TOKENS_ON_NOISE.aux(5, 3)
    assert torch.equal(aux, token_aux(VOCAB, SEQ, n=5, seed=3)) and aux.dtype == torch.long
    assert noise.shape == (5, SEQ) and noise.is_floating_point()  # the default: float noise like input_shape
    not_an_optimizer: Any = lambda params, config: "adamw"  # noqa: E731
    bad = dataclasses.replace(TOKENS, build_optimizer=not_an_optimizer)
    with pytest.raises(StudyError, match="build_optimizer must return a torch.optim.Optimizer, but returned str"):
        run_trial(TrialSpec(bad, "fifo", bad.budget), bad.configs(1, 0)[0], Recorder())


# ---------------------------------------------------------------------------- end to end


def _check_token_study(result: Any, arms: list[str]) -> None:
    assert [s.arm for s in result.summaries] == arms and not result.failures
    for arm in arms:
        records = result.arms[arm].records
        assert len(records) == 2 and all(r.stop_reason not in ("error", "diverged") for r in records)
        assert all(0.0 <= r.test_acc <= 1.0 for r in records)
    neve = result.arms["neve"].records
    assert all(r.metric("neve/model_velocity") >= 0 for r in neve)  # measured on the token aux set


def test_token_model_study_with_adamw_on_optuna(tmp_path: Path) -> None:
    pytest.importorskip("optuna")
    from neve_tune.studies import run_study

    result = run_study(
        TOKENS, backend="optuna", arms=["neve", "asha"], track=False, output_dir=tmp_path, progress=False
    )
    _check_token_study(result, ["neve", "asha"])


@pytest.mark.slow
def test_token_model_study_with_adamw_on_ray(tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    from neve_tune.studies import run_study

    started = not ray.is_initialized()  # a Ray of the session's, or one of this test's own
    if started:
        ray.init(num_cpus=2, include_dashboard=False)
    try:
        result = run_study(
            TOKENS, backend="ray", arms=["neve", "asha"], track=False, output_dir=tmp_path, progress=False
        )
    finally:
        if started:
            ray.shutdown()
    _check_token_study(result, ["neve", "asha"])


@pytest.mark.parametrize("tracked", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_an_arm_whose_every_trial_failed_fails_the_study_and_says_where(
    tracked: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("optuna")
    from neve_tune.cli import EXIT_FAILED, main

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking = ["--tracking-uri", uri] if tracked else ["--no-mlflow"]
    code = main(
        ["study", "run", "tests.test_study_models:FAILS_WITHOUT_VALIDATION", "--backend", "optuna", "--arms",
         "neve,fifo", *tracking, "--no-progress", "--output-dir", str(tmp_path / "out")]
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert code == EXIT_FAILED
    rows = [x for x in out.splitlines() if x.lstrip("│| ").startswith(("neve ", "fifo "))]
    assert len(rows) == 2  # the table still prints, with the failed arm's row
    [line] = [x for x in err.splitlines() if x.startswith("neve-tune: error:")]
    assert "the neve arm: every one of its 2 trials failed; the first (config " in line
    assert "RuntimeError: this loader needs a validation split (val_fraction=0)" in line
    assert "user attr 'error'" in line and str(tmp_path / "out" / "optuna" / "journal.log") in line
    assert ("MLflow: the run tagged trial_id=optuna-" in line and "tag 'error'" in line) == tracked
    if not tracked:
        return
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("neve-tune-tokens-fail")
    assert exp is not None
    arms = {r.data.tags["arm"]: r for r in client.search_runs([exp.experiment_id], "tags.role = 'arm'")}
    assert (arms["neve"].info.status, arms["fifo"].info.status) == ("FAILED", "FINISHED")
    [study] = client.search_runs([exp.experiment_id], "tags.role = 'study'")
    assert study.info.status == "FAILED"  # the study ran, but one arm has no result
    assert study.data.params["aux"] == "tests.test_study_models.make_token_aux"
    assert study.data.params["optimizer"] == "tests.test_study_models.build_adamw"
    trials = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{arms['neve'].info.run_id}'")
    assert len(trials) == 2 and {t.info.status for t in trials} == {"FAILED"}
    assert "val_fraction=0" in trials[0].data.tags["error"]
    fifo = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{arms['fifo'].info.run_id}'")
    assert len(fifo) == 2 and {t.info.status for t in fifo} == {"FINISHED"}  # the other arm ran


def test_the_aux_check_before_the_trials_raises_no_small_aux_set_warning(tmp_path: Path) -> None:
    import warnings

    from neve_tune.studies._options import StudyOptions
    from neve_tune.studies._plan import check_aux_set, make_plan

    plan, _ = make_plan(TOKENS, StudyOptions(backend="optuna", output_dir=tmp_path, track=False, progress=False))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the 2-sample check warned "fewer than 8" on every study run
        check_aux_set(plan)
