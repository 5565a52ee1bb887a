"""The Optuna backend of the study runner: one Optuna study per arm, the same configurations enqueued.

Each arm's study has the arm's pruner (:attr:`Arm.optuna_pruner`: ``neve`` ->
:class:`neve_tune.optuna.NeVePruner`, converged trials COMPLETE; ``asha`` -> ``SuccessiveHalvingPruner`` on
validation accuracy; ``fifo`` -> ``NopPruner``), objective and direction. The sampled configurations are
enqueued in order and ``study.optimize(n_trials=..., n_jobs=..., catch=..., callbacks=...)`` runs them in
threads of this process. The studies live in one Optuna journal file, ``output/optuna/journal.log``
(:func:`study_storage`).
"""

from __future__ import annotations

import logging
import math
import os
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from ._arm import Arm
from ._backend import ArmJob, Backend
from ._keys import PRUNED
from ._records import ArmResult
from ._spec import Choice, Domain, LogUniform, Uniform
from ._trial import StopTrial, run_trial

JOURNAL_FILE = "journal.log"


def study_storage(folder: Path) -> JournalStorage:
    """The Optuna storage of the studies under ``folder``: the journal file ``folder / "journal.log"``.

    Every trial state change is one record appended to the file under a file lock, and a worker owns an
    enqueued trial only if its own RUNNING record is the first one in the log: ``study.ask()`` in several
    threads (``n_jobs``) or processes never pops the same enqueued trial twice. A shared SQLite file
    cannot promise that (SQLite ignores ``SELECT ... FOR UPDATE``; two workers can both read a trial
    WAITING and both run it, issue 12). The same call reads a finished study back::

        optuna.load_study(study_name=..., storage=study_storage(Path("neve_results/optuna")))

    Args:
        folder: the folder of the journal file; created if missing.

    Returns:
        A journal storage on ``folder / "journal.log"`` (the file is created if missing).
    """
    folder.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(folder / JOURNAL_FILE)))


class _QuietFailures(logging.Filter):
    """Drops Optuna's "Trial N failed ..." lines: the collector already records (and MLflow shows) why."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Trial ") and " failed " in message)


class _OptunaReporter:
    """Reports the arm's objective each epoch: through ``neve_tune.optuna.report_epoch`` for a NeVe trial."""

    def __init__(self, trial: optuna.Trial, arm: Arm, max_epochs: int) -> None:
        self.trial, self.arm, self.max_epochs = trial, arm, max_epochs

    def needs_state(self, epoch: int) -> bool:
        return False

    def restore(self, model: Any, optimizer: Any, neve: Any, extra: dict[str, Any]) -> int:
        return 0

    def report(
        self,
        metrics: dict[str, Any],
        *,
        neve: Any,
        model: Any,
        optimizer: Any,
        epoch: int,
        extra: dict[str, Any],
        final: bool,
    ) -> None:
        value = float(metrics.get(self.arm.objective, math.nan))
        if neve is not None:
            from neve_tune.optuna import report_epoch

            try:
                report_epoch(self.trial, neve, value, max_epochs=self.max_epochs)
            except optuna.TrialPruned as exc:
                if not final:
                    raise StopTrial(PRUNED, exc) from None
                raise
            return
        self.trial.report(value, epoch)
        if not final and self.trial.should_prune():
            raise StopTrial(PRUNED, optuna.TrialPruned(f"pruned at epoch {epoch} on {self.arm.objective}"))


def _suggest(trial: optuna.Trial, space: dict[str, Domain], config_id: int) -> dict[str, Any]:
    """The trial's configuration: its enqueued values, read back through the matching distributions."""
    config: dict[str, Any] = {"config_id": config_id}
    for key, domain in space.items():
        if isinstance(domain, LogUniform):
            config[key] = trial.suggest_float(key, domain.low, domain.high, log=True)
        elif isinstance(domain, Uniform):
            config[key] = trial.suggest_float(key, domain.low, domain.high)
        elif isinstance(domain, Choice):
            config[key] = trial.suggest_categorical(key, list(domain.values))
    return config


class OptunaBackend(Backend):
    """One Optuna study per arm in the journal file ``output/optuna/journal.log``, trials in ``n_jobs`` threads.

    ``n_jobs`` defaults to the CPUs of this machine divided by ``budget.cpus_per_trial``. A trial that raises
    ends FAIL (its error recorded), a pruned one PRUNED, and one whose objective is not finite FAIL; the
    study goes on. Ctrl-C starts no new trial; Optuna lets the running ones end first.
    """

    name = "optuna"

    def __init__(self, *, n_jobs: int | None = None) -> None:
        self.n_jobs = n_jobs

    def run_arm(self, job: ArmJob) -> ArmResult:
        study = self._study(job)
        errors: dict[int, str] = {}
        journal = job.output / "optuna" / JOURNAL_FILE

        def trial_done(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            error = errors.pop(trial.number, None)
            where = (
                f"the user attr 'error' of trial {trial.number} of the Optuna study {study.study_name!r} in {journal}"
                f" (optuna.load_study(study_name=..., storage=study_storage(...)).trials[{trial.number}])"
            )
            job.collector.completed(f"optuna-{trial.number}", error=error, error_at=where if error else None)

        budget = job.budget
        n_jobs = self.n_jobs or max(1, int((os.cpu_count() or 1) // max(budget.cpus_per_trial, 1)))
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        quiet, optimize_logger = _QuietFailures(), logging.getLogger("optuna.study._optimize")
        optimize_logger.addFilter(quiet)
        t0 = time.perf_counter()
        try:
            study.optimize(
                self._objective(job, errors),
                n_trials=len(job.configs),
                n_jobs=n_jobs,
                catch=(Exception,),
                callbacks=[trial_done],
            )
        finally:
            optimize_logger.removeFilter(quiet)
        return job.result(time.perf_counter() - t0)

    @staticmethod
    def _study(job: ArmJob) -> optuna.Study:
        study = optuna.create_study(
            study_name=job.name,
            storage=study_storage(job.output / "optuna"),
            direction=job.arm.direction,
            pruner=job.arm.optuna_pruner(job.budget),
            sampler=optuna.samplers.RandomSampler(seed=job.spec.seed),
        )
        for config in job.configs:
            study.enqueue_trial(
                {k: v for k, v in config.items() if k != "config_id"}, user_attrs={"config_id": config["config_id"]}
            )
        return study

    @staticmethod
    def _objective(job: ArmJob, errors: dict[int, str]) -> Callable[[optuna.Trial], float]:
        spec, arm, collector = job.spec, job.arm, job.collector
        space = dict(spec.definition().search_space)
        use_gpu = torch.cuda.is_available() and spec.budget.gpus_per_trial > 0
        device = torch.device("cuda") if use_gpu else torch.device("cpu")

        def objective(trial: optuna.Trial) -> float:
            config = _suggest(trial, space, int(trial.user_attrs["config_id"]))
            trial_id = f"optuna-{trial.number}"
            collector.started(trial_id, config)
            if job.link is not None:
                config["mlflow"] = dict(job.link)
            try:
                outcome = run_trial(
                    spec,
                    config,
                    _OptunaReporter(trial, arm, spec.budget.max_epochs),
                    device=device,
                    trial_id=trial_id,
                    fallback_dir=job.fallback_dir,
                    on_epoch=lambda epoch, metrics: collector.result(trial_id, metrics),
                )
            except optuna.TrialPruned:
                raise
            except Exception as exc:
                errors[trial.number] = f"{type(exc).__name__}: {exc}"
                trial.set_user_attr("error", traceback.format_exc()[-10_000:])  # the full one, kept in the journal
                raise
            value = float(outcome.final.get(arm.objective, math.nan))
            return value if math.isfinite(value) else math.nan  # not finite: the trial ends FAIL

        return objective


__all__ = ["JOURNAL_FILE", "OptunaBackend", "study_storage"]
