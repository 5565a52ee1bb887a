"""Studies: NeVe versus validation-based ASHA (and a fixed-budget FIFO reference) on the same work.

* :class:`StudyDefinition` / :class:`Budget` / search-space domains: what a study is (``studies/*.py``);
* :func:`get_study` / :func:`list_studies` / :func:`register_study`: the registry;
* :func:`run_study`: runs the arms on Ray Tune (or Optuna), tracked in MLflow, and returns a
  :class:`StudyResult` with the comparison table;
* :func:`summarize_arm` / :func:`comparison_table`: the table from plain trial records (also what
  ``neve-tune study compare`` rebuilds from MLflow).

The protocol (SPEC §4): every arm gets the same sampled configurations, trial count, seed and epoch cap.
The ``neve`` arm trains on 100% of the training split with a noise aux set, and NeVe decays its LR and
stops it; ``asha`` holds out 10% for validation, uses a fixed LR schedule and ASHA prunes on validation
accuracy; ``fifo`` is ``asha`` without pruning (the compute reference). The test split is only reported.
"""

from __future__ import annotations

from ._compare import (
    PICK_RULES,
    ArmResult,
    ArmSummary,
    TrialRecord,
    comparison_csv,
    comparison_markdown,
    comparison_table,
    pick_trial,
    summarize_arm,
)
from ._registry import BUILTIN_STUDIES, UnknownStudyError, get_study, list_studies, register_study
from ._spec import (
    Budget,
    Choice,
    DataRequest,
    DatasetData,
    LogUniform,
    NeVeSettings,
    StudyData,
    StudyDefinition,
    StudyError,
    TensorData,
    Uniform,
    sample_configs,
)
from ._trial import ARMS, TrialSpec, run_trial

__all__ = [
    "ARMS",
    "BUILTIN_STUDIES",
    "PICK_RULES",
    "ArmResult",
    "ArmSummary",
    "Budget",
    "Choice",
    "DataRequest",
    "DatasetData",
    "LogUniform",
    "NeVeSettings",
    "StudyData",
    "StudyDefinition",
    "StudyError",
    "StudyResult",
    "TensorData",
    "TrialRecord",
    "TrialSpec",
    "Uniform",
    "UnknownStudyError",
    "comparison_csv",
    "comparison_markdown",
    "comparison_table",
    "get_study",
    "list_studies",
    "pick_trial",
    "register_study",
    "run_study",
    "run_trial",
    "sample_configs",
    "summarize_arm",
]


def __getattr__(name: str) -> object:
    # The runner imports Ray/MLflow machinery: load it only when asked for.
    if name in ("run_study", "StudyResult"):
        from . import _runner

        return getattr(_runner, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
