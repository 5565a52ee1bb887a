"""Driver-side bookkeeping of a study arm: progress bars and the per-trial records (any backend)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from neve_tune import keys as neve_keys
from neve_tune.mlflow._logger import TAG_ERROR

from ._arm import Arm
from ._keys import (
    EPOCH,
    EPOCH_TIME,
    ERROR,
    LR,
    MONITOR_VELOCITY,
    STOP_REASON,
    TEST_ACC,
    TEST_LOSS,
    TRAIN_ACC,
    TRAIN_LOSS,
    TRAIN_TSE,
    TRAIN_TSE_EMA,
    TRAINING_ITERATION,
    VAL_ACC,
    VAL_LOSS,
)
from ._records import TrialRecord
from ._spec import Budget
from ._trial import hyperparameters

if TYPE_CHECKING:
    from rich.console import Console

    from ._tracking import ArmRun

# Keys of each result the driver keeps (for records and progress), not the whole result.
KEEP = (
    EPOCH,
    TRAINING_ITERATION,
    TRAIN_LOSS,
    TRAIN_ACC,
    TRAIN_TSE,
    TRAIN_TSE_EMA,
    VAL_LOSS,
    VAL_ACC,
    TEST_LOSS,
    TEST_ACC,
    LR,
    neve_keys.MODEL_VELOCITY,
    neve_keys.CONVERGED,
    neve_keys.DIVERGED,
    neve_keys.FLIP_MIN_EPOCH,
    MONITOR_VELOCITY,
    EPOCH_TIME,
    STOP_REASON,
)


class Progress:
    """Rich progress bars, one per arm, counted in trial-epochs; shrinks when a trial stops early."""

    def __init__(self, enabled: bool, console: Console | None) -> None:
        self.enabled = enabled
        self._progress = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("trial-epochs"),
                TimeElapsedColumn(),
                TextColumn("{task.fields[info]}"),
                console=console,
                transient=False,
            )

    def __enter__(self) -> Progress:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def add(self, label: str, trials: int, max_epochs: int) -> Any:
        if self._progress is None:
            return None
        return self._progress.add_task(f"{label:>5}", total=trials * max_epochs, info=f"0/{trials} trials done")

    def advance(self, task: Any, n: int = 1) -> None:
        if self._progress is not None and task is not None:
            self._progress.advance(task, n)

    def trial_done(self, task: Any, unused_epochs: int, done: int, trials: int) -> None:
        if self._progress is None or task is None:
            return
        t = self._progress.tasks[[x.id for x in self._progress.tasks].index(task)]
        self._progress.update(
            task, total=max(t.completed, (t.total or 0) - unused_epochs), info=f"{done}/{trials} trials done"
        )


class Collector:
    """Driver-side view of one arm's trials: slim results per trial, and the MLflow safety net."""

    def __init__(
        self,
        arm: Arm,
        budget: Budget,
        arm_run: ArmRun | None,
        progress: Progress,
        trials: int,
        *,
        label: str | None = None,
    ) -> None:
        self.arm = arm
        self.budget = budget
        self.arm_run = arm_run
        self.progress = progress
        self.task = progress.add(label or arm.display_name, trials, budget.max_epochs)
        self.trials = trials
        self.configs: dict[str, dict[str, Any]] = {}
        self.results: dict[str, list[dict[str, Any]]] = {}
        self.errors: dict[str, str] = {}
        self.error_at: dict[str, str] = {}
        self.done = 0

    def started(self, trial_id: str, config: Mapping[str, Any]) -> None:
        self.configs.setdefault(trial_id, hyperparameters(config))
        self.results.setdefault(trial_id, [])

    def result(self, trial_id: str, result: Mapping[str, Any]) -> None:
        rows = self.results.setdefault(trial_id, [])
        epoch = result.get(EPOCH)
        if epoch is not None and rows and rows[-1].get(EPOCH, 0) >= epoch:
            # A restarted trial replays epochs from its checkpoint: keep one row per epoch, the latest.
            rows[:] = [r for r in rows if r.get(EPOCH, 0) < epoch]
        rows.append({k: result[k] for k in KEEP if k in result})
        self.progress.advance(self.task)

    def epochs(self, trial_id: str) -> int:
        rows = self.results.get(trial_id) or []
        return int(rows[-1].get(EPOCH, rows[-1].get(TRAINING_ITERATION, 0))) if rows else 0

    def stop_reason(self, trial_id: str, *, errored: bool = False) -> str:
        if errored:
            return ERROR
        rows = self.results.get(trial_id) or []
        if rows and rows[-1].get(STOP_REASON):
            return str(rows[-1][STOP_REASON])  # it ended by itself
        return self.arm.external_stop_reason  # its backend stopped it

    def completed(self, trial_id: str, *, error: str | None = None, error_at: str | None = None) -> None:
        """The trial ended; ``error``: it raised (its message), ``error_at``: where its full error is kept by
        the backend (e.g. Ray's trial error file)."""
        self.done += 1
        if error is not None:
            self.errors[trial_id] = error
            if error_at is not None:
                self.error_at[trial_id] = error_at
        epochs = self.epochs(trial_id)
        reason = self.stop_reason(trial_id, errored=error is not None)
        self.progress.trial_done(self.task, max(0, self.budget.max_epochs - epochs), self.done, self.trials)
        if self.arm_run is not None:
            self.arm_run.finalize_trial(
                trial_id,
                status="FAILED" if error is not None else "FINISHED",
                stop_reason=reason,
                stop_epoch=epochs,
                stop_threshold=self.budget.neve.stop_threshold,
                error=error,
            )

    def failure(self) -> str | None:
        """``None`` unless every trial of the arm failed; then the first error, summarised, and where the full
        one is (the backend's record and the trial's MLflow run)."""
        if not self.results or any(trial_id not in self.errors for trial_id in self.results):
            return None
        trial_id = next(iter(self.errors))
        lines = [line.strip() for line in self.errors[trial_id].strip().splitlines() if line.strip()]
        summary = (lines[-1] if lines else "error")[:300]
        config_id = self.configs.get(trial_id, {}).get("config_id", "?")
        text = (
            f"every one of its {len(self.results)} trials failed; the first (config {config_id}, trial {trial_id}): "
            f"{summary}. Full error: {self.error_at.get(trial_id, 'the backend log')}"
        )
        if self.arm_run is not None:
            link = self.arm_run.link
            text += (
                f"; MLflow: the run tagged trial_id={trial_id} under the arm run {link.parent_run_id} (experiment id "
                f"{link.experiment_id} at {link.tracking_uri}), tag {TAG_ERROR!r}"
            )
        return text + "."

    def records(self) -> list[TrialRecord]:
        out = []
        for trial_id, rows in self.results.items():
            config = self.configs.get(trial_id, {})
            final = dict(rows[-1]) if rows else {}
            final.pop(STOP_REASON, None)
            out.append(
                TrialRecord(
                    arm=self.arm.name,
                    config_id=int(config.get("config_id", -1)),
                    config=config,
                    epochs=self.epochs(trial_id),
                    stop_reason=self.stop_reason(trial_id, errored=trial_id in self.errors),
                    final=final,
                    test_acc_curve=[(int(r[EPOCH]), float(r[TEST_ACC])) for r in rows if EPOCH in r and TEST_ACC in r],
                    tse_curve=[(int(r[EPOCH]), float(r[TRAIN_TSE])) for r in rows if EPOCH in r and TRAIN_TSE in r],
                    trial_id=trial_id,
                )
            )
        return sorted(out, key=lambda r: r.config_id)
