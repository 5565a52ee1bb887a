"""The contract between the study runner and a tuning backend (Ray Tune, Optuna): run one arm's job.

The runner calls, in the driver process:

* :meth:`Backend.open` once, before the first arm (after every check that needs no training passed);
* :meth:`Backend.run_arm` once per arm, in the arms' order: run every configuration of the :class:`ArmJob`
  under the arm's scheduler or pruner, feed ``job.collector`` as trials start
  (``collector.started``), report (``collector.result``) and end (``collector.completed``), and return the
  arm's records (:meth:`ArmJob.result`). It raises ``KeyboardInterrupt`` when the arm was interrupted;
* :meth:`Backend.close` once, however the study ended.

Every trial runs :func:`~neve_tune.studies.run_trial` with a backend-specific ``Reporter``.

The backends are registered by :attr:`Backend.name` (:func:`register_backend`, :func:`get_backend`): the
built-in ``ray`` and ``optuna`` ones are imported on first use, so a study on one never imports the other.
A backend's own options are its constructor's (``RayBackend(address="auto", callbacks=[...])``); pass the
instance as ``StudyOptions(backend=...)``, or its name for the defaults.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ._arm import Arm
from ._records import ArmResult
from ._spec import Budget, StudyError
from ._trial import TrialSpec

if TYPE_CHECKING:
    from ._collect import Collector


@dataclass(frozen=True)
class ArmJob:
    """One arm's job: every configuration of one arm, where to write and whom to tell.

    Attributes:
        arm: the arm.
        spec: what every trial needs besides its config (study, arm, budget, seed, data).
        configs: the sampled configurations (the same ones for every arm), each with its ``config_id``.
        collector: the driver-side records and progress of this arm's trials.
        name: the job's name (Ray experiment, Optuna study): ``<study>-<arm>-<stamp>``.
        output: the study's output folder; a backend writes under ``output / <backend name>``.
        link: the MLflow arm run's link, added to every trial config (``None``: not tracked).
        fallback_dir: where trials save MLflow records they could not send.
    """

    arm: Arm
    spec: TrialSpec
    configs: list[dict[str, Any]]
    collector: Collector
    name: str
    output: Path
    link: Mapping[str, Any] | None = None
    fallback_dir: str | None = None

    @property
    def budget(self) -> Budget:
        return self.spec.budget

    def result(self, wall_time_s: float) -> ArmResult:
        """The arm's records, as collected, with its wall time."""
        return ArmResult(
            arm=self.arm.name,
            records=self.collector.records(),
            wall_time_s=wall_time_s,
            train_fraction=self.arm.train_fraction(self.budget),
            max_epochs=self.budget.max_epochs,
            seed=self.spec.seed,
            failure=self.collector.failure(),
        )


class Backend(ABC):
    """A tuning backend of the study runner (see the module docstring for when each method is called).

    A subclass sets :attr:`name` and takes its own options in ``__init__`` (every one with a default, so
    ``get_backend(name)()`` works); :func:`register_backend` makes it available by that name.

    State: a backend holds what it started (e.g. a local Ray) between :meth:`open` and :meth:`close`;
    results live in the collector and in the backend's own storage under the output folder.
    """

    #: The name ``--backend`` and :attr:`StudyOptions.backend` use.
    name: ClassVar[str]

    @property
    def runs_here(self) -> bool:
        """Whether the trials run on this machine (then a trial asking for more GPUs than it has is refused
        before anything starts); ``False`` for a backend that sends them to a cluster."""
        return True

    def open(self, budget: Budget) -> None:  # noqa: B027 - a hook, empty by default
        """Start or connect to what the arms run on, and check that one trial fits (raise ``StudyError``)."""

    @abstractmethod
    def run_arm(self, job: ArmJob) -> ArmResult:
        """Run every configuration of ``job`` and return the arm's records (:meth:`ArmJob.result`)."""

    def close(self) -> None:  # noqa: B027 - a hook, empty by default
        """Release what :meth:`open` started."""


#: The built-in backends: name -> ("module:Class", the extra that installs what it imports).
_BUILTIN: dict[str, tuple[str, str]] = {
    "ray": ("neve_tune.studies._ray_backend:RayBackend", "ray"),
    "optuna": ("neve_tune.studies._optuna_backend:OptunaBackend", "optuna"),
}
_REGISTERED: dict[str, type[Backend]] = {}


def register_backend(backend: type[Backend], *, replace: bool = False) -> None:
    """Make the :class:`Backend` subclass ``backend`` available by its :attr:`~Backend.name`."""
    if not (isinstance(backend, type) and issubclass(backend, Backend)):
        raise TypeError(f"{backend!r} is not a Backend subclass")
    name = getattr(backend, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{backend.__name__} must set a class attribute name (the --backend value), but has {name!r}.")
    if not replace and (name in _REGISTERED or name in _BUILTIN):
        raise ValueError(f"A backend named {name!r} exists already; pass replace=True to override it.")
    _REGISTERED[name] = backend


def list_backends() -> list[str]:
    """The names of every known backend (built-in ones first)."""
    return [*_BUILTIN, *(name for name in _REGISTERED if name not in _BUILTIN)]


def get_backend(name: str) -> type[Backend]:
    """The backend class called ``name`` (a built-in one is imported here).

    Raises:
        StudyError: no such backend (the message lists them), or its packages are not installed (the
            message says what to install).
    """
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name not in _BUILTIN:
        raise StudyError(f"Unknown backend {name!r}; the backends are: {', '.join(list_backends())}.")
    target, extra = _BUILTIN[name]
    module_name, _, attribute = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        others = ", ".join(n for n in list_backends() if n != name)
        raise StudyError(
            f"The {name} backend is not available ({err}). Install it (pip install 'neve_tune[{extra}]') or use "
            f"another backend ({others})."
        ) from err
    backend: type[Backend] = getattr(module, attribute)
    return backend


def resolve_backend(backend: str | Backend) -> Backend:
    """``backend`` itself when it is a :class:`Backend`; else the backend of that name with its defaults."""
    if isinstance(backend, Backend):
        return backend
    return get_backend(str(backend))()


__all__ = ["ArmJob", "Backend", "get_backend", "list_backends", "register_backend", "resolve_backend"]
