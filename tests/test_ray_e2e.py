"""NeVeScheduler and the trainable helpers in real Ray Tune runs on digits (local Ray, 2 CPUs)."""

from __future__ import annotations

import itertools
import math
import os
import time

import pytest
import torch
from ray import tune
from torch import nn

from neve_tune import NeVe, keys, noise_aux
from neve_tune.ray import NeVeScheduler, StopInfo, report_epoch, restore_from_checkpoint, trial_device
from neve_tune.studies.builtin.digits import DigitsCNN, load_digits_splits
from tests.readme import readme_example

V = keys.MODEL_VELOCITY
STOP_REASON, STOP_EPOCH = keys.STOP_REASON, keys.STOP_EPOCH


pytestmark = pytest.mark.usefixtures("ray_session")  # one Ray for the session (tests/conftest.py)


def _train_epoch(model, opt, x, y) -> tuple[float, float]:
    model.train()
    total, correct, n = 0.0, 0, 0
    for idx in torch.randperm(len(y), device=y.device).split(64):
        out = model(x[idx])
        loss = nn.functional.cross_entropy(out, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        total += loss.item() * len(idx)
        correct += int((out.argmax(1) == y[idx]).sum())
        n += len(idx)
    return total / n, correct / n


@torch.no_grad()
def _evaluate(model, x, y) -> tuple[float, float]:
    model.eval()
    out = model(x)
    return nn.functional.cross_entropy(out, y).item(), (out.argmax(1) == y).float().mean().item()


def digits_trainable(config: dict) -> None:
    """One trainable for both study arms: ``arm="neve"`` (all data, NeVe) or ``"asha"`` (val split)."""
    torch.set_num_threads(1)
    torch.manual_seed(config.get("seed", 0))
    device = trial_device()
    arm = config.get("arm", "neve")
    data = load_digits_splits(val_fraction=0.1 if arm == "asha" else 0.0)
    x, y = data.x_train.to(device), data.y_train.to(device)
    model = DigitsCNN(width=8).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=0.9)
    neve = NeVe(model, opt, noise_aux((1, 8, 8), n=64, seed=0), patience=2) if arm == "neve" else None
    start = restore_from_checkpoint(model, opt, neve)
    for epoch in range(start + 1, config.get("epochs", 30) + 1):
        train_loss, train_acc = _train_epoch(model, opt, x, y)
        metrics = {"train_loss": train_loss, "train_acc": train_acc, "start_epoch": start}
        metrics.update(wall=time.time(), on_cpu=float(device.type == "cpu"))
        if neve is not None:
            neve.step()
        else:
            val = _evaluate(model, data.x_val.to(device), data.y_val.to(device))
            metrics["val_loss"], metrics["val_acc"] = val
        report_epoch(
            neve, metrics, model=model, optimizer=opt, epoch=epoch, checkpoint_every=config.get("every", 1)
        )
        marker = config.get("fail_marker")
        if marker and epoch == config["fail_at"] and not os.path.exists(marker):
            open(marker, "w").close()  # fail once: the marker survives the restart
            raise RuntimeError(f"injected failure after epoch {epoch}")


def no_velocity_trainable(config: dict) -> None:
    for i in range(3):
        tune.report({"loss": 1.0 / (i + 1), "acc": 0.5})


def _history(result) -> list[tuple[int, float]]:
    df = result.metrics_dataframe
    return [(int(e), float(v)) for e, v in zip(df[keys.EPOCH], df[V], strict=True)]


def _rows(df, columns) -> list[tuple]:
    """Rows as tuples, NaN (D is absent at epoch 1) as None so that rows compare equal."""
    return [
        tuple(None if isinstance(x, float) and math.isnan(x) else x for x in row)
        for row in df[columns].itertuples(index=False)
    ]


def _first_stop_epoch(history, threshold=1e-3, grace=1, max_t=math.inf) -> int:
    """Where the rule says the trial must stop, replayed on its reported history."""
    for epoch, v in history:
        if not math.isfinite(v) or (v < threshold and epoch >= grace) or epoch >= max_t:
            return epoch
    raise AssertionError(f"no stop in {history}")


def _run_config(tmp_path, name, **kwargs) -> tune.RunConfig:
    return tune.RunConfig(storage_path=str(tmp_path), name=name, verbose=0, **kwargs)


# ----------------------------------------------------------------------------------- README example
@pytest.mark.slow
def test_readme_example_converges_and_diverges(tmp_path, monkeypatch):
    """The README's Ray example: lr=0.05 converges before the 30-epoch cap, lr=1e4 diverges at once."""
    monkeypatch.chdir(tmp_path)
    ns: dict = {"__name__": "readme_ray_example"}
    exec(readme_example("ray"), ns)
    results = ns["results"]
    assert results.num_errors == 0 and len(results) == 2
    by_lr = {r.config["lr"]: r for r in results}

    good = by_lr[0.05]
    assert StopInfo.from_metrics(good.metrics).reason.value == good.metrics[STOP_REASON] == "converged"
    history = _history(good)
    stop = good.metrics[STOP_EPOCH]
    assert stop == good.metrics["training_iteration"] == len(history) < 30
    assert stop == _first_stop_epoch(history, grace=3)  # the first epoch the rule allows, no later
    assert history[-1][1] < 1e-3 and all(v >= 1e-3 for _, v in history[2:-1])

    bad = by_lr[1e4]
    history = _history(bad)
    assert bad.metrics[STOP_REASON] == "diverged"
    first_non_finite = next(e for e, v in history if not math.isfinite(v))
    # Stopped at its first non-finite velocity, inside the grace period (3), with nothing reported after.
    assert bad.metrics[STOP_EPOCH] == first_non_finite == history[-1][0] == 1
    assert os.path.isdir(tmp_path / "neve_results" / "ray_example")


# ----------------------------------------------------------------------------------- errors
def test_missing_velocity_key_fails_the_run_with_the_fix(tmp_path):
    """Through the one-line entry point `tune.run(..., scheduler=NeVeScheduler())`."""
    with pytest.raises(tune.TuneError) as err:
        tune.run(
            no_velocity_trainable,
            scheduler=NeVeScheduler(),
            storage_path=str(tmp_path),
            name="missing",
            verbose=0,
        )
    text = str(err.value)
    assert "NeVeScheduler needs 'neve/model_velocity' in every result" in text
    assert "tune.report({**neve.metrics(), **your_metrics})" in text
    assert "allow_missing=True" in text
    assert "Reported keys: ['acc', 'loss']" in text


# ----------------------------------------------------------------------------------- checkpoints
@pytest.mark.slow
def test_trial_failure_resumes_from_checkpoint_with_identical_velocities(tmp_path):
    """max_failures=1: a trial fails once after epoch 5, resumes from its epoch-4 checkpoint (every=2),
    and reports exactly the velocities and LRs of the same trial run without a failure."""
    marker = str(tmp_path / "failed_once")
    tuner = tune.Tuner(
        digits_trainable,
        param_space={
            "lr": 0.05,
            "every": 2,
            "fail_at": 5,
            "fail_marker": tune.grid_search([None, marker]),
        },
        tune_config=tune.TuneConfig(scheduler=NeVeScheduler()),
        run_config=_run_config(tmp_path, "resume", failure_config=tune.FailureConfig(max_failures=1)),
    )
    results = tuner.fit()
    assert results.num_errors == 0 and os.path.exists(marker)
    plain, failed = sorted(results, key=lambda r: r.config["fail_marker"] is not None)
    assert failed.metrics["start_epoch"] == 4 and plain.metrics["start_epoch"] == 0

    columns = [keys.EPOCH, V, keys.VELOCITY_CHANGE, keys.LR]
    rows_plain, rows_failed = (_rows(r.metrics_dataframe, columns) for r in (plain, failed))
    stop = plain.metrics[STOP_EPOCH]
    assert [int(r[0]) for r in rows_plain] == list(range(1, stop + 1)) and 5 < stop < 30
    plain_by_epoch = {int(r[0]): r for r in rows_plain}
    # Tune's progress file for the restarted trial holds either the whole history (epoch 5 twice: before
    # the failure and redone from the epoch-4 checkpoint) or only the resumed run from epoch 5; Ray does
    # both. Every row, at every epoch, equals the uninterrupted trial's exactly (V, D and LR).
    epochs_failed = [int(r[0]) for r in rows_failed]
    assert set(range(5, stop + 1)) <= set(epochs_failed) and epochs_failed[-1] == stop
    assert all(row == plain_by_epoch[int(row[0])] for row in rows_failed)
    assert failed.metrics[STOP_REASON] == plain.metrics[STOP_REASON] == "converged"
    assert failed.metrics[STOP_EPOCH] == stop


@pytest.mark.slow
def test_tuner_restore_continues_and_the_restored_scheduler_still_decides(tmp_path):
    """An experiment interrupted by a trial error is restored with Tuner.restore(resume_errored=True):
    the trial resumes from its checkpoint and the scheduler (as pickled at construction) stops it."""
    marker = str(tmp_path / "crashed")
    scheduler = NeVeScheduler(grace_period=2, max_t=25)
    tuner = tune.Tuner(
        digits_trainable,
        param_space={"lr": tune.grid_search([1e4, 0.05]), "fail_at": 3, "fail_marker": marker},
        tune_config=tune.TuneConfig(scheduler=scheduler),
        run_config=_run_config(tmp_path, "restore"),  # max_failures=0: the crash ends the first run
    )
    first = tuner.fit()
    assert first.num_errors == 1 and os.path.exists(marker)
    crashed = next(r for r in first if r.error is not None)
    assert crashed.config["lr"] == 0.05 and crashed.metrics["training_iteration"] == 3
    diverged = next(r for r in first if r.error is None)
    assert diverged.metrics[STOP_REASON] == "diverged" and diverged.metrics[STOP_EPOCH] == 1
    assert {info.reason.value for info in scheduler.stopped_trials.values()} == {"diverged"}

    path = str(tmp_path / "restore")
    assert tune.Tuner.can_restore(path)
    restored = tune.Tuner.restore(path, digits_trainable, resume_errored=True)
    results = restored.fit()
    assert results.num_errors == 0
    by_lr = {r.config["lr"]: r for r in results}
    # The trial stopped before the interruption keeps its record (persisted in the experiment state).
    assert StopInfo.from_metrics(by_lr[1e4].metrics).reason.value == "diverged"
    resumed = by_lr[0.05]
    assert resumed.metrics["start_epoch"] == 3  # continued from its epoch-3 checkpoint
    # Tune appends the resumed run (epochs 4..) to the progress of epochs 1-3.
    history = sorted({**dict(_history(crashed)), **dict(_history(resumed))}.items())
    assert [e for e, _ in history] == list(range(1, len(history) + 1))
    assert resumed.metrics[STOP_REASON] == "converged"
    assert resumed.metrics[STOP_EPOCH] == _first_stop_epoch(history, grace=2, max_t=25) < 25
    # The scheduler object of the first run did not see the restored run: the decision came from the
    # pickled copy, deciding from each result alone.
    assert len(scheduler.stopped_trials) == 1


# ----------------------------------------------------------------------------------- composition
@pytest.mark.slow
def test_optuna_search_with_max_concurrent_trials_and_max_t(tmp_path):
    from ray.tune.search.optuna import OptunaSearch

    searcher = OptunaSearch(seed=0)
    scheduler = NeVeScheduler(max_t=5)
    tuner = tune.Tuner(
        digits_trainable,
        param_space={"lr": tune.loguniform(0.01, 0.1)},
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            metric="train_loss",
            mode="min",
            num_samples=3,
            max_concurrent_trials=1,
        ),
        run_config=_run_config(tmp_path, "optuna"),
    )
    results = tuner.fit()
    assert results.num_errors == 0 and len(results) == 3
    assert (scheduler.metric, scheduler.mode) == ("train_loss", "min")  # from TuneConfig
    lrs = {r.config["lr"] for r in results}
    assert len(lrs) == 3 and all(0.01 <= lr <= 0.1 for lr in lrs)  # Optuna's suggestions
    for r in results:
        assert r.metrics[STOP_REASON] == "max_t" and r.metrics[STOP_EPOCH] == 5  # converging takes ~10
        assert scheduler.stop_info(r.metrics["trial_id"]).reason.value == "max_t"
    # max_concurrent_trials=1: the trials ran one after another.
    spans = sorted((r.metrics_dataframe["wall"].min(), r.metrics_dataframe["wall"].max()) for r in results)
    assert all(prev_end < next_start for (_, prev_end), (next_start, _) in itertools.pairwise(spans))
    # Optuna was told every trial's final objective.
    study = searcher._ot_study
    told = sorted(t.value for t in study.trials if t.state.name == "COMPLETE")
    assert told == pytest.approx(sorted(r.metrics["train_loss"] for r in results))


@pytest.mark.slow
def test_validation_based_asha_baseline_uses_the_same_helpers(tmp_path):
    """The ASHA arm: holds out validation data, reports val metrics with report_epoch(None, ...)."""
    from ray.tune.schedulers import ASHAScheduler

    asha = ASHAScheduler(metric="val_acc", mode="max", max_t=8, grace_period=2, reduction_factor=2)
    tuner = tune.Tuner(
        digits_trainable,
        # Two trials run at a time (2 CPUs): the good LRs set the rungs, then the slow ones are cut.
        param_space={"arm": "asha", "lr": tune.grid_search([0.05, 0.02, 3e-4, 1e-4])},
        tune_config=tune.TuneConfig(scheduler=asha),
        run_config=_run_config(tmp_path, "asha"),
    )
    results = tuner.fit()
    assert results.num_errors == 0
    iters = {r.config["lr"]: r.metrics["training_iteration"] for r in results}
    assert iters[3e-4] == iters[1e-4] == 2  # ASHA cut the slow learners at the first rung
    assert max(iters[0.05], iters[0.02]) == 8  # (0.02 may lose the first rung to 0.05: both run at once)
    for r in results:
        assert not any(k.startswith("neve/") for k in r.metrics)
        assert r.metrics["on_cpu"] == 1.0
    best = results.get_best_result(metric="val_acc", mode="max")
    # The reported checkpoint restores the model that produced the reported validation accuracy.
    data = load_digits_splits(val_fraction=0.1)
    model = DigitsCNN(width=8)
    opt = torch.optim.SGD(model.parameters(), lr=best.config["lr"])  # built from the trial's config, as it was
    epoch = restore_from_checkpoint(model, opt, None, checkpoint=best.checkpoint, restore_rng=False)
    assert epoch == best.metrics["training_iteration"]
    val_loss, val_acc = _evaluate(model, data.x_val, data.y_val)
    assert val_acc == pytest.approx(best.metrics["val_acc"]) and val_acc > 0.8
    assert val_loss == pytest.approx(best.metrics["val_loss"], rel=1e-5)
    assert opt.param_groups[0]["lr"] == best.config["lr"]  # the optimizer state came back too


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_trials_measure_velocity_on_their_gpu(tmp_path):
    """Two trials share one GPU ({"gpu": 0.5}); each trains and measures velocity on cuda."""
    tuner = tune.Tuner(
        tune.with_resources(digits_trainable, {"cpu": 1, "gpu": 0.5}),
        param_space={"lr": tune.grid_search([0.05, 1e4])},
        tune_config=tune.TuneConfig(scheduler=NeVeScheduler()),
        run_config=_run_config(tmp_path, "gpu"),
    )
    results = tuner.fit()
    assert results.num_errors == 0
    by_lr = {r.config["lr"]: r for r in results}
    assert all(r.metrics["on_cpu"] == 0.0 for r in results)
    assert by_lr[0.05].metrics[STOP_REASON] == "converged" and by_lr[0.05].metrics[STOP_EPOCH] < 30
    assert by_lr[1e4].metrics[STOP_REASON] == "diverged"
