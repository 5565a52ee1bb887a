"""One trial of a study arm: the epoch loop shared by every backend (Ray Tune, Optuna).

Per epoch the trial trains on its training split, lets its arm's :class:`~neve_tune.studies.TrialPolicy`
act (NeVe measures and decides; a fixed LR schedule steps, its velocity only *monitored* for the plots),
evaluates on the validation split (arms that hold one out) and on the test split (reported, never used
for a decision), logs everything to its MLflow child run and reports to the backend.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor, nn

from neve_tune import NeVe
from neve_tune.mlflow import MlflowLink
from neve_tune.mlflow._plots import VelocityHistory

from ._arms import Arm, get_arm
from ._keys import (
    DIVERGED,
    EPOCH,
    EPOCH_TIME,
    LAYER_VELOCITY_PREFIX,
    LR,
    MAX_T,
    STOP_REASON,
    TEST_ACC,
    TEST_LOSS,
    TRAIN_ACC,
    TRAIN_LOSS,
    TRAIN_TSE,
    TRAIN_TSE_EMA,
    TSE_EMA_GAMMA,
    VAL_ACC,
    VAL_LOSS,
)
from ._policy import EpochDecision, TrialPolicy
from ._spec import Budget, DataRequest, StudyData, StudyDefinition

if TYPE_CHECKING:
    from neve_tune.mlflow import TrialLogger

_SEED_LOCK = threading.Lock()


def trial_seed(seed: int, config_id: int) -> int:
    """Seed of a configuration's weights and data order: the same in every arm."""
    return int(seed) * 100_003 + int(config_id)


@dataclass(frozen=True)
class TrialSpec:
    """What a trial needs besides its config; picklable, so it travels to Ray workers.

    ``study`` is a registry name (the worker imports the definition) or a :class:`StudyDefinition`;
    ``arm`` likewise an arm name (built-in arms) or an :class:`~neve_tune.studies.Arm`.
    """

    study: str | StudyDefinition
    arm: str | Arm
    budget: Budget
    seed: int = 0
    data_root: str | None = None
    num_workers: int = 0

    def definition(self) -> StudyDefinition:
        """The study definition (imported from the registry when ``study`` is a name)."""
        if isinstance(self.study, StudyDefinition):
            return self.study
        from ._registry import get_study

        return get_study(self.study)

    def arm_definition(self) -> Arm:
        """The arm (looked up in the registry when ``arm`` is a name; raises ``UnknownArmError``)."""
        return get_arm(self.arm)


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
    batches: Iterable[tuple[Tensor, ...]],
    device: torch.device,
    neve: NeVe | None = None,
) -> tuple[float, float]:
    """One epoch of SGD; the running mean loss and accuracy. With ``neve``: ``(x, y, index)`` batches, observed."""
    model.train()
    total, loss_sum, correct = 0, 0.0, 0
    for x, y, *index in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        out = model(x)
        loss = nn.functional.cross_entropy(out, y)
        loss.backward()
        optimizer.step()
        if neve is not None:
            neve.observe(out, index[0])
        loss_sum += float(loss.detach()) * len(y)
        correct += int((out.detach().argmax(1) == y).sum())
        total += len(y)
    return loss_sum / max(total, 1), correct / max(total, 1)


def training_speed(speed: tuple[float, float], train_loss: float) -> tuple[float, float]:
    """``(TSE, TSE-EMA)`` after one more epoch of mean training loss ``train_loss`` (see ``train/tse``)."""
    tse, ema = speed
    return tse + train_loss, TSE_EMA_GAMMA * ema + train_loss


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

    The trial ends by itself when its policy says so (NeVe: converged, stalled, collapsed or diverged),
    when the training loss is not finite (any arm: ``diverged``), or at the epoch cap (``max_t``). The
    backend may stop it earlier (ASHA) by raising from ``reporter.report``.

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
    arm = spec.arm_definition()
    hp = hyperparameters(config)
    _quiet_worker_logs()
    logger = _trial_logger(config, arm, hp, trial_id, fallback_dir)
    loop = _TrialLoop(spec, definition, arm, hp, reporter, device or torch.device("cpu"), logger, on_epoch)
    return loop.run()


def _trial_logger(
    config: Mapping[str, Any], arm: Arm, hp: Mapping[str, Any], trial_id: str | None, fallback_dir: str | None
) -> TrialLogger | None:
    link = MlflowLink.from_config(config)
    if link is None:
        return None
    from neve_tune.mlflow import TrialLogger

    return TrialLogger(
        link,
        run_name=f"{arm.name}-{int(hp.get('config_id', 0)):03d}",
        params=dict(hp),
        trial_id=trial_id,
        fallback_dir=fallback_dir,
    )


class _TrialLoop:
    """One trial between its epochs: what it trains, its arm's policy, its data order and plot history."""

    data: StudyData
    model: nn.Module
    optimizer: torch.optim.Optimizer
    generator: torch.Generator

    def __init__(
        self,
        spec: TrialSpec,
        definition: StudyDefinition,
        arm: Arm,
        hp: Mapping[str, Any],
        reporter: Reporter,
        device: torch.device,
        logger: TrialLogger | None,
        on_epoch: Callable[[int, dict[str, Any]], None] | None,
    ) -> None:
        self.spec, self.definition, self.arm, self.hp = spec, definition, arm, hp
        self.budget = spec.budget
        self.reporter, self.device, self.logger, self.on_epoch = reporter, device, logger, on_epoch
        self.outcome = TrialOutcome()
        self.history = VelocityHistory()
        self.speed = (0.0, 0.0)  # (TSE, TSE-EMA) of the epochs so far
        self.policy: TrialPolicy | None = None

    def run(self) -> TrialOutcome:
        try:
            start = self._setup()
            for epoch in range(start + 1, self.budget.max_epochs + 1):
                if self._epoch(epoch):
                    break
            return self.outcome
        except StopTrial as stop:
            if self.logger is not None:
                self._end_run(stop.reason, self.outcome.epochs)
            self.outcome.stop_reason = stop.reason
            raise stop.cause from None
        except SystemExit as exc:
            # Ray Tune stopping the trial (e.g. ASHA pruned it): the driver ends the run with the reason.
            if self.logger is not None and exc.code not in (None, 0):
                self.logger.end("KILLED", error=f"SystemExit({exc.code})")
            elif self.logger is not None:
                self.logger.detach()
            raise
        except BaseException as exc:
            if self.logger is not None:
                self.logger.__exit__(type(exc), exc, exc.__traceback__)
            raise
        finally:
            if self.policy is not None:
                self.policy.close()

    def _setup(self) -> int:
        """Build data, model, optimizer and policy; resume from a checkpoint. Returns the epochs already done."""
        spec, budget, definition, hp = self.spec, self.budget, self.definition, self.hp
        seed = trial_seed(spec.seed, int(hp.get("config_id", 0)))
        self.data = definition.load_data(
            DataRequest(
                val_fraction=self.arm.val_fraction(budget),
                seed=spec.seed,
                batch_size=budget.batch_size,
                data_root=spec.data_root,
                num_workers=spec.num_workers,
            )
        )
        with _SEED_LOCK:  # trials in threads of one process (Optuna backend) share the global RNG
            torch.manual_seed(seed)
            self.model = definition.build_model(hp).to(self.device)
        steps_per_epoch = max(1, math.ceil(self.data.num_train / budget.batch_size))
        self.optimizer = self.arm.policy.build_optimizer(
            self.model, hp, budget, steps_per_epoch, definition.build_optimizer
        )
        aux = definition.aux(budget.neve.aux_samples, spec.seed)  # the monitor moves it to the model's device
        self.policy = policy = self.arm.policy(self.model, self.optimizer, aux, budget)
        self.generator = torch.Generator().manual_seed(seed)
        extra: dict[str, Any] = {}
        start = self.reporter.restore(self.model, self.optimizer, policy.neve, extra)
        if start:
            policy.load_state_dict(extra)
            if "generator" in extra:
                self.generator.set_state(extra["generator"])
            if "speed" in extra:
                self.speed = tuple(extra["speed"])
            if "history" in extra:
                self.history = VelocityHistory(**extra["history"])
        return start

    def _epoch(self, epoch: int) -> bool:
        """Train, act, evaluate, log and report one epoch; True when it was the trial's last."""
        policy = self.policy
        assert policy is not None
        t0 = time.perf_counter()
        policy.before_train()
        indexed = getattr(self.data, "indexed_train_batches", None) if policy.neve is not None else None
        batches = indexed(self.generator) if indexed else self.data.train_batches(self.generator)  # (x, y, index)
        train_loss, train_acc = train_epoch(self.model, self.optimizer, batches, self.device, indexed and policy.neve)
        own_order = torch.Generator().manual_seed(self.generator.initial_seed() * 1_000 + epoch)  # not the trial's
        policy.before_eval(self.data.train_batches(own_order), self.device)
        metrics: dict[str, Any] = {EPOCH: epoch, TRAIN_LOSS: train_loss, TRAIN_ACC: train_acc}
        self.speed = training_speed(self.speed, train_loss)
        metrics[TRAIN_TSE], metrics[TRAIN_TSE_EMA] = self.speed
        decision = policy.after_epoch(train_loss)
        metrics.update(decision.reported)
        lr = float(self.optimizer.param_groups[0]["lr"])
        metrics[LR] = lr
        stop_reason = decision.stop_reason if math.isfinite(train_loss) else DIVERGED
        self._evaluate(metrics)
        metrics[EPOCH_TIME] = time.perf_counter() - t0
        self.history.append(
            epoch, decision.velocity, lr, lr_decayed=decision.lr_decayed, layer_velocity=decision.layer_velocity
        )
        if stop_reason is None and epoch >= self.budget.max_epochs:
            stop_reason = MAX_T
        final = stop_reason is not None
        self.outcome.epochs, self.outcome.final = epoch, {**metrics, **decision.logged}
        self._log(epoch, metrics, decision, stop_reason)
        if final:
            metrics[STOP_REASON] = stop_reason
            self.outcome.stop_reason = stop_reason
        if self.on_epoch is not None:
            self.on_epoch(epoch, {**metrics, **decision.logged})
        extra: dict[str, Any] = {}
        if self.reporter.needs_state(epoch):  # only when checkpointing: a monitor's state holds its snapshot
            extra = {
                "generator": self.generator.get_state(),
                "history": self.history.__dict__,
                "speed": list(self.speed),
                **policy.state_dict(),
            }
        self.reporter.report(
            metrics, neve=policy.neve, model=self.model, optimizer=self.optimizer, epoch=epoch, extra=extra, final=final
        )
        return final

    def _evaluate(self, metrics: dict[str, Any]) -> None:
        if self.data.num_val:
            metrics[VAL_LOSS], metrics[VAL_ACC] = evaluate(self.model, self.data.eval_batches("val"), self.device)
        metrics[TEST_LOSS], metrics[TEST_ACC] = evaluate(self.model, self.data.eval_batches("test"), self.device)

    def _log(self, epoch: int, metrics: dict[str, Any], decision: EpochDecision, stop_reason: str | None) -> None:
        if self.logger is None:
            return
        layer_metrics = {f"{LAYER_VELOCITY_PREFIX}{k}": v for k, v in decision.layer_velocity.items()}
        self.logger.log_metrics({**metrics, **decision.logged, **layer_metrics}, step=epoch)
        if stop_reason is not None:
            self._end_run(stop_reason, epoch)

    def _end_run(self, stop_reason: str, epoch: int) -> None:
        """Plots, stop tags and FINISHED, before the final report (a backend may end the worker right after)."""
        assert self.logger is not None
        self.logger.log_velocity_plots(
            self.history, stop_epoch=epoch, stop_reason=stop_reason, stop_threshold=self.budget.neve.stop_threshold
        )
        self.logger.end("FINISHED", stop_reason=stop_reason, stop_epoch=epoch)
