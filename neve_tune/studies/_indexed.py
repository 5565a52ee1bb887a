"""A map-style dataset whose items carry their index, for ``DatasetData.indexed_train_batches``."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["Indexed"]


class Indexed(torch.utils.data.Dataset):
    """A map-style dataset whose items carry their index: ``(x, y, index)``."""

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        return (*self.dataset[index], index)
