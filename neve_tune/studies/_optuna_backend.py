"""The Optuna backend of the study runner: one Optuna study per arm, the same configurations enqueued.

Pruners: ``neve`` -> :class:`neve_tune.optuna.NeVePruner` (converged trials COMPLETE), ``asha`` ->
``SuccessiveHalvingPruner`` on validation accuracy (Optuna's asynchronous successive halving), ``fifo`` ->
``NopPruner``. Trials run in threads of this process (``n_jobs``), with ``study.ask``/``study.tell``.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import optuna
import torch

from ._collect import Collector
from ._spec import Budget, Choice, LogUniform, Uniform
from ._trial import TRAIN_LOSS, VAL_ACC, StopTrial, TrialSpec, run_trial

FAIL = optuna.trial.TrialState.FAIL


class _OptunaReporter:
    def __init__(self, trial: Any, arm: str, max_epochs: int) -> None:
        self.trial, self.arm, self.max_epochs = trial, arm, max_epochs

    def needs_state(self, epoch: int) -> bool:
        return False

    def restore(self, model: Any, optimizer: Any, neve: Any, extra: dict) -> int:
        return 0

    def report(
        self, metrics: dict, *, neve: Any, model: Any, optimizer: Any, epoch: int, extra: dict, final: bool
    ) -> None:
        if self.arm == "neve":
            from neve_tune.optuna import report_epoch

            try:
                report_epoch(self.trial, neve, float(metrics[TRAIN_LOSS]), max_epochs=self.max_epochs)
            except optuna.TrialPruned as exc:
                if not final:
                    raise StopTrial("pruned", exc) from None
                raise
            return
        self.trial.report(float(metrics.get(VAL_ACC, math.nan)), epoch)
        if not final and self.trial.should_prune():
            raise StopTrial("pruned", optuna.TrialPruned(f"pruned at epoch {epoch} on validation accuracy"))


def _optuna_pruner(arm: str, budget: Budget) -> Any:
    if arm == "neve":
        from neve_tune.optuna import NeVePruner

        return NeVePruner(stop_threshold=budget.neve.stop_threshold)
    if arm == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=budget.grace_period, reduction_factor=budget.reduction_factor
        )
    return optuna.pruners.NopPruner()


def run_arm(
    *,
    arm: str,
    spec: TrialSpec,
    configs: list[dict[str, Any]],
    link: Mapping[str, Any] | None,
    collector: Collector,
    storage: Path,
    name: str,
    n_jobs: int,
    fallback_dir: str,
) -> float:
    definition = spec.definition()
    storage.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(
        study_name=name,
        storage=f"sqlite:///{storage / 'optuna.db'}",
        direction="minimize" if arm == "neve" else "maximize",
        pruner=_optuna_pruner(arm, spec.budget),
        sampler=optuna.samplers.RandomSampler(seed=spec.seed),
    )
    for config in configs:
        study.enqueue_trial(
            {k: v for k, v in config.items() if k != "config_id"}, user_attrs={"config_id": config["config_id"]}
        )
    device = (
        torch.device("cuda") if torch.cuda.is_available() and spec.budget.gpus_per_trial > 0 else torch.device("cpu")
    )

    lock = threading.Lock()

    def one_trial() -> None:
        with lock:  # study.ask() pops an enqueued configuration; never let two threads pop the same one
            trial = study.ask()
        config: dict[str, Any] = {"config_id": int(trial.user_attrs["config_id"])}
        for key, domain in definition.search_space.items():
            if isinstance(domain, LogUniform):
                config[key] = trial.suggest_float(key, domain.low, domain.high, log=True)
            elif isinstance(domain, Uniform):
                config[key] = trial.suggest_float(key, domain.low, domain.high)
            elif isinstance(domain, Choice):
                config[key] = trial.suggest_categorical(key, list(domain.values))
        trial_id = f"optuna-{trial.number}"
        collector.started(trial_id, config)
        if link is not None:
            config["mlflow"] = dict(link)
        try:
            outcome = run_trial(
                spec,
                config,
                _OptunaReporter(trial, arm, spec.budget.max_epochs),
                device=device,
                trial_id=trial_id,
                fallback_dir=fallback_dir,
                on_epoch=lambda epoch, metrics: collector.result(trial_id, metrics),
            )
        except optuna.TrialPruned:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            collector.completed(trial_id)
            return
        except Exception as exc:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            collector.completed(trial_id, error=f"{type(exc).__name__}: {exc}")
            return
        value = float(outcome.final.get(TRAIN_LOSS if arm == "neve" else VAL_ACC, math.nan))
        study.tell(trial, value if math.isfinite(value) else None, state=None if math.isfinite(value) else FAIL)
        collector.completed(trial_id)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, n_jobs), thread_name_prefix="neve-trial") as pool:
        futures = [pool.submit(one_trial) for _ in configs]
        try:
            for future in futures:
                future.result()
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)  # start no new trial; running ones finish their epoch
            raise
    return time.perf_counter() - t0
