"""Studies: NeVe versus validation-based ASHA (and a fixed-budget FIFO reference) on the same work.

* :class:`StudyDefinition` / :class:`Budget` / search-space domains: what a study is. The built-in
  studies (``digits``, ``mnist1d``, ``cifar10``, ``cifar100``, ``imagenet100``) live in
  :mod:`neve_tune.studies.builtin`;
* :func:`get_study` / :func:`list_studies` / :func:`register_study`: the registry of studies (a built-in
  one is a ``"module:ATTRIBUTE"`` entry of ``_registry.BUILTIN_STUDIES``, imported on first use);
* :class:`Arm` / :func:`get_arm` / :func:`register_arm`: the arms (``neve``, ``asha``, ``fifo`` and the
  optional ``neve-pure`` and ``schedulefree``), each one definition of what it holds out, optimises and
  picks by, and how each backend runs it;
* :class:`TrialPolicy` (:class:`NeVePolicy`, :class:`FixedSchedulePolicy`): how an arm's trial adapts its
  training, behind the per-epoch hooks :func:`run_trial` calls;
* :func:`run_study` with :class:`StudyOptions`: runs the arms on a :class:`Backend` (``ray`` or ``optuna``;
  :func:`get_backend` / :func:`list_backends` / :func:`register_backend`: the registry of backends, keyed by
  :attr:`Backend.name`), tracked in MLflow, and returns a :class:`StudyResult` with the comparison table;
* :func:`summarize_arm` / :func:`comparison_table` / :func:`seeds_table`: the tables from plain trial
  records; :func:`load_study` reads a study back from MLflow (:class:`StoredStudy`) and
  :func:`write_study_outputs` writes its tables and plots (``neve-tune study compare``).

The protocol (SPEC §4): every arm gets the same sampled configurations, trial count, seed and epoch cap,
and builds its optimizer with the study's ``build_optimizer`` (default SGD; ``schedulefree`` keeps its own).
The ``neve`` arm trains on 100% of the training split with the study's aux set (``make_aux``; default
noise): NeVe decays its LR and anneals it at its first convergence, ASHA (Ray) or successive halving
(Optuna) prunes on the validation-free TSE-EMA of the training loss, and it picks by the lowest mean
training loss (TSE / epochs); ``neve-pure``
is the paper's rule alone; ``asha`` holds out 10% for validation, uses a fixed LR schedule and ASHA prunes
on validation accuracy; ``fifo`` is ``asha`` without pruning (the compute reference); ``schedulefree`` is
Schedule-Free SGD at the fixed budget. ``StudyOptions(seeds=...)`` repeats a study per seed. The test split
is only reported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._arm import Arm, UnknownArmError
from ._arms import ARMS, get_arm, list_arms, register_arm
from ._backend import ArmJob, Backend, get_backend, list_backends, register_backend
from ._compare import (
    ArmSummary,
    comparison_csv,
    comparison_markdown,
    comparison_table,
    pick_trial,
    summarize_arm,
)
from ._from_mlflow import StoredStudy, load_study
from ._options import StudyOptions
from ._outputs import write_study_outputs
from ._policy import EpochDecision, FixedSchedulePolicy, NeVePolicy, TrialPolicy
from ._records import ArmResult, TrialRecord
from ._registry import UnknownStudyError, get_study, list_studies, register_study
from ._seeds import seeds_table
from ._spec import (
    Budget,
    Choice,
    DataRequest,
    DatasetData,
    Domain,
    LogUniform,
    NeVeSettings,
    StudyData,
    StudyDefinition,
    StudyError,
    TensorData,
    Uniform,
)
from ._trial import Reporter, TrialSpec, run_trial

if TYPE_CHECKING:
    from ._runner import StudyResult, run_study
    from ._tracking import StudyTracker

__all__ = [
    "ARMS",
    "Arm",
    "ArmJob",
    "ArmResult",
    "ArmSummary",
    "Backend",
    "Budget",
    "Choice",
    "DataRequest",
    "DatasetData",
    "Domain",
    "EpochDecision",
    "FixedSchedulePolicy",
    "LogUniform",
    "NeVePolicy",
    "NeVeSettings",
    "Reporter",
    "StoredStudy",
    "StudyData",
    "StudyDefinition",
    "StudyError",
    "StudyOptions",
    "StudyResult",
    "StudyTracker",
    "TensorData",
    "TrialPolicy",
    "TrialRecord",
    "TrialSpec",
    "Uniform",
    "UnknownArmError",
    "UnknownStudyError",
    "comparison_csv",
    "comparison_markdown",
    "comparison_table",
    "get_arm",
    "get_backend",
    "get_study",
    "list_arms",
    "list_backends",
    "list_studies",
    "load_study",
    "pick_trial",
    "register_arm",
    "register_backend",
    "register_study",
    "run_study",
    "run_trial",
    "seeds_table",
    "summarize_arm",
    "write_study_outputs",
]


def __getattr__(name: str) -> object:
    # The runner loads the study machinery (collector, tracker, backends' contract): only when asked for.
    if name in ("run_study", "StudyResult"):
        from . import _runner

        return getattr(_runner, name)
    if name == "StudyTracker":  # the study tree in MLflow, for a loop of your own (docs/mlflow.md)
        from ._tracking import StudyTracker

        return StudyTracker
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
