"""One study run as checked before any training: the definition, arms, budget, seeds and backend."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ._arm import Arm
from ._arms import get_arm, list_arms
from ._backend import Backend, resolve_backend
from ._options import StudyOptions, check_resources, check_seeds, check_tracking_scheme
from ._registry import BUILTIN_STUDIES, get_study
from ._spec import Budget, StudyDefinition, StudyError


def _resolve(study: str | StudyDefinition) -> tuple[StudyDefinition, str | StudyDefinition]:
    if isinstance(study, StudyDefinition):
        return study, (study.name if study.name in BUILTIN_STUDIES else study)
    definition = get_study(study)
    return definition, study


def check_arms(arms: Sequence[str]) -> list[Arm]:
    """The registered arms of these names (order kept, duplicates dropped); ``UnknownArmError`` otherwise."""
    out: list[Arm] = []
    for name in arms:
        arm = get_arm(name)
        if arm.name not in [a.name for a in out]:
            out.append(arm)
    if not out:
        raise StudyError(f"Give at least one arm ({', '.join(list_arms())}).")
    for arm in out:
        arm.policy.check_available()  # e.g. the schedulefree package
    return out


def _budget(definition: StudyDefinition, options: StudyOptions) -> Budget:
    budget = definition.budget.with_overrides(
        trials=options.trials,
        max_epochs=options.max_epochs,
        cpus_per_trial=options.cpus_per_trial,
        gpus_per_trial=options.gpus_per_trial,
    )
    if budget.cpus_per_trial <= 0 or budget.gpus_per_trial < 0:
        raise StudyError(
            f"cpus_per_trial must be > 0 and gpus_per_trial >= 0, but got {budget.cpus_per_trial} and "
            f"{budget.gpus_per_trial}."
        )
    return budget


@dataclass(frozen=True)
class Plan:
    """One study run, as checked before any training."""

    definition: StudyDefinition
    spec_study: str | StudyDefinition
    arms: list[Arm]
    budget: Budget
    seeds: tuple[int, ...]
    options: StudyOptions
    backend_name: str
    output: Path
    stamp: str

    @property
    def fallback_dir(self) -> Path:
        return self.output / "mlflow-unsent"


def make_plan(study: str | StudyDefinition, options: StudyOptions) -> tuple[Plan, Backend]:
    """Check everything that needs no training (study, arms, seeds, backend, resources, tracking scheme)
    and return the plan and its backend (not opened yet). Raises ``StudyError`` / ``UnknownStudyError``."""
    definition, spec_study = _resolve(study)
    arms = check_arms(options.arms)
    seeds = check_seeds(options)
    backend = resolve_backend(options.backend)
    budget = _budget(definition, options)
    check_resources(budget, backend)
    if options.track:
        check_tracking_scheme(options.tracking_uri)
    plan = Plan(
        definition=definition,
        spec_study=spec_study,
        arms=arms,
        budget=budget,
        seeds=seeds,
        options=options,
        backend_name=backend.name,
        output=Path(options.output_dir).resolve(),
        stamp=time.strftime("%Y%m%d-%H%M%S"),
    )
    return plan, backend


__all__ = ["Plan", "check_arms", "make_plan"]
