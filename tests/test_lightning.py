"""neve_tune.lightning.NeVeCallback in a real Lightning Trainer on CPU (digits), with Ray Tune and Optuna."""

from __future__ import annotations

import copy
import csv
import math
import pickle
from pathlib import Path
from typing import Any

import pytest

pl = pytest.importorskip("lightning.pytorch")

import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from neve_tune import StopReason, keys, noise_aux  # noqa: E402
from neve_tune.lightning import JointOptimizer, NeVeCallback  # noqa: E402
from neve_tune.studies.builtin.digits import load_digits_splits  # noqa: E402
from tests.readme import readme_example  # noqa: E402

_DIGITS = load_digits_splits()


def _loader(batch_size: int = 64) -> DataLoader[Any]:
    return DataLoader(TensorDataset(_DIGITS.x_train, _DIGITS.y_train), batch_size=batch_size, shuffle=False)


def _aux() -> torch.Tensor:
    return noise_aux((1, 8, 8), n=100, seed=0)


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 10),
    )  # fmt: skip


class Digits(pl.LightningModule):
    """The README's digits CNN; records every batch's loss to check the epoch mean NeVe was given."""

    def __init__(self, lr: float = 0.1, scheduler: str | None = None) -> None:
        super().__init__()
        self.lr = lr
        self.scheduler = scheduler
        self.net = _net()
        self.batch_losses: dict[int, list[float]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.batch_losses.setdefault(self.current_epoch, []).append(loss.item())
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        if self.scheduler == "lambda":  # recomputes lr = base_lr * lambda at every step: undoes a plain decay
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        return opt


def _trainer(tmp_path: Path | None = None, **kwargs: Any) -> Any:
    options: dict[str, Any] = dict(
        max_epochs=60, logger=False, enable_progress_bar=False, enable_checkpointing=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    options.update(kwargs)
    return pl.Trainer(**options)


def _velocities(cb: NeVeCallback) -> list[float]:
    return [h[keys.MODEL_VELOCITY] for h in cb.history]


def test_healthy_run_stops_converged_decays_the_lr_and_logs_the_epoch_mean_loss(tmp_path: Path) -> None:
    pl.seed_everything(0, verbose=False)
    module = Digits(lr=0.1)
    cb = NeVeCallback(_aux(), patience=2)
    trainer = _trainer(logger=CSVLogger(tmp_path, name="run"), callbacks=[cb])
    trainer.fit(module, _loader())

    assert cb.stop_reason is StopReason.CONVERGED
    epochs = len(cb.history)
    assert 8 <= epochs < 60 and trainer.current_epoch == epochs  # it ended the fit itself, long before the cap
    decays = int(cb.history[-1][keys.NUM_DECAYS])
    assert decays >= 1
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(0.1 * 0.5**decays) and cb.history[-1][keys.LR] == pytest.approx(lr)
    assert cb.neve is not None and cb.neve.optimizer is trainer.optimizers[0]
    # The loss NeVe got is the mean of the epoch's batch losses, with no loss_key configured.
    for h in cb.history:
        batch = module.batch_losses[int(h[keys.EPOCH]) - 1]
        assert h[keys.TRAIN_LOSS] == pytest.approx(sum(batch) / len(batch), rel=1e-6)
    # ...and every neve/* metric reached the logger, one row per epoch.
    trainer.loggers[0].save()
    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        rows = [r for r in csv.DictReader(f) if r.get(keys.MODEL_VELOCITY)]
    assert len(rows) == epochs
    assert [float(r[keys.TRAIN_LOSS]) for r in rows] == pytest.approx([h[keys.TRAIN_LOSS] for h in cb.history])
    assert [float(r[keys.MODEL_VELOCITY]) for r in rows] == pytest.approx(_velocities(cb), rel=1e-5)
    assert float(rows[-1][keys.CONVERGED]) == 1.0 and float(rows[0][keys.CONVERGED]) == 0.0
    assert float(trainer.callback_metrics[keys.CONVERGED]) == 1.0


class LogsItsLoss(Digits):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss


def test_loss_key_reads_the_epoch_value_lightning_aggregated() -> None:
    pl.seed_everything(0, verbose=False)
    module = LogsItsLoss()
    cb = NeVeCallback(_aux(), loss_key="train_loss")
    _trainer(max_epochs=3, callbacks=[cb]).fit(module, _loader())
    sizes = [len(y) for y in _DIGITS.y_train.split(64)]  # Lightning weights the epoch mean by batch size
    for h in cb.history:
        batch = module.batch_losses[int(h[keys.EPOCH]) - 1]
        weighted = sum(loss * n for loss, n in zip(batch, sizes, strict=True)) / sum(sizes)
        assert h[keys.TRAIN_LOSS] == pytest.approx(weighted, rel=1e-5)
        assert h[keys.TRAIN_LOSS] != pytest.approx(sum(batch) / len(batch), rel=1e-7)


def test_learning_rate_far_too_small_ends_stalled() -> None:
    pl.seed_everything(0, verbose=False)
    cb = NeVeCallback(_aux())
    trainer = _trainer(callbacks=[cb])
    trainer.fit(Digits(lr=1e-5), _loader())
    assert cb.stop_reason is StopReason.STALLED
    assert trainer.current_epoch == len(cb.history) < 15
    assert cb.history[-1][keys.STALLED] == 1.0 and cb.history[-1][keys.CONVERGED] == 0.0
    assert cb.history[-1][keys.TRAIN_LOSS] > 0.9 * math.log(10)  # it never learned


@pytest.mark.parametrize("when", ["train_epoch_end", "validation_end"])
def test_resumed_fit_continues_with_identical_velocities(tmp_path: Path, when: str) -> None:
    """A checkpoint at epoch 6 (at the epoch's end, or on validation end: before NeVe's step) resumes exactly."""

    def run(path: Path, ckpt: str | None = None, epochs: int = 13) -> NeVeCallback:
        pl.seed_everything(0, verbose=False)
        cb = NeVeCallback(_aux(), patience=0)
        saver = ModelCheckpoint(
            dirpath=path, save_top_k=-1, every_n_epochs=1, save_on_train_epoch_end=when == "train_epoch_end"
        )
        val = {"val_dataloaders": _loader(256)} if when == "validation_end" else {}
        _trainer(max_epochs=epochs, enable_checkpointing=True, callbacks=[cb, saver]).fit(
            Digits(lr=0.1), _loader(), ckpt_path=ckpt, **val
        )
        return cb

    full = run(tmp_path / "full")
    assert len(full.history) == 13 and full.stop_reason is None
    assert sum(h[keys.LR_DECAYED] for h in full.history[6:]) >= 2  # the resumed part decays too
    ckpt = next((tmp_path / "full").glob("epoch=5-*.ckpt"))
    resumed = run(tmp_path / "resumed", ckpt=str(ckpt))
    assert _velocities(resumed) == _velocities(full)  # exactly, epoch by epoch
    if when == "train_epoch_end":  # the same callback object, used again for a resumed fit, resumes too
        pl.seed_everything(0, verbose=False)
        _trainer(max_epochs=13, callbacks=[full]).fit(Digits(lr=0.1), _loader(), ckpt_path=str(ckpt))
        assert _velocities(full) == _velocities(resumed)
    assert [h[keys.LR] for h in resumed.history] == [h[keys.LR] for h in full.history]
    assert [h[keys.TRAIN_LOSS] for h in resumed.history] == pytest.approx([h[keys.TRAIN_LOSS] for h in full.history])


def test_bf16_mixed_gives_finite_velocities_close_to_fp32() -> None:
    runs = {}
    for precision in ("32-true", "bf16-mixed"):
        pl.seed_everything(0, verbose=False)
        cb = NeVeCallback(_aux())
        _trainer(max_epochs=5, precision=precision, callbacks=[cb]).fit(Digits(lr=0.1), _loader())
        runs[precision] = _velocities(cb)
    assert len(runs["bf16-mixed"]) == 5 and all(math.isfinite(v) and v > 0 for v in runs["bf16-mixed"])
    assert runs["bf16-mixed"] == pytest.approx(runs["32-true"], rel=0.05)
    assert runs["bf16-mixed"] != runs["32-true"]  # it really trained in bf16


class TwoOptimizers(pl.LightningModule):
    """Manual optimisation with one optimizer per half of the network (as a GAN has one per network)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        net = _net()
        self.features, self.head = net[:5], net[5:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        opt_f, opt_h = self.optimizers()  # type: ignore[misc]
        opt_f.zero_grad()
        opt_h.zero_grad()
        loss = nn.functional.cross_entropy(self(x), y)
        self.manual_backward(loss)
        opt_f.step()
        opt_h.step()
        return loss.detach()

    def configure_optimizers(self) -> Any:
        return [
            torch.optim.SGD(self.features.parameters(), lr=0.1, momentum=0.9),
            torch.optim.SGD(self.head.parameters(), lr=0.05, momentum=0.9),
        ]


def test_two_optimizers_are_decayed_together() -> None:
    pl.seed_everything(0, verbose=False)
    cb = NeVeCallback(_aux(), patience=0, stop_threshold=2e-4)  # a low threshold: it trains on to a plateau
    trainer = _trainer(max_epochs=14, callbacks=[cb])
    trainer.fit(TwoOptimizers(), _loader())
    assert cb.neve is not None and isinstance(cb.neve.optimizer, JointOptimizer)
    last = cb.history[-1]
    decays = int(last[keys.NUM_DECAYS])
    assert decays >= 1
    lrs = [opt.param_groups[0]["lr"] for opt in trainer.optimizers]
    assert lrs == pytest.approx([0.1 * 0.5**decays, 0.05 * 0.5**decays])
    assert [last[keys.lr_key(0)], last[keys.lr_key(1)]] == pytest.approx(lrs)
    assert keys.TRAIN_LOSS in last  # manual optimisation: the loss training_step returned


def test_a_scheduler_that_recomputes_from_base_lrs_keeps_the_decay() -> None:
    pl.seed_everything(0, verbose=False)
    cb = NeVeCallback(_aux(), patience=0)
    trainer = _trainer(max_epochs=14, callbacks=[cb])
    trainer.fit(Digits(lr=0.1, scheduler="lambda"), _loader())
    decays = int(cb.history[-1][keys.NUM_DECAYS])
    assert decays >= 1
    sched = trainer.lr_scheduler_configs[0].scheduler
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**decays)
    assert sched.base_lrs == pytest.approx([0.1 * 0.5**decays])  # LambdaLR stepped every batch since


def test_copies_measure_like_the_original() -> None:
    cb = NeVeCallback(_aux(), patience=3)
    assert pickle.loads(pickle.dumps(cb)).neve_options == {"patience": 3}
    assert copy.deepcopy(cb).neve is None
    pl.seed_everything(0, verbose=False)
    _trainer(max_epochs=3).fit(Digits(lr=0.1), _loader())  # a fit without the callback: nothing attached
    _trainer(max_epochs=3, callbacks=[cb]).fit(Digits(lr=0.1), _loader())
    clones = [pickle.loads(pickle.dumps(cb)), copy.deepcopy(cb)]
    assert cb.neve is not None
    weight = cb.neve.monitor.model.net[0].weight  # type: ignore[union-attr, index]
    for clone in clones:
        assert clone.history == cb.history and len(cb.history) == 3
        assert clone.neve is not None and clone.neve is not cb.neve
        assert clone.neve.monitor.model.net[0].weight is not weight  # type: ignore[union-attr, index]
    # each copy holds its own model; the next measurement (weights unchanged) is the same on all three
    velocities = {c.neve.monitor.measure().model_velocity for c in [cb, *clones]}  # type: ignore[union-attr]
    assert len(velocities) == 1 and 0 < velocities.pop() < 1


def test_clear_errors() -> None:
    with pytest.raises(TypeError, match="unknown NeVe options"):
        NeVeCallback(_aux(), patiense=2)
    cb = NeVeCallback(_aux(), loss_key="train_loss")
    with pytest.raises(KeyError, match="self.log\\('train_loss'"):
        _trainer(max_epochs=1, callbacks=[cb]).fit(Digits(), _loader())

    class NoForward(Digits):
        forward = pl.LightningModule.forward  # type: ignore[assignment]

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

    with pytest.raises(TypeError, match="pass module="):
        _trainer(max_epochs=1, callbacks=[NeVeCallback(_aux())]).fit(NoForward(), _loader())
    pytest.importorskip("ray")
    from ray.tune.integration.pytorch_lightning import TuneReportCheckpointCallback

    late = TuneReportCheckpointCallback(on="train_epoch_end", save_checkpoints=False)
    with pytest.raises(ValueError, match="Put NeVeCallback first"):
        _trainer(max_epochs=1, callbacks=[late, NeVeCallback(_aux())]).fit(Digits(), _loader())
    with pytest.warns(UserWarning, match="on='train_epoch_end'"), pytest.raises(ValueError, match="Put NeVeCallback"):
        _trainer(max_epochs=1, callbacks=[TuneReportCheckpointCallback(), late, NeVeCallback(_aux())]).fit(
            Digits(), _loader()
        )
    measured = NeVeCallback(_aux(), module="net")
    _trainer(max_epochs=1, callbacks=[measured]).fit(NoForward(), _loader())
    assert measured.neve is not None and measured.neve.monitor.model is not None
    assert len(measured.history) == 1


def test_readme_example_runs() -> None:
    namespace: dict[str, Any] = {}
    exec(compile(readme_example("lightning"), "README.md:lightning", "exec"), namespace)
    cb = namespace["neve"]
    assert cb.stop_reason is StopReason.CONVERGED
    assert len(cb.history) < namespace["trainer"].max_epochs
    assert namespace["last"][keys.NUM_DECAYS] >= 1 and namespace["last"][keys.LR] < 0.1


def test_compact_state_none_rebaselines_on_resume(tmp_path: Path) -> None:
    def run(ckpt: str | None, epochs: int) -> NeVeCallback:
        pl.seed_everything(0, verbose=False)
        cb = NeVeCallback(_aux(), state_snapshot="none")
        saver = ModelCheckpoint(
            dirpath=tmp_path / str(epochs), save_top_k=-1, every_n_epochs=1, save_on_train_epoch_end=True
        )
        _trainer(max_epochs=epochs, enable_checkpointing=True, callbacks=[cb, saver]).fit(
            Digits(), _loader(), ckpt_path=ckpt
        )
        return cb

    first = run(None, 3)
    ckpt = next((tmp_path / "3").glob("epoch=2-*.ckpt"))
    resumed = run(str(ckpt), 5)
    assert [h[keys.MODEL_VELOCITY] for h in resumed.history[:3]] == _velocities(first)
    assert keys.MODEL_VELOCITY not in resumed.history[3]  # the re-baseline epoch
    assert math.isfinite(resumed.history[4][keys.MODEL_VELOCITY]) and resumed.history[4][keys.EPOCH] == 5


def _ray_trainable(config: dict[str, Any]) -> None:
    """A Lightning trainable reporting through Ray's own callback; everything inside, so Ray ships it by value."""
    import lightning.pytorch as lp
    import torch as t
    from ray.tune.integration.pytorch_lightning import TuneReportCheckpointCallback
    from torch import nn as tnn
    from torch.utils.data import DataLoader as Loader
    from torch.utils.data import TensorDataset as Data

    from neve_tune import noise_aux as aux
    from neve_tune.lightning import NeVeCallback as Callback
    from neve_tune.studies.builtin.digits import load_digits_splits as splits

    class Module(lp.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = tnn.Sequential(
                tnn.Conv2d(1, 16, 3, padding=1), tnn.BatchNorm2d(16), tnn.ReLU(), tnn.MaxPool2d(2),
                tnn.Flatten(), tnn.Linear(16 * 4 * 4, 10),
            )  # fmt: skip

        def forward(self, x: t.Tensor) -> t.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> t.Tensor:
            return tnn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self) -> Any:
            return t.optim.SGD(self.parameters(), lr=config["lr"], momentum=0.9)

    t.set_num_threads(1)
    lp.seed_everything(0, verbose=False)
    data = splits()
    report = TuneReportCheckpointCallback(on="train_epoch_end", save_checkpoints=False)
    trainer = lp.Trainer(
        max_epochs=40, callbacks=[Callback(aux((1, 8, 8), n=100, seed=0)), report], logger=False,
        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(Module(), Loader(Data(data.x_train, data.y_train), batch_size=64))


@pytest.mark.slow
def test_ray_tune_stops_lightning_trials_on_their_neve_reports(ray_session: Any, tmp_path: Path) -> None:
    from ray import tune

    from neve_tune.ray import NeVeScheduler

    tuner = tune.Tuner(
        _ray_trainable,
        param_space={"lr": tune.grid_search([0.1, 1e-5])},
        tune_config=tune.TuneConfig(scheduler=NeVeScheduler(grace_period=3, max_t=40)),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="lightning", verbose=0),
    )
    results = {r.config["lr"]: r.metrics for r in tuner.fit()}
    healthy, tiny = results[0.1], results[1e-5]
    assert healthy[keys.STOP_REASON] == "converged" and 8 <= healthy[keys.STOP_EPOCH] < 40
    assert healthy[keys.CONVERGED] == 1.0 and healthy["training_iteration"] == healthy[keys.STOP_EPOCH]
    assert tiny[keys.STOP_REASON] == "stalled" and tiny[keys.STOP_EPOCH] < 15


def test_optuna_trials_complete_when_converged_and_are_pruned_when_stalled() -> None:
    optuna = pytest.importorskip("optuna")
    from neve_tune.optuna import NeVePruner

    def objective(trial: Any) -> float:
        pl.seed_everything(0, verbose=False)
        cb = NeVeCallback(_aux(), optuna_trial=trial)
        trainer = _trainer(max_epochs=40, callbacks=[cb])
        trainer.fit(Digits(lr=trial.suggest_float("lr", 1e-6, 1.0, log=True)), _loader())
        assert cb.stop_reason is StopReason.CONVERGED and trainer.current_epoch < 40
        return cb.history[-1][keys.TRAIN_LOSS]

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize", pruner=NeVePruner())
    study.enqueue_trial({"lr": 0.1})
    study.enqueue_trial({"lr": 1e-5})
    study.optimize(objective, n_trials=2)
    healthy, tiny = study.trials
    assert healthy.state == optuna.trial.TrialState.COMPLETE and study.best_trial.number == 0
    assert healthy.user_attrs["neve_stop_reason"] == "converged"
    assert healthy.user_attrs["neve_stop_epoch"] == len(healthy.user_attrs["neve_history"]) < 40
    assert healthy.value is not None and healthy.value < 0.1  # the objective returned the final loss
    assert tiny.state == optuna.trial.TrialState.PRUNED and tiny.user_attrs["neve_stop_reason"] == "stalled"
    trial = study.ask()
    assert copy.deepcopy(NeVeCallback(_aux(), optuna_trial=trial))._optuna_trial is trial  # reports to the same trial
