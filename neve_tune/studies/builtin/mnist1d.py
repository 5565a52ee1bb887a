"""MNIST-1D (Greydanus, 2020, "Scaling down deep learning"): a CPU benchmark that does not saturate.

Ten 1-D digit templates, each shifted, scaled, sheared, smoothed and corrupted with correlated noise into
a 40-sample signal. The ``mnist1d`` package (Apache-2.0, from PyPI) generates it procedurally with the
published default arguments (5,000 samples, 4,000 train / 1,000 test, seed 42), so nothing is downloaded.
The paper's reference accuracies on its test split: logistic regression 32%, MLP 68%, GRU 91%, CNN 94%:
unlike digits, a good configuration and a poor one differ by several points.

``mnist1d-noisy`` is the same study with 20% of the training labels flipped (symmetric noise: a flipped
label is another class, uniformly, drawn once from a fixed seed). The baselines' validation split is cut
from those noisy labels, as it would be in real life; the test split stays clean. It is where a
validation-free method must see memorisation (a network fitting the wrong labels) by itself.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import nn

from neve_tune.studies import (
    Budget,
    Choice,
    DataRequest,
    Domain,
    LogUniform,
    NeVeSettings,
    StudyDefinition,
    StudyError,
    TensorData,
)

SIGNAL_LENGTH = 40
INPUT_SHAPE = (1, SIGNAL_LENGTH)
NUM_CLASSES = 10
#: ``mnist1d-noisy``: the share of training labels flipped, and the seed of the flips (fixed: the same
#: labels in every study seed, as a real noisy dataset would be).
NOISE_FRACTION = 0.2
NOISE_SEED = 1234


_LOCK = threading.Lock()
_CACHE: dict[tuple[int, int], dict[str, np.ndarray]] = {}


def _require_mnist1d(data_root: str | None = None) -> None:
    """Raise ``StudyError`` saying what to install when the ``mnist1d`` package is missing (the study's
    ``prepare``: the driver checks it before any trial starts)."""
    try:
        import mnist1d.data  # noqa: F401
    except ImportError as err:
        raise StudyError(
            f"The mnist1d study needs the mnist1d package ({err}): pip install 'neve_tune[studies]' "
            "(or pip install mnist1d)."
        ) from err


def generate_mnist1d(*, seed: int = 42, num_samples: int = 5000) -> dict[str, np.ndarray]:
    """The MNIST-1D arrays (``x``, ``y``, ``x_test``, ``y_test``) from the package's own generator.

    ``seed`` and ``num_samples`` default to the published dataset's arguments; the other arguments are the
    package's defaults. Deterministic: the package draws from the global ``random``/``numpy`` generators,
    so generation holds a lock (trials in threads of one process) and restores their states afterwards.
    Generated once per process (a few seconds) and cached; each call returns copies.

    Raises:
        StudyError: the ``mnist1d`` package is not installed.
    """
    _require_mnist1d()
    from mnist1d.data import get_dataset_args, make_dataset

    key = (int(seed), int(num_samples))
    with _LOCK:
        if key not in _CACHE:
            states = random.getstate(), np.random.get_state()
            try:
                args = get_dataset_args()
                args.seed, args.num_samples = key
                data = make_dataset(args)
            finally:
                random.setstate(states[0])
                np.random.set_state(states[1])
            _CACHE[key] = {k: np.asarray(data[k]) for k in ("x", "y", "x_test", "y_test")}
        cached = _CACHE[key]
    return {k: v.copy() for k, v in cached.items()}


def flip_labels(y: torch.Tensor, fraction: float, *, seed: int, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """A copy of ``y`` with each label flipped with probability ``fraction`` to another class, uniformly.

    Symmetric label noise drawn from its own ``torch.Generator`` seeded with ``seed`` (the global RNG is not
    touched): the same labels every time.
    """
    g = torch.Generator().manual_seed(seed)
    y = y.clone()
    flip = torch.rand(len(y), generator=g) < fraction
    y[flip] = (y[flip] + torch.randint(1, num_classes, (int(flip.sum()),), generator=g)) % num_classes
    return y


def load_data(request: DataRequest, *, label_noise: float = 0.0) -> TensorData:
    """MNIST-1D as tensors shaped (N, 1, 40): its own test split; ``request.val_fraction`` of train held out.

    The train/test split is the dataset's own (it never depends on the study seed); the validation hold-out
    of the baseline arms is a stratified split of the training part drawn with ``request.seed``. With
    ``label_noise`` that share of the training labels is flipped first (:func:`flip_labels`,
    ``NOISE_SEED``), so the validation split holds noisy labels too; the test labels stay clean.
    """
    from sklearn.model_selection import train_test_split

    data = generate_mnist1d()
    x = torch.tensor(data["x"], dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(data["y"], dtype=torch.long)
    if label_noise:
        y = flip_labels(y, label_noise, seed=NOISE_SEED)
        data["y"] = y.numpy()
    x_test = torch.tensor(data["x_test"], dtype=torch.float32).unsqueeze(1)
    y_test = torch.tensor(data["y_test"], dtype=torch.long)
    x_val, y_val = x[:0], y[:0]
    if request.val_fraction > 0:
        train_idx, val_idx = train_test_split(
            np.arange(len(y)), test_size=request.val_fraction, stratify=data["y"], random_state=request.seed
        )
        x_val, y_val = x[val_idx], y[val_idx]
        x, y = x[train_idx], y[train_idx]
    return TensorData(x, y, x_val, y_val, x_test, y_test, batch_size=request.batch_size)


class MNIST1DCNN(nn.Module):
    """The paper's small 1-D CNN (three strided convolutions and a linear head), with a width option."""

    def __init__(self, width: int = 25, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(1, width, 5, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(width, width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(width, width, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        with torch.no_grad():
            flat = self.features(torch.zeros(1, *INPUT_SHAPE)).numel()
        self.head = nn.Linear(flat, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def build_model(config: Mapping[str, Any]) -> nn.Module:
    """The MNIST-1D CNN of a trial config (``width`` from the search space)."""
    return MNIST1DCNN(width=int(config.get("width", 25)))


#: SGD momentum 0.9; lr up to 0.5 diverges or stalls for some configurations, on purpose.
SEARCH_SPACE: dict[str, Domain] = {
    "lr": LogUniform(3e-3, 0.5),
    "weight_decay": LogUniform(1e-5, 1e-2),
    "width": Choice((16, 32, 64)),
}

STUDY = StudyDefinition(
    name="mnist1d",
    description="MNIST-1D (Greydanus 2020), 1-D CNN, CPU, minutes; does not saturate (CNN ~94%)",
    input_shape=INPUT_SHAPE,
    num_classes=NUM_CLASSES,
    build_model=build_model,
    load_data=load_data,
    search_space=SEARCH_SPACE,
    budget=Budget(
        trials=16,
        max_epochs=60,
        batch_size=64,
        val_fraction=0.1,
        grace_period=4,
        reduction_factor=3,
        lr_schedule="cosine",
        neve=NeVeSettings(),
    ),
    prepare=_require_mnist1d,
    data_note="generated by the mnist1d package with the published arguments (nothing to download)",
)


def load_noisy_data(request: DataRequest) -> TensorData:
    """:func:`load_data` with ``NOISE_FRACTION`` of the training labels flipped (the ``mnist1d-noisy`` study)."""
    return load_data(request, label_noise=NOISE_FRACTION)


NOISY_STUDY = replace(
    STUDY,
    name="mnist1d-noisy",
    description="MNIST-1D with 20% of the training labels flipped (validation split noisy too, test clean)",
    load_data=load_noisy_data,
    data_note=STUDY.data_note + f"; {NOISE_FRACTION:.0%} of the training labels flipped (seed {NOISE_SEED})",
)
