"""One study run as checked before any training: the definition, arms, budget, seeds and backend."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._arm import Arm
from ._arms import get_arm, list_arms
from ._backend import Backend, resolve_backend
from ._options import StudyOptions, check_output_dir, check_resources, check_seeds, check_tracking_scheme
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


def check_aux_set(plan: Plan) -> None:
    """Run the study's aux set once through a freshly built model, in the driver, before any trial trains.

    Only when an arm measures velocity (a NeVe arm, or ``budget.monitor_baselines``). A model that cannot
    take it (float noise into an ``nn.Embedding``) would otherwise fail every such trial at its first
    measurement. 8 samples of ``make_aux`` (or of the default noise; the budget's ``aux_samples`` when
    fewer), the fewest the monitor measures without warning that the set is too small, with the first seed,
    the first sampled configuration, on the CPU; the global RNG is left as it was. ``make_aux`` is called
    twice: the same ``(n, seed)`` must give the same inputs (every trial, arm and resumed checkpoint measures
    on them).

    Raises:
        StudyError: ``make_aux`` raised, or gave different inputs for the same ``(n, seed)``, or the forward
            failed (the message shows the error and names ``make_aux=`` and ``neve_tune.token_aux``).
    """
    definition, budget = plan.definition, plan.budget
    if not (budget.monitor_baselines or any(arm.uses_neve for arm in plan.arms)):
        return
    import torch

    from neve_tune import VelocityMonitor
    from neve_tune._measure.auxchecks import MIN_AUX_SAMPLES

    seed, n = plan.seeds[0], min(MIN_AUX_SAMPLES, budget.neve.aux_samples)
    config = definition.configs(1, seed)[0]
    given = (
        f"make_aux={getattr(definition.make_aux, '__qualname__', definition.make_aux)}"
        if definition.make_aux is not None
        else f"the default aux set, float noise shaped like input_shape={definition.input_shape}"
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = definition.build_model(config)
        aux, again = _aux_twice(definition, n, seed, given)
    if not _same_inputs(aux, again):
        raise StudyError(
            f"The study {definition.name!r} ({given}) gave different aux sets for the same (n, seed) = ({n}, {seed}):"
            " every trial, arm and resumed checkpoint must measure the velocity on the same inputs. Draw them"
            " from a generator seeded by seed, e.g. torch.randn(n, ..., generator=torch.Generator().manual_seed(seed)),"
            " or use neve_tune.noise_aux(shape, n=n, seed=seed) / token_aux(..., n=n, seed=seed)."
        )
    try:
        monitor = VelocityMonitor(model, aux, momentum=budget.neve.momentum)
        try:
            monitor.measure()
        finally:
            monitor.close()
    except Exception as err:
        raise StudyError(
            f"The aux set of the study {definition.name!r} does not go through its model ({given}): "
            f"{type(err).__name__}: {str(err).rstrip('.')}. NeVe measures the model's responses to it, so every trial "
            "that measures velocity would fail. Give StudyDefinition(make_aux=...) a function (n, seed) -> inputs "
            "the model takes; for token ids (an nn.Embedding first layer): make_aux=lambda n, seed: "
            "neve_tune.token_aux(vocab_size, seq_len, n=n, seed=seed)."
        ) from err


def _aux_twice(definition: StudyDefinition, n: int, seed: int, given: str) -> tuple[Any, Any]:
    """``definition.aux(n, seed)`` twice; a ``StudyError`` naming the function when it raises."""
    try:
        return definition.aux(n, seed), definition.aux(n, seed)
    except Exception as err:
        raise StudyError(
            f"The study {definition.name!r} could not build its aux set: {given} raised on (n, seed) = ({n}, {seed})"
            f" {type(err).__name__}: {err}. Every trial calls it to build the inputs NeVe measures on: fix it to"
            " return them for any n >= 1 and seed (a tensor, a dict of tensors, or a list of batches)."
        ) from err


def _same_inputs(a: Any, b: Any) -> bool:
    """Whether two aux sets hold equal tensors (tensors, mappings and sequences of them; anything else: yes)."""
    import torch

    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same_inputs(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_inputs(x, y) for x, y in zip(a, b, strict=True))
    return True


def make_plan(study: str | StudyDefinition, options: StudyOptions) -> tuple[Plan, Backend]:
    """Check everything that needs no training (study, arms, seeds, backend, resources, tracking scheme,
    output folder) and return the plan and its backend (not opened yet). Raises ``StudyError`` /
    ``UnknownStudyError``."""
    definition, spec_study = _resolve(study)
    arms = check_arms(options.arms)
    seeds = check_seeds(options)
    backend = resolve_backend(options.backend)
    budget = _budget(definition, options)
    check_resources(budget, backend)
    if options.track:
        check_tracking_scheme(options.tracking_uri)
    output = check_output_dir(options.output_dir)
    plan = Plan(
        definition=definition,
        spec_study=spec_study,
        arms=arms,
        budget=budget,
        seeds=seeds,
        options=options,
        backend_name=backend.name,
        output=output,
        stamp=time.strftime("%Y%m%d-%H%M%S"),
    )
    return plan, backend


__all__ = ["Plan", "check_arms", "check_aux_set", "make_plan"]
