"""How to run a study: the options of :func:`~neve_tune.studies.run_study` as one object."""

from __future__ import annotations

import errno
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ._arms import ARMS
from ._spec import Budget, StudyError

if TYPE_CHECKING:
    from rich.console import Console

    from ._backend import Backend
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
        seed: sampling of the configurations, weight init and data order, splits (one seed).
        seeds: repeat the whole study once per seed (each seed samples its own configurations and seeds its
            trials, as ``seed`` does); the table then reports each arm's mean and spread over the seeds.
            ``None``: the one seed ``seed``.
        tracking_uri: MLflow store (``None``: ``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db`` in the
            working directory). Checked before any training.
        experiment: MLflow experiment name (default ``neve-tune-<study>``).
        mlflow_drain_timeout_s: at the end of a finished study, how long to keep retrying an unreachable
            MLflow store for what the trials could not send (``mlflow-unsent/``) before giving up and saying
            how to send it later (``neve-tune mlflow replay FOLDER``).
        track: log to MLflow (False: only the returned result and the files in ``output_dir``).
        backend: a backend's name (``"ray"``, ``"optuna"``, or one of :func:`~neve_tune.studies.register_backend`)
            with its default options, or a :class:`~neve_tune.studies.Backend` carrying its own, e.g.
            ``get_backend("ray")(address="auto", callbacks=[...])``.
        cpus_per_trial, gpus_per_trial: resources of one trial (default: the study budget's).
        data_root: where the dataset is (or is downloaded to).
        num_workers: DataLoader workers per trial.
        output_dir: Ray results, Optuna storage, comparison table and plots are written under it.
        progress: show progress bars.
        console: the rich console of the progress bars (default: rich's).
        on_arm_done: called after each arm of each seed with its records (``ArmResult``, whose ``seed``
            says which) and its table row (``ArmSummary``).
    """

    arms: Sequence[str] = ARMS
    trials: int | None = None
    max_epochs: int | None = None
    seed: int = 0
    seeds: Sequence[int] | None = None
    tracking_uri: str | None = None
    experiment: str | None = None
    mlflow_drain_timeout_s: float = 60.0
    track: bool = True
    backend: str | Backend = "ray"
    cpus_per_trial: float | None = None
    gpus_per_trial: float | None = None
    data_root: str | None = None
    num_workers: int = 0
    output_dir: str | os.PathLike[str] = "neve_results"
    progress: bool = True
    console: Console | None = None
    on_arm_done: Callable[[ArmResult, ArmSummary], None] | None = None

    @property
    def seed_list(self) -> tuple[int, ...]:
        """The seeds the study runs, in order: ``seeds``, or ``(seed,)`` (not validated, see :func:`check_seeds`)."""
        return (self.seed,) if self.seeds is None else tuple(self.seeds)


def check_seeds(options: StudyOptions) -> tuple[int, ...]:
    """The seeds of ``options``; ``StudyError`` when they are empty, repeated or not integers."""
    seeds = options.seed_list
    if not seeds:
        raise StudyError("Give at least one seed (e.g. --seeds 0,1,2).")
    bad = [s for s in seeds if isinstance(s, bool) or not isinstance(s, int) or s < 0]
    if bad:
        raise StudyError(f"Seeds must be integers >= 0, but got {bad}.")
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise StudyError(f"Each seed must appear once, but {repeated} appear more than once (identical runs).")
    return seeds


#: The tracking-store schemes MLflow itself handles (SQLAlchemy databases may name a driver: ``mysql+pymysql``).
MLFLOW_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "file", "http", "https", "databricks")


def _plugin_schemes() -> list[str]:
    """Schemes that installed MLflow tracking-store plugins register (entry points ``mlflow.tracking_store``)."""
    from importlib.metadata import entry_points

    return [ep.name for ep in entry_points(group="mlflow.tracking_store")]


def check_tracking_scheme(uri: str | os.PathLike[str] | None) -> None:
    """Raise ``StudyError`` when ``uri`` names a scheme no MLflow tracking store handles (e.g. ``ftp://``).

    A bare path (``mlruns``) is a local file store; ``None`` is the default store. Imports nothing heavy, so
    a bad URI is refused before any store is created or Ray started.
    """
    if uri is None or str(uri) == "":
        uri = os.environ.get("MLFLOW_TRACKING_URI") or ""
    text = str(uri)
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):", text)
    if match is None or len(match.group(1)) == 1:  # no scheme, or a Windows drive letter: a local path
        return
    scheme = match.group(1).lower()
    if scheme.split("+", 1)[0] in MLFLOW_SCHEMES or scheme in _plugin_schemes():
        return
    raise StudyError(
        f"Cannot track in {text!r}: MLflow has no tracking store for the scheme {scheme!r}. Use a local store "
        "(--tracking-uri sqlite:///mlflow.db, or a folder path), a server (http://HOST:PORT or https://...), "
        "a database (postgresql://..., mysql://..., mssql://...) or databricks."
    )


def check_output_dir(path: str | os.PathLike[str]) -> Path:
    """The absolute output folder; ``StudyError`` when it could not be created or written.

    Checked with the other options, so a path under a regular file (or in ``/proc``) is refused before
    Ray, Optuna or any MLflow run starts. Creates nothing: it makes and removes a probe folder in the
    nearest folder that exists.
    """
    folder = Path(path).expanduser().resolve()
    existing = next(p for p in [folder, *folder.parents] if p.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, f"{existing} is a file, not a folder")
        os.rmdir(tempfile.mkdtemp(prefix=".neve-check-", dir=existing))
    except OSError as err:
        raise StudyError(
            f"Cannot write the study's results to --output-dir {os.fspath(path)!r}: {err.strerror or err}"
            f" (checked in {existing}). Pass a folder you can write to, e.g. --output-dir ./neve_results."
        ) from err
    return folder


def _local_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_resources(budget: Budget, backend: Backend) -> None:
    """Refuse, before anything starts, a trial asking for GPUs this machine does not have.

    Only where the trials run on this machine (:attr:`Backend.runs_here`: the Optuna backend, or a Ray
    started here); a Ray cluster's GPUs are checked when connecting to it.
    """
    if budget.gpus_per_trial <= 0 or not backend.runs_here:
        return
    found = _local_gpus()
    if found < budget.gpus_per_trial:
        raise StudyError(
            f"Each trial asks for {budget.gpus_per_trial:g} GPU(s), but this machine has {found} (PyTorch sees "
            f"{found} CUDA device(s)). Pass --gpus-per-trial 0 to train on CPUs, or --ray-address of a Ray "
            "cluster with GPUs (--backend ray)."
        )


__all__ = [
    "MLFLOW_SCHEMES",
    "StudyOptions",
    "check_output_dir",
    "check_resources",
    "check_seeds",
    "check_tracking_scheme",
]
