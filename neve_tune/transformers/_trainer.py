"""``NeVeTrainer``: a ``transformers.Trainer`` that shows NeVe the outputs of every training batch."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from transformers import Trainer

from ._callback import NeVeCallback

__all__ = ["NeVeTrainer", "NeVeTrainerMixin"]


class NeVeTrainerMixin:
    """Feeds :meth:`neve_tune.NeVe.observe` from ``compute_loss``: the memorisation watch of NeVeCallback.

    Mix it in before ``Trainer`` (or a Trainer subclass of yours), or use :class:`NeVeTrainer`. Each
    training batch must carry its samples' dataset indices in the column :attr:`neve_index_column`
    (``"index"``), e.g. ``train_dataset = train_dataset.map(lambda row, i: {"index": i}, with_indices=True)``.
    The column is kept through ``remove_unused_columns``, taken out of the batch before the model's forward,
    and the logits of that forward (``outputs.logits``) are passed to the ``NeVeCallback`` among the
    Trainer's callbacks. NeVe then also stops as ``memorizing`` and puts the weights of the flip minimum
    back into the Trainer's model (see :class:`neve_tune.Memorization`); the Trainer ends with them, so do
    not combine it with ``load_best_model_at_end``. Evaluation batches are not observed; a training batch
    without the column warns once (nothing is observed), and ``NeVeCallback(memorization=None)`` observes none.

    The watch compares one NeVe step with the previous one, so it needs NeVe to step once per epoch
    (``NeVeCallback(every_n_steps=None)``, the default): with ``every_n_steps`` shorter than an epoch,
    consecutive periods share no sample and nothing is counted.
    """

    neve_index_column: str = "index"

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()  # type: ignore[misc]
        columns = self._signature_columns  # type: ignore[attr-defined]
        if columns is not None and self.neve_index_column not in columns:
            columns.append(self.neve_index_column)

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        indices = inputs.pop(self.neve_index_column, None)
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)  # type: ignore[misc]
        callback = next(
            (c for c in self.callback_handler.callbacks if isinstance(c, NeVeCallback)),  # type: ignore[attr-defined]
            None,
        )
        if callback is None or callback.neve is None:
            raise ValueError(
                f"{type(self).__name__} observes the training batches for NeVeCallback, but the Trainer has no"
                " NeVeCallback: pass callbacks=[NeVeCallback(aux, ...)]."
            )
        if callback.neve.watch is None:  # NeVeCallback(memorization=None): nothing to feed
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)  # type: ignore[misc]
        if indices is None:
            if not getattr(self, "_neve_warned_no_index", False):
                self._neve_warned_no_index = True
                warnings.warn(
                    f"{type(self).__name__}: the training batch has no {self.neve_index_column!r} column, so NeVe's"
                    " memorisation watch sees nothing and NeVe will not stop for memorization. Add it:"
                    f" train_dataset = train_dataset.map(lambda row, i: {{{self.neve_index_column!r}: i}},"
                    " with_indices=True); or use transformers.Trainer if you do not want the watch.",
                    UserWarning,
                    stacklevel=2,
                )
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)  # type: ignore[misc]
        loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)  # type: ignore[misc]
        callback.neve.observe(outputs, indices)
        return (loss, outputs) if return_outputs else loss


class NeVeTrainer(NeVeTrainerMixin, Trainer):
    """``transformers.Trainer`` with :class:`NeVeTrainerMixin`: NeVe watches the training batches for
    memorisation (the dataset needs an ``"index"`` column, see the mixin).

    Example:
        >>> from neve_tune.transformers import NeVeCallback, NeVeTrainer  # doctest: +SKIP
        >>> train = train.map(lambda row, i: {"index": i}, with_indices=True)  # doctest: +SKIP
        >>> trainer = NeVeTrainer(model, args, train_dataset=train, callbacks=[NeVeCallback(aux)])  # doctest: +SKIP
    """
