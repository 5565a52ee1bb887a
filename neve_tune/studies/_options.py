"""How to run a study: the options of :func:`~neve_tune.studies.run_study` as one object."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._arms import ARMS

if TYPE_CHECKING:
    from rich.console import Console

    from ._compare import ArmSummary
    from ._records import ArmResult


@dataclass(frozen=True)
class StudyOptions:
    """Everything :func:`~neve_tune.studies.run_study` takes besides the study (immutable).

    ``run_study(study, options, **changes)`` applies ``changes`` with :func:`dataclasses.replace`, so
    ``run_study("digits", trials=4)`` and ``run_study("digits", StudyOptions(trials=4))`` are the same
    call. Nothing is validated here: ``run_study`` checks the options (arms, backend, resources, tracking
    store) before any training and raises ``StudyError`` for a bad one.

    Attributes:
        arms: names of registered arms (:func:`~neve_tune.studies.register_arm`), run in this order;
            default ``neve``, ``asha``, ``fifo``.
        trials, max_epochs: override the study budget (the same for every arm); ``None``: the study's.
        seed: sampling of the configurations, weight init and data order, splits.
        tracking_uri: MLflow store (``None``: ``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db`` in the
            working directory). Checked before any training.
        experiment: MLflow experiment name (default ``neve-tune-<study>``).
        mlflow_drain_timeout_s: at the end of a finished study, how long to keep retrying an unreachable
            MLflow store for what the trials could not send (``mlflow-unsent/``) before giving up and saying
            how to send it later (``neve-tune mlflow replay FOLDER``).
        track: log to MLflow (False: only the returned result and the files in ``output_dir``).
        ray_address: ``None``/``"local"`` starts a local Ray with every CPU; else e.g. ``"auto"``.
        backend: ``"ray"`` or ``"optuna"``.
        cpus_per_trial, gpus_per_trial: resources of one trial (default: the study budget's).
        data_root: where the dataset is (or is downloaded to).
        num_workers: DataLoader workers per trial.
        output_dir: Ray results, Optuna storage, comparison table and plots are written under it.
        progress: show progress bars.
        console: the rich console of the progress bars (default: rich's).
        callbacks: extra Ray Tune callbacks (Ray backend).
        on_arm_done: called after each arm with its records and row.
    """

    arms: Sequence[str] = ARMS
    trials: int | None = None
    max_epochs: int | None = None
    seed: int = 0
    tracking_uri: str | None = None
    experiment: str | None = None
    mlflow_drain_timeout_s: float = 60.0
    track: bool = True
    ray_address: str | None = None
    backend: str = "ray"
    cpus_per_trial: float | None = None
    gpus_per_trial: float | None = None
    data_root: str | None = None
    num_workers: int = 0
    output_dir: str | os.PathLike[str] = "neve_results"
    progress: bool = True
    console: Console | None = None
    callbacks: Sequence[Any] = ()
    on_arm_done: Callable[[ArmResult, ArmSummary], None] | None = None


__all__ = ["StudyOptions"]
