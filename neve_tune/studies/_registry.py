"""The registry of studies: name -> :class:`StudyDefinition`.

The built-in studies live in :mod:`neve_tune.studies.builtin` and are imported on first use.
"""

from __future__ import annotations

import importlib

from ._spec import StudyDefinition

#: Built-in studies: name -> "module:attribute". Imported on first use, so ``digits`` never imports torchvision.
BUILTIN_STUDIES: dict[str, str] = {
    "digits": "neve_tune.studies.builtin.digits:STUDY",
    "mnist1d": "neve_tune.studies.builtin.mnist1d:STUDY",
    "mnist1d-noisy": "neve_tune.studies.builtin.mnist1d:NOISY_STUDY",
    "listops": "neve_tune.studies.builtin.listops:STUDY",
    "cifar10": "neve_tune.studies.builtin.cifar:CIFAR10_STUDY",
    "cifar100": "neve_tune.studies.builtin.cifar:CIFAR100_STUDY",
    "imagenet100": "neve_tune.studies.builtin.imagenet100:STUDY",
}

_REGISTERED: dict[str, StudyDefinition] = {}


class UnknownStudyError(KeyError):
    """The study name is not registered; the message lists the known ones."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def register_study(definition: StudyDefinition, *, replace: bool = False) -> None:
    """Make ``definition`` available by its name (e.g. to ``neve-tune study run``)."""
    if not isinstance(definition, StudyDefinition):
        raise TypeError(f"{type(definition).__name__} is not a StudyDefinition")
    if not replace and (definition.name in _REGISTERED or definition.name in BUILTIN_STUDIES):
        raise ValueError(f"A study named {definition.name!r} exists already; pass replace=True to override it.")
    _REGISTERED[definition.name] = definition


def list_studies() -> list[str]:
    """The names of every known study."""
    return sorted({*BUILTIN_STUDIES, *_REGISTERED})


def get_study(name: str) -> StudyDefinition:
    """The study called ``name``, or ``module.path:ATTRIBUTE`` for a definition in your own module.

    Raises:
        UnknownStudyError: no such study (the message lists the known ones).
    """
    if name in _REGISTERED:
        return _REGISTERED[name]
    target = BUILTIN_STUDIES.get(name)
    if target is None and ":" in name:
        target = name
    if target is None:
        raise UnknownStudyError(
            f"Unknown study {name!r}. Known studies: {', '.join(list_studies())} "
            "(or pass your own as 'package.module:DEFINITION')."
        )
    module_name, _, attribute = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if name not in BUILTIN_STUDIES and err.name and module_name.startswith(err.name):
            raise UnknownStudyError(f"Cannot import study module {module_name!r} ({err}).") from err
        raise
    definition = getattr(module, attribute, None)
    if not isinstance(definition, StudyDefinition):
        raise UnknownStudyError(f"{target!r} is not a StudyDefinition (found {type(definition).__name__}).")
    return definition
