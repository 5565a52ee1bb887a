"""One trial of a study arm: the epoch loop shared by every backend (Ray Tune, Optuna).

Per epoch the trial trains on its training split, lets NeVe measure and decide (``neve`` arm) or steps a
fixed LR schedule (``asha``/``fifo`` arms, whose velocity is only *monitored* for the plots), evaluates on
the validation split (baselines only) and on the test split (reported, never used for a decision), logs
everything to its MLflow child run and reports to the backend.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from neve_tune import NeVe, VelocityMonitor, noise_aux
from neve_tune.mlflow._plots import VelocityHistory
from neve_tune.mlflow._tracker import MlflowLink

from ._spec import Budget, DataRequest, StudyDefinition

ARMS = ("neve", "asha", "fifo")

#: Result/metric keys every arm reports.
EPOCH = "epoch"
TRAIN_LOSS, TRAIN_ACC = "train/loss", "train/acc"
VAL_LOSS, VAL_ACC = "val/loss", "val/acc"
TEST_LOSS, TEST_ACC = "test/loss", "test/acc"
LR = "lr"
EPOCH_TIME = "time/epoch_s"
#: Velocity measured but not acted on (baseline arms).
MONITOR_VELOCITY, MONITOR_CHANGE = "monitor/model_velocity", "monitor/velocity_change"
#: Only in a trial's final result: why it ended by itself ("converged", "diverged", "max_t").
STOP_REASON = "stop_reason"


_SEED_LOCK = threading.Lock()


def trial_seed(seed: int, config_id: int) -> int:
    """Seed of a configuration's weights and data order: the same in every arm."""
    return int(seed) * 100_003 + int(config_id)


@dataclass(frozen=True)
class TrialSpec:
    """What a trial needs besides its config; picklable, so it travels to Ray workers.

    ``study`` is a registry name (the worker imports the definition) or a :class:`StudyDefinition`.
    """

    study: str | StudyDefinition
    arm: str
    budget: Budget
    seed: int = 0
    data_root: str | None = None
    num_workers: int = 0

    def definition(self) -> StudyDefinition:
        if isinstance(self.study, StudyDefinition):
            return self.study
        from ._registry import get_study

        return get_study(self.study)


class StopTrial(Exception):
    """Raised by a :class:`Reporter` when the backend stops the trial (e.g. Optuna pruned it).

    ``run_trial`` ends the MLflow run FINISHED with ``reason`` as its stop reason, then raises ``cause``
    (the backend's own signal, such as ``optuna.TrialPruned``).
    """

    def __init__(self, reason: str, cause: BaseException) -> None:
        super().__init__(reason)
        self.reason = reason
        self.cause = cause


@dataclass
class TrialOutcome:
    """How a trial ended, as the trial itself saw it."""

    epochs: int = 0
    stop_reason: str | None = None
    final: dict[str, float] = field(default_factory=dict)


class Reporter(Protocol):
    """The backend side of a trial: report one epoch (may stop the trial by raising) and resume."""

    def needs_state(self, epoch: int) -> bool:
        """Whether this epoch's report saves a checkpoint (then ``extra`` carries the loop's state)."""
        ...

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer, neve: NeVe | None, extra: dict) -> int: ...

    def report(
        self,
        metrics: dict[str, Any],
        *,
        neve: NeVe | None,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        epoch: int,
        extra: dict,
        final: bool,
    ) -> None: ...


def evaluate(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], device: torch.device) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over ``batches`` (eval mode, no grad); NaN, NaN when empty."""
    was_training = model.training
    model.eval()
    total, loss_sum, correct = 0, 0.0, 0
    with torch.no_grad():
        for x, y in batches:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            out = model(x)
            loss_sum += float(nn.functional.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(1) == y).sum())
            total += len(y)
    model.train(was_training)
    if total == 0:
        return math.nan, math.nan
    return loss_sum / total, correct / total


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[tuple[Tensor, Tensor]],
    device: torch.device,
) -> tuple[float, float]:
    """One epoch of SGD; returns the running mean loss and accuracy over the epoch's minibatches."""
    model.train()
    total, loss_sum, correct = 0, 0.0, 0
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        out = model(x)
        loss = nn.functional.cross_entropy(out, y)
        loss.backward()
        optimizer.step()
        loss_sum += float(loss.detach()) * len(y)
        correct += int((out.detach().argmax(1) == y).sum())
        total += len(y)
    return loss_sum / max(total, 1), correct / max(total, 1)


def _baseline_schedule(budget: Budget, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    if budget.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=budget.max_epochs)
    milestones = [max(1, budget.max_epochs // 2), max(1, (3 * budget.max_epochs) // 4)]
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=sorted(set(milestones)), gamma=0.1)


def hyperparameters(config: Mapping[str, Any]) -> dict[str, Any]:
    """The trial config without the MLflow link and private keys."""
    return {k: v for k, v in config.items() if k != MlflowLink.CONFIG_KEY and not str(k).startswith("_")}


def _quiet_worker_logs() -> None:
    for name in ("mlflow", "alembic", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*Ignoring the default.*")


def run_trial(
    spec: TrialSpec,
    config: Mapping[str, Any],
    reporter: Reporter,
    *,
    device: torch.device | None = None,
    trial_id: str | None = None,
    fallback_dir: str | None = None,
    on_epoch: Callable[[int, dict[str, Any]], None] | None = None,
) -> TrialOutcome:
    """Train one configuration under one arm's protocol (see the module docstring) and report each epoch.

    The trial ends by itself when NeVe says it converged or diverged (``neve`` arm), when the training
    loss is not finite (any arm: ``diverged``), or at the epoch cap (``max_t``). The backend may stop it
    earlier (ASHA) by raising from ``reporter.report``.

    NaN policy: a non-finite training loss ends the trial as ``diverged`` in every arm (a NaN velocity does
    in the NeVe arm, through NeVe); NaN metrics are reported and logged as they are.

    State: with ``budget.checkpoint_every > 0`` (Ray backend) the model, optimizer, NeVe or LR-schedule,
    velocity monitor, data-order generator and plot history are checkpointed, and a restarted trial
    resumes from them with identical numbers.

    The MLflow child run (when ``config`` holds a link) gets the config as params, every epoch's metrics
    with ``step=epoch`` and, when the trial ends by itself, its stop tags and velocity plots, *before* the
    final report (a backend may tear the worker down right after it). An exception ends the run FAILED.
    """
    definition = spec.definition()
    budget = spec.budget
    arm = spec.arm
    if arm not in ARMS:
        raise ValueError(f"Unknown arm {arm!r}; the arms are {', '.join(ARMS)}.")
    hp = hyperparameters(config)
    device = device or torch.device("cpu")
    _quiet_worker_logs()

    logger = None
    link = MlflowLink.from_config(config)
    if link is not None:
        from neve_tune.mlflow import TrialLogger

        logger = TrialLogger(
            link,
            run_name=f"{arm}-{int(hp.get('config_id', 0)):03d}",
            params=hp,
            trial_id=trial_id,
            fallback_dir=fallback_dir,
        )

    outcome = TrialOutcome()
    neve: NeVe | None = None
    monitor: VelocityMonitor | None = None
    history = VelocityHistory()
    try:
        seed = trial_seed(spec.seed, int(hp.get("config_id", 0)))
        data = definition.load_data(
            DataRequest(
                val_fraction=0.0 if arm == "neve" else budget.val_fraction,
                seed=spec.seed,
                batch_size=budget.batch_size,
                data_root=spec.data_root,
                num_workers=spec.num_workers,
            )
        )
        with _SEED_LOCK:  # trials in threads of one process (Optuna backend) share the global RNG
            torch.manual_seed(seed)
            model = definition.build_model(hp).to(device)
        optimizer = torch.optim.SGD(
            model.parameters(),
            lr=float(hp["lr"]),
            momentum=budget.momentum,
            weight_decay=float(hp.get("weight_decay", 0)),
        )
        aux = noise_aux(definition.input_shape, n=budget.neve.aux_samples, seed=spec.seed).to(device)
        schedule = None
        if arm == "neve":
            s = budget.neve
            neve = NeVe(
                model, optimizer, aux, momentum=s.momentum, factor=s.factor, patience=s.patience,
                stop_threshold=s.stop_threshold,
            )  # fmt: skip
        else:
            schedule = _baseline_schedule(budget, optimizer)
            if budget.monitor_baselines:
                monitor = VelocityMonitor(model, aux, momentum=budget.neve.momentum)
                monitor.measure()  # baseline snapshot
        generator = torch.Generator().manual_seed(seed)
        extra: dict[str, Any] = {}
        start = reporter.restore(model, optimizer, neve, extra)
        if start:
            if schedule is not None and "schedule" in extra:
                schedule.load_state_dict(extra["schedule"])
            if monitor is not None and "monitor" in extra:
                monitor.load_state_dict(extra["monitor"])
            if "generator" in extra:
                generator.set_state(extra["generator"])
            if "history" in extra:
                history = VelocityHistory(**extra["history"])

        for epoch in range(start + 1, budget.max_epochs + 1):
            t0 = time.perf_counter()
            train_loss, train_acc = train_epoch(model, optimizer, data.train_batches(generator), device)
            metrics: dict[str, Any] = {EPOCH: epoch, TRAIN_LOSS: train_loss, TRAIN_ACC: train_acc}
            neve_metrics: dict[str, float] = {}
            stop_reason: str | None = None
            if neve is not None:
                step = neve.step()
                neve_metrics = neve.metrics()
                velocity, layer_velocity, decayed = step.model_velocity, step.layer_velocity, step.lr_decayed
                if step.stop_reason is not None:
                    stop_reason = str(step.stop_reason)
            else:
                velocity, layer_velocity, decayed = None, {}, False
                if monitor is not None:
                    m = monitor.measure()
                    if m is not None:
                        velocity, layer_velocity = m.model_velocity, m.layer_velocity
                        metrics[MONITOR_VELOCITY] = m.model_velocity
                        if m.velocity_change is not None:
                            metrics[MONITOR_CHANGE] = m.velocity_change
                assert schedule is not None
                schedule.step()
            lr = float(optimizer.param_groups[0]["lr"])
            metrics[LR] = lr
            if not math.isfinite(train_loss):
                stop_reason = "diverged"
            if data.num_val:
                metrics[VAL_LOSS], metrics[VAL_ACC] = evaluate(model, data.eval_batches("val"), device)
            metrics[TEST_LOSS], metrics[TEST_ACC] = evaluate(model, data.eval_batches("test"), device)
            metrics[EPOCH_TIME] = time.perf_counter() - t0
            history.append(epoch, velocity, lr, lr_decayed=decayed, layer_velocity=layer_velocity)
            if stop_reason is None and epoch >= budget.max_epochs:
                stop_reason = "max_t"
            final = stop_reason is not None
            outcome.epochs, outcome.final = epoch, {**metrics, **neve_metrics}
            if logger is not None:
                layer_metrics = {f"layer_velocity/{k}": v for k, v in layer_velocity.items()}
                logger.log_metrics({**metrics, **neve_metrics, **layer_metrics}, step=epoch)
                if final:
                    logger.log_velocity_plots(
                        history, stop_epoch=epoch, stop_reason=stop_reason, stop_threshold=budget.neve.stop_threshold
                    )
                    logger.end("FINISHED", stop_reason=stop_reason, stop_epoch=epoch)
            if final:
                metrics[STOP_REASON] = stop_reason
                outcome.stop_reason = stop_reason
            if on_epoch is not None:
                on_epoch(epoch, {**metrics, **neve_metrics})
            extra = {}
            if reporter.needs_state(epoch):  # only when checkpointing: a monitor's state holds its snapshot
                extra = {"generator": generator.get_state(), "history": history.__dict__}
                if schedule is not None:
                    extra["schedule"] = schedule.state_dict()
                if monitor is not None:
                    extra["monitor"] = monitor.state_dict()
            reporter.report(metrics, neve=neve, model=model, optimizer=optimizer, epoch=epoch, extra=extra, final=final)
            if final:
                break
        return outcome
    except StopTrial as stop:
        if logger is not None:
            logger.log_velocity_plots(
                history, stop_epoch=outcome.epochs, stop_reason=stop.reason, stop_threshold=budget.neve.stop_threshold
            )
            logger.end("FINISHED", stop_reason=stop.reason, stop_epoch=outcome.epochs)
        outcome.stop_reason = stop.reason
        raise stop.cause from None
    except SystemExit as exc:
        # Ray Tune stopping the trial (e.g. ASHA pruned it): the driver ends the run with the reason.
        if logger is not None and exc.code not in (None, 0):
            logger.end("KILLED", error=f"SystemExit({exc.code})")
        elif logger is not None:
            logger.detach()
        raise
    except BaseException as exc:
        if logger is not None:
            logger.__exit__(type(exc), exc, exc.__traceback__)
        raise
    finally:
        if neve is not None:
            neve.close()
        if monitor is not None:
            monitor.close()
