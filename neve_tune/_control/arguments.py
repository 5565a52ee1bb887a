"""What :class:`~neve_tune.NeVe` reads from its arguments: the number of classes, the training loss."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["as_loss", "infer_num_classes"]


def infer_num_classes(model: nn.Module) -> int | None:
    """The output width of the model's last module with parameters, when it is an ``nn.Linear`` (>= 2)."""
    last: nn.Module | None = None
    for module in model.modules():
        if next(module.parameters(recurse=False), None) is not None:
            last = module
    if isinstance(last, nn.Linear) and last.out_features >= 2:
        return int(last.out_features)
    return None


def as_loss(train_loss: float | torch.Tensor | None) -> float | None:
    """``train_loss`` as a float (``None`` stays ``None``); a tensor must hold one element."""
    if train_loss is None:
        return None
    if isinstance(train_loss, torch.Tensor):
        if train_loss.numel() != 1:
            raise TypeError(
                f"train_loss must be a number or a one-element tensor, but got a tensor of shape"
                f" {tuple(train_loss.shape)}; pass the epoch's mean loss, e.g. `neve.step(loss.item())`."
            )
        return float(train_loss.detach().reshape(()).item())
    if isinstance(train_loss, bool) or not isinstance(train_loss, (int, float)):
        raise TypeError(f"train_loss must be a number or a one-element tensor, but got {type(train_loss).__name__}.")
    return float(train_loss)
