"""What a study is: model, data, search space and budget, shared by every arm.

A study definition is a :class:`StudyDefinition` (the built-in ones are in :mod:`neve_tune.studies.builtin`).
The runner samples the trial configurations once from :attr:`StudyDefinition.search_space` with the study
seed, and gives the *same* configurations, trial count, seed and epoch cap to every arm.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from ._indexed import Indexed

if TYPE_CHECKING:
    from neve_tune._measure.inputs import AuxInput

#: ``StudyDefinition.make_aux``: ``(n, seed) -> aux set``.
MakeAux = Callable[[int, int], "AuxInput"]
#: ``StudyDefinition.build_optimizer``: ``(params, config) -> optimizer``.
BuildOptimizer = Callable[[Iterable[nn.Parameter], Mapping[str, Any]], torch.optim.Optimizer]


class StudyError(RuntimeError):
    """A study cannot run as asked (bad option, missing resources); raised before any training."""


# ---------------------------------------------------------------------------- search space


def _round_sig(x: float, digits: int = 3) -> float:
    if x == 0 or not math.isfinite(x):
        return x
    return round(x, digits - 1 - math.floor(math.log10(abs(x))))


@dataclass(frozen=True)
class LogUniform:
    """A float drawn log-uniformly from ``[low, high]`` (rounded to 3 significant digits)."""

    low: float
    high: float

    def __post_init__(self) -> None:
        if not 0 < self.low < self.high:
            raise ValueError(f"LogUniform needs 0 < low < high, but got low={self.low}, high={self.high}.")

    def sample(self, rng: torch.Generator) -> float:
        u = float(torch.rand((), generator=rng, dtype=torch.float64))
        return _round_sig(math.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low))))


@dataclass(frozen=True)
class Uniform:
    """A float drawn uniformly from ``[low, high]`` (rounded to 3 significant digits)."""

    low: float
    high: float

    def __post_init__(self) -> None:
        if not self.low < self.high:
            raise ValueError(f"Uniform needs low < high, but got low={self.low}, high={self.high}.")

    def sample(self, rng: torch.Generator) -> float:
        u = float(torch.rand((), generator=rng, dtype=torch.float64))
        return _round_sig(self.low + u * (self.high - self.low))


@dataclass(frozen=True)
class Choice:
    """One of ``values``, uniformly."""

    values: tuple[Any, ...]

    def __post_init__(self) -> None:
        if not self.values:
            raise ValueError("Choice needs at least one value.")

    def sample(self, rng: torch.Generator) -> Any:
        return self.values[int(torch.randint(len(self.values), (), generator=rng))]


Domain = LogUniform | Uniform | Choice


def sample_configs(space: Mapping[str, Domain], n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` configurations drawn from ``space`` with their own generator seeded by ``seed``.

    Each gets a ``config_id`` (0..n-1). The same (space, n, seed) always gives the same list, so every arm
    of a study trains exactly the same configurations.
    """
    if n < 1:
        raise ValueError(f"The number of trials must be >= 1, but got {n}.")
    rng = torch.Generator().manual_seed(int(seed))
    configs = []
    for i in range(n):
        config: dict[str, Any] = {"config_id": i}
        for name in sorted(space):
            config[name] = space[name].sample(rng)
        configs.append(config)
    return configs


# ---------------------------------------------------------------------------- data


@runtime_checkable
class StudyData(Protocol):
    """The splits one trial trains and evaluates on.

    ``num_val`` is 0 for an arm that holds nothing out (``neve``). The test split is only ever reported,
    never used for a decision.
    """

    @property
    def num_train(self) -> int: ...

    @property
    def num_val(self) -> int: ...

    @property
    def num_test(self) -> int: ...

    def train_batches(self, generator: torch.Generator) -> Iterable[tuple[Tensor, Tensor]]: ...

    def eval_batches(self, split: str) -> Iterable[tuple[Tensor, Tensor]]: ...


@dataclass
class TensorData:
    """In-memory splits (small datasets such as digits): shuffled minibatches from a seeded generator."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    batch_size: int = 64
    eval_batch_size: int = 1024

    @property
    def num_train(self) -> int:
        return len(self.y_train)

    @property
    def num_val(self) -> int:
        return len(self.y_val)

    @property
    def num_test(self) -> int:
        return len(self.y_test)

    def train_batches(self, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
        return ((x, y) for x, y, _ in self.indexed_train_batches(generator))

    def indexed_train_batches(self, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """:meth:`train_batches` with the samples' dataset indices: ``(x, y, index)``, in the same order."""
        order = torch.randperm(self.num_train, generator=generator)
        for i in range(0, self.num_train, self.batch_size):
            idx = order[i : i + self.batch_size]
            yield self.x_train[idx], self.y_train[idx], idx

    def eval_batches(self, split: str) -> Iterator[tuple[Tensor, Tensor]]:
        x, y = {"val": (self.x_val, self.y_val), "test": (self.x_test, self.y_test)}[split]
        for i in range(0, len(y), self.eval_batch_size):
            yield x[i : i + self.eval_batch_size], y[i : i + self.eval_batch_size]


@dataclass
class DatasetData:
    """Map-style datasets served by ``DataLoader`` s (torchvision datasets); ``val`` may be ``None``."""

    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset | None
    test: torch.utils.data.Dataset
    batch_size: int = 128
    eval_batch_size: int = 512
    num_workers: int = 0
    pin_memory: bool = False

    @property
    def num_train(self) -> int:
        return len(self.train)  # type: ignore[arg-type]

    @property
    def num_val(self) -> int:
        return 0 if self.val is None else len(self.val)  # type: ignore[arg-type]

    @property
    def num_test(self) -> int:
        return len(self.test)  # type: ignore[arg-type]

    def _loader(self, dataset: torch.utils.data.Dataset, **kw: Any) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            dataset,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=False,
            **kw,
        )

    def train_batches(self, generator: torch.Generator) -> Iterable[tuple[Tensor, Tensor]]:
        return self._loader(self.train, batch_size=self.batch_size, shuffle=True, generator=generator, drop_last=False)

    def indexed_train_batches(self, generator: torch.Generator) -> Iterable[tuple[Tensor, Tensor, Tensor]]:
        indexed = Indexed(self.train)  # items (x, y, index): the same order as train_batches
        return self._loader(indexed, batch_size=self.batch_size, shuffle=True, generator=generator, drop_last=False)

    def eval_batches(self, split: str) -> Iterable[tuple[Tensor, Tensor]]:
        dataset = {"val": self.val, "test": self.test}[split]
        if dataset is None:
            return []
        return self._loader(dataset, batch_size=self.eval_batch_size, shuffle=False)


@dataclass(frozen=True)
class DataRequest:
    """What a trial asks its study's loader for.

    Attributes:
        val_fraction: fraction of the training split held out for validation (0 for the NeVe arm).
        seed: the study seed (the test split and the validation split depend only on it).
        batch_size: training minibatch size (from the budget).
        data_root: where the dataset lives or is downloaded to (``None``: the study's default).
        num_workers: DataLoader workers.
        augment: whether training batches get the study's standard augmentation.
    """

    val_fraction: float
    seed: int
    batch_size: int
    data_root: str | None = None
    num_workers: int = 0
    augment: bool = True


# ---------------------------------------------------------------------------- budget and definition


@dataclass(frozen=True)
class NeVeSettings:
    """The NeVe arm's controller and stop settings (``neve_tune.NeVe`` arguments)."""

    patience: int = 10
    factor: float = 0.5
    stop_threshold: float = 1e-3
    momentum: float = 0.5
    aux_samples: int = 100


@dataclass(frozen=True)
class Budget:
    """The work every arm gets: the same trials, epoch cap, batch size and optimizer (immutable, validated).

    Attributes:
        trials: configurations sampled from the search space (the same ones for every arm).
        max_epochs: epoch cap of every trial (ASHA's ``max_t``; NeVe's ``max_t``; FIFO's fixed length).
        batch_size: training minibatch size.
        val_fraction: validation hold-out of the baseline arms (fraction of the training split).
        grace_period: ASHA's minimum epochs before pruning.
        reduction_factor: ASHA's reduction factor.
        lr_schedule: the baselines' fixed schedule: ``"cosine"`` (to 0 at ``max_epochs``) or
            ``"step"`` (x0.1 at 50% and 75% of ``max_epochs``).
        momentum: SGD momentum (all arms).
        neve: the NeVe arm's settings.
        monitor_baselines: also *measure* velocity in the baseline arms (no decision uses it), for plots.
        checkpoint_every: checkpoint each trial every k epochs (0: never), so failed trials resume.
        max_failures: restart a trial that raised this many times (Ray), from its last checkpoint.
        cpus_per_trial, gpus_per_trial: default Ray resources of a trial.
    """

    trials: int
    max_epochs: int
    batch_size: int = 64
    val_fraction: float = 0.1
    grace_period: int = 3
    reduction_factor: int = 3
    lr_schedule: str = "cosine"
    momentum: float = 0.9
    neve: NeVeSettings = field(default_factory=NeVeSettings)
    monitor_baselines: bool = True
    checkpoint_every: int = 0
    max_failures: int = 0
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0

    def __post_init__(self) -> None:
        if self.trials < 1:
            raise ValueError(f"trials must be >= 1, but got trials={self.trials}.")
        if self.max_epochs < 1:
            raise ValueError(f"max_epochs must be >= 1, but got max_epochs={self.max_epochs}.")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), but got val_fraction={self.val_fraction}.")
        if self.lr_schedule not in ("cosine", "step"):
            raise ValueError(f"lr_schedule must be 'cosine' or 'step', but got lr_schedule={self.lr_schedule!r}.")

    def with_overrides(self, **changes: Any) -> Budget:
        """A copy with the non-``None`` ``changes`` applied; ``grace_period`` is kept <= ``max_epochs``."""
        changes = {k: v for k, v in changes.items() if v is not None}
        budget = replace(self, **changes)
        if budget.grace_period > budget.max_epochs:
            budget = replace(budget, grace_period=budget.max_epochs)
        return budget


@dataclass(frozen=True)
class StudyDefinition:
    """One benchmark: model factory, data loader, search space and budget (immutable).

    Runs pass it to Ray workers by registry name (or pickled, for a definition of your own). It computes no
    metric, so it has no NaN policy of its own: see :func:`neve_tune.studies.run_trial`.

    Attributes:
        name: registry name (``neve-tune study run NAME``).
        description: one line for ``neve-tune study list``.
        input_shape: one input's shape (the default aux set, float noise, has this shape).
        num_classes: number of classes.
        build_model: trial config -> a fresh, untrained model.
        load_data: :class:`DataRequest` -> :class:`StudyData`. Runs inside each trial.
        search_space: hyperparameter name -> :class:`LogUniform` / :class:`Uniform` / :class:`Choice`.
            Every trial config goes to ``build_model`` and ``build_optimizer`` (the default optimizer reads
            ``lr`` and ``weight_decay``).
        budget: the default :class:`Budget`.
        prepare: optional, called once in the driver before any trial (e.g. download the dataset), with
            the data root.
        data_note: what ``load_data`` needs on disk (shown in errors).
        make_aux: ``(n, seed) -> aux set``: the ``n`` inputs whose responses NeVe measures (the ``neve``
            arms, and the baselines' velocity monitor), anything :class:`neve_tune.NeVe` accepts: a tensor,
            a dict of tensors (``model(**batch)``), an iterable of batches. The same ``(n, seed)`` must give
            the same set. ``None``: ``neve_tune.noise_aux(input_shape, n=n, seed=seed)``, float noise, which
            a model with an ``nn.Embedding`` first layer cannot take: give it token ids, e.g.
            ``make_aux=lambda n, seed: neve_tune.token_aux(vocab_size, seq_len, n=n, seed=seed)`` (a
            module-level function pickles to Ray workers; a lambda does only inside the definition's module
            when the study is passed by name). ``run_study`` runs it once through a fresh model before any
            trial trains.
        build_optimizer: ``(params, config) -> torch.optim.Optimizer``: every trial's optimizer, from its
            model's parameters and its sampled configuration (``lr``, ``weight_decay``, ``betas``, ... and
            ``config_id``), e.g. ``lambda params, c: torch.optim.AdamW(params, lr=c["lr"],
            weight_decay=c["weight_decay"])``. Every arm uses it, except ``schedulefree``, whose optimizer is
            the method. ``None``: SGD with the budget's momentum and the config's ``lr`` and
            ``weight_decay``. NeVe's decay, the baselines' cosine/step schedules and the anneal change the
            ``lr`` of every param group.
    """

    name: str
    description: str
    input_shape: tuple[int, ...]
    num_classes: int
    build_model: Callable[[Mapping[str, Any]], nn.Module]
    load_data: Callable[[DataRequest], StudyData]
    search_space: Mapping[str, Domain]
    budget: Budget
    prepare: Callable[[str | None], None] | None = None
    data_note: str = ""
    make_aux: MakeAux | None = None
    build_optimizer: BuildOptimizer | None = None

    def aux(self, n: int, seed: int) -> AuxInput:
        """The aux set of ``n`` samples for ``seed``: ``make_aux(n, seed)``, or float noise shaped like
        ``input_shape``."""
        if self.make_aux is not None:
            return self.make_aux(n, seed)
        from neve_tune import noise_aux

        return noise_aux(self.input_shape, n=n, seed=seed)

    def configs(self, trials: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
        """The trial configurations every arm trains (see :func:`sample_configs`)."""
        return sample_configs(self.search_space, trials or self.budget.trials, seed)


def search_space_params(space: Mapping[str, Domain]) -> dict[str, str]:
    """The search space as readable MLflow params (``space.lr = LogUniform(0.001, 1.0)``)."""
    return {f"space.{name}": repr(domain) for name, domain in sorted(space.items())}


__all__: Sequence[str] = [
    "Budget",
    "BuildOptimizer",
    "Choice",
    "DataRequest",
    "DatasetData",
    "Domain",
    "LogUniform",
    "MakeAux",
    "NeVeSettings",
    "StudyData",
    "StudyDefinition",
    "StudyError",
    "TensorData",
    "Uniform",
    "sample_configs",
    "search_space_params",
]
