"""scikit-learn's bundled 8x8 digits: the embedded, CPU-only default study.

The data ship inside scikit-learn (1,797 images, 10 classes), so nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

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
    TensorData,
)

INPUT_SHAPE = (1, 8, 8)
NUM_CLASSES = 10


@dataclass(frozen=True)
class DigitsSplits:
    """Tensors of one split of digits. ``x_val``/``y_val`` are empty when no validation is held out."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def labelled_fraction_for_training(self) -> float:
        """Fraction of the labelled (non-test) data that trains the model."""
        n_train, n_val = len(self.y_train), len(self.y_val)
        return n_train / (n_train + n_val)


def load_digits_splits(*, test_size: float = 0.25, val_fraction: float = 0.0, seed: int = 0) -> DigitsSplits:
    """Stratified train/(val)/test splits of digits, pixels scaled to [0, 1], shaped (N, 1, 8, 8).

    ``val_fraction`` is the fraction of the *training* split held out for validation (0 for NeVe).
    The test split depends only on ``test_size`` and ``seed``, so every arm sees the same test set.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    idx = list(range(len(y)))
    train_idx, test_idx = train_test_split(idx, test_size=test_size, stratify=digits.target, random_state=seed)
    val_idx: list[int] = []
    if val_fraction > 0:
        train_idx, val_idx = train_test_split(
            train_idx, test_size=val_fraction, stratify=digits.target[train_idx], random_state=seed
        )

    def take(ix: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.tensor(ix, dtype=torch.long)
        return x[t], y[t]

    (xtr, ytr), (xv, yv), (xte, yte) = take(train_idx), take(val_idx), take(test_idx)
    return DigitsSplits(xtr, ytr, xv, yv, xte, yte)


class DigitsCNN(nn.Module):
    """A small CNN for 8x8 digits: two conv/BN/ReLU blocks and a linear head."""

    def __init__(self, width: int = 16, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.head = nn.Linear(2 * width * 4 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


# ---------------------------------------------------------------------------- the study definition


def build_model(config: Mapping[str, Any]) -> nn.Module:
    """The digits CNN of a trial config (``width`` from the search space)."""
    return DigitsCNN(width=int(config.get("width", 16)))


def load_data(request: DataRequest) -> TensorData:
    """Digits as in-memory tensors: 25% test, ``request.val_fraction`` of the rest held out (baselines)."""
    splits = load_digits_splits(val_fraction=request.val_fraction, seed=request.seed)
    return TensorData(
        splits.x_train,
        splits.y_train,
        splits.x_val,
        splits.y_val,
        splits.x_test,
        splits.y_test,
        batch_size=request.batch_size,
    )


#: lr up to 1.0 with SGD momentum 0.9: the top of the range diverges for some widths, on purpose.
SEARCH_SPACE: dict[str, Domain] = {
    "lr": LogUniform(1e-3, 1.0),
    "weight_decay": LogUniform(1e-5, 1e-2),
    "width": Choice((8, 16, 32)),
}

STUDY = StudyDefinition(
    name="digits",
    description="scikit-learn's 8x8 digits, small CNN, CPU, minutes (the embedded default)",
    input_shape=INPUT_SHAPE,
    num_classes=NUM_CLASSES,
    build_model=build_model,
    load_data=load_data,
    search_space=SEARCH_SPACE,
    budget=Budget(
        trials=20,
        max_epochs=50,
        batch_size=64,
        val_fraction=0.1,
        grace_period=4,
        reduction_factor=3,
        lr_schedule="cosine",
        neve=NeVeSettings(),  # the paper's defaults: patience 10, factor 0.5, threshold 1e-3, 100 noise samples
    ),
    data_note="bundled with scikit-learn (nothing to download)",
)
