"""Per-sample predictions stored by dataset index, and the number of them that changed each epoch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["EpochFlips", "FlipCounter"]

_UNSEEN = -1  # a stored prediction that does not exist (sample not observed, or a token beyond its length)
#: The largest dataset index + 1 the tables grow to (two int32 tables: 800 MB for a classifier); beyond it an
#: index is a sample id, not a position, and would allocate gigabytes.
MAX_INDEX = 100_000_000


@dataclass(frozen=True)
class EpochFlips:
    """One epoch's flips.

    Attributes:
        flips: the number of samples whose prediction changed since the previous epoch, among those
            observed in both; for token outputs each sample counts the fraction of its tokens that changed.
        observed: how many samples were observed in both epochs (the normaliser).
        fraction: ``flips / observed`` (NaN when ``observed`` is 0).
    """

    flips: float
    observed: int

    @property
    def fraction(self) -> float:
        return self.flips / self.observed if self.observed else float("nan")


class FlipCounter:
    """Counts, per epoch, the samples whose predicted class changed since the previous epoch.

    :meth:`add` stores a batch's predictions under its samples' dataset indices (the latest one wins when a
    sample comes twice in an epoch); :meth:`end_epoch` compares the epoch with the previous one over the
    samples observed in both. Indices need not cover the dataset (a random subset, a partial epoch): the
    storage grows to the largest index seen.

    Token predictions ``(N, T)``: each token's prediction is stored; a sample's flip is the fraction of its
    tokens (observed in both epochs) whose prediction changed, so a sample counts between 0 and 1 and the
    epoch's ``fraction`` stays a share of samples. Tokens beyond a sample's length in one of the two epochs
    (a shorter padded batch) are not compared; a sample with no token compared is not counted.

    Memory: two int32 tables of (largest index + 1) x (tokens per sample, 1 for classifiers) values, on CPU:
    8 bytes per sample for a classifier (8 MB for a million samples), 8 bytes per token otherwise.

    State: :meth:`state_dict` holds both tables (tensors); :meth:`load_state_dict` restores them.
    """

    def __init__(self) -> None:
        self._previous = torch.full((0, 1), _UNSEEN, dtype=torch.int32)
        self._current = torch.full((0, 1), _UNSEEN, dtype=torch.int32)
        self.size = 0  # largest index seen + 1; the tables may be longer (capacity)
        self.tokens: bool | None = None  # token predictions (N, T) rather than one class per sample
        self.epochs = 0  # completed epochs (end_epoch calls)
        self.added = 0  # samples stored this epoch, repeats included
        self.repeats: tuple[int, int] | None = None  # (samples stored, distinct indices) of the latest epoch

    def add(self, predictions: Tensor, indices: Tensor) -> None:
        """Store one batch's predictions (``(N,)`` or ``(N, T)`` integers) under ``indices`` (CPU int64 ``(N,)``).

        The predictions are copied to the host here: the one synchronisation per batch.
        """
        tokens = predictions.dim() == 2
        if self.tokens is None:
            self.tokens = tokens
        elif tokens != self.tokens:
            kind = "token predictions (N, T)" if self.tokens else "one class per sample (N,)"
            raise ValueError(
                f"observe() got outputs of shape {tuple(predictions.shape)} after {kind}: a model's outputs must"
                " keep one layout for the whole run."
            )
        preds = predictions.to("cpu", torch.int32).reshape(len(indices), -1)
        if len(indices) == 0:
            return
        top = int(indices.max())
        if top >= MAX_INDEX:
            raise ValueError(
                f"observe() got the dataset index {top}: NeVe stores each sample's prediction at its index, so"
                f" this would allocate tables of {top + 1:,} rows. Indices must be positions in the training set"
                " (0..len(dataset)-1), not sample ids or hashes: e.g. a Dataset that returns (x, y, index)."
            )
        self._grow(top + 1, preds.shape[1])
        self.added += len(indices)
        row = torch.full((len(indices), self._current.shape[1]), _UNSEEN, dtype=torch.int32)
        row[:, : preds.shape[1]] = preds
        self._current[indices] = row

    def end_epoch(self) -> EpochFlips | None:
        """Close the epoch: its flips against the previous epoch (``None`` at the first epoch, or when no
        sample was observed in both), then this epoch becomes the previous one."""
        self.epochs += 1
        n = self.size
        prev, cur = self._previous[:n], self._current[:n]
        valid = (prev != _UNSEEN) & (cur != _UNSEEN)
        compared = valid.sum(dim=1)
        both = compared > 0
        distinct = int((cur[:, 0] != _UNSEEN).sum()) if n else 0
        self.repeats = (self.added, distinct) if self.added else None
        self.added = 0
        result: EpochFlips | None = None
        if bool(both.any()):
            changed = ((prev != cur) & valid).sum(dim=1)[both].to(torch.float64)
            flips = float((changed / compared[both]).sum())
            result = EpochFlips(flips=flips, observed=int(both.sum()))
        self._previous, self._current = self._current, self._previous
        self._current.fill_(_UNSEEN)
        return result

    def _grow(self, size: int, width: int) -> None:
        rows, cols = self._current.shape
        if size <= rows and width <= cols:
            self.size = max(self.size, size)
            return
        new_rows = max(size, 2 * rows) if size > rows else rows  # doubling: sequential indices stay O(n)
        new_cols = max(width, cols)
        for name in ("_previous", "_current"):
            old = getattr(self, name)
            grown = torch.full((new_rows, new_cols), _UNSEEN, dtype=torch.int32)
            grown[:rows, :cols] = old
            setattr(self, name, grown)
        self.size = max(self.size, size)

    def state_dict(self) -> dict[str, Any]:
        n = self.size
        return {
            "previous": self._previous[:n].clone(),
            "current": self._current[:n].clone(),
            "tokens": self.tokens,
            "epochs": self.epochs,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._previous = state["previous"].to("cpu", torch.int32).clone()
        self._current = state["current"].to("cpu", torch.int32).clone()
        if self._previous.shape != self._current.shape:
            raise ValueError(
                f"a FlipCounter state with tables of shapes {tuple(self._previous.shape)} and"
                f" {tuple(self._current.shape)}: they must match (a corrupted checkpoint?)."
            )
        self.size = self._current.shape[0]
        self.tokens = None if state["tokens"] is None else bool(state["tokens"])
        self.epochs = int(state["epochs"])
