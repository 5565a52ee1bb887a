"""The aux set as the monitor uses it: fixed batches, their copies on the model's device, and the call.

Also which module of a wrapped model really computes (:func:`unwrap_model`) and where it lives
(:func:`model_device`).

A batch is a tensor (``model(batch)``), a tuple/list (``model(*batch)``) or a dict (``model(**batch)``);
a dict of tensors as the whole aux set is split into dict batches. A model that fails on an aux batch
gets a ``ValueError`` that shows the batch's shape and, when it can be told, the input shape the model's
first layer expects.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, cast

import torch
from torch import Tensor, nn

from . import auxchecks
from .layer import MeasurementError
from .state import aux_fingerprint

#: What every ``aux=`` accepts: a tensor whose dim 0 indexes samples, or an iterable of batches (tensors,
#: tuples/lists/dicts of tensors, passed to the model as ``model(*batch)`` / ``model(**batch)``).
AuxInput = Tensor | Iterable[Any]


def as_batches(aux: AuxInput, batch_size: int | None = None) -> list[Any]:
    """A fixed list of aux batches: a tensor split along dim 0, or an iterable's batches, materialised.

    A batch is a tensor (``model(batch)``), a tuple/list (``model(*batch)``) or a dict
    (``model(**batch)``). A dict of tensors (e.g. ``{"input_ids": ..., "attention_mask": ...}`` from
    :func:`neve_tune.token_aux`) is one dict batch, or, with ``batch_size``, dict batches that split every
    tensor along dim 0 alike (other values go to every batch). Tensor batches are views, not copies.
    """
    if batch_size is not None and (isinstance(batch_size, bool) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer or None, but got {batch_size=}.")
    if isinstance(aux, Tensor):
        if aux.ndim == 0 or aux.shape[0] == 0:
            raise ValueError(
                f"The aux set is empty (a tensor of shape {tuple(aux.shape)}). Pass at least one input, e.g."
                " neve_tune.noise_aux(input_shape, n=100)."
            )
        return list(aux.split(batch_size or aux.shape[0]))
    if isinstance(aux, Mapping):
        return _split_mapping(aux, batch_size)
    if auxchecks.is_array(aux):
        auxchecks.refuse_array(aux, "The aux set")
    if isinstance(aux, (str, bytes)) or not isinstance(aux, Iterable):
        raise TypeError(
            f"aux must be a tensor or an iterable of batches, got {type(aux).__name__}. Build one with"
            " neve_tune.noise_aux, subset_aux or image_folder_aux."
        )
    if batch_size is not None:
        raise ValueError(
            "batch_size= only splits a tensor aux set; this aux set is an iterable that already yields"
            " batches. Drop batch_size, or pass a tensor."
        )
    batches = [b for b in aux]
    if not batches or all(isinstance(b, Tensor) and b.numel() == 0 for b in batches):
        raise ValueError(
            "The aux set is empty: its iterable yielded no inputs. Pass at least one input, e.g."
            " neve_tune.noise_aux(input_shape, n=100)."
        )
    return batches


def _split_mapping(aux: Mapping[Any, Any], batch_size: int | None) -> list[Any]:
    """A dict aux set as dict batches: every tensor value split along dim 0 alike."""
    sizes = {k: v.shape[0] if v.ndim else None for k, v in aux.items() if isinstance(v, Tensor)}
    if not sizes:
        raise ValueError(
            f"A dict aux set needs tensor values (dim 0 indexes samples), but got keys {list(aux)} with no"
            " tensor. Build one with neve_tune.token_aux or token_subset_aux."
        )
    if None in sizes.values() or len(set(sizes.values())) > 1:
        shapes = {k: tuple(v.shape) for k, v in aux.items() if isinstance(v, Tensor)}
        raise ValueError(
            f"The tensors of a dict aux set must share their size along dim 0 (the samples), but got {shapes}."
        )
    total = next(iter(sizes.values()))
    assert total is not None
    if total == 0:
        raise ValueError(f"The aux set is empty (a dict of tensors with 0 samples: keys {list(aux)}).")
    step = batch_size or total
    return [
        {k: v[start : start + step] if isinstance(v, Tensor) else v for k, v in aux.items()}
        for start in range(0, total, step)
    ]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module that really computes: strips DataParallel/DistributedDataParallel and torch.compile."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = cast(nn.Module, model.module)
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = cast(nn.Module, model._orig_mod)  # torch.compile's OptimizedModule
        else:
            return model


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a model with neither."""
    for param in model.parameters():
        return param.device
    for buffer in model.buffers():
        return buffer.device
    return torch.device("cpu")


class AuxBatches:
    """The fixed aux batches of one monitor, moved to the model's device once and kept there.

    Args:
        aux: a tensor (dim 0 indexes samples) or an iterable of batches; see :func:`as_batches`.
        batch_size: split a tensor aux set into batches of this size (None: one batch).
    """

    def __init__(self, aux: AuxInput, batch_size: int | None = None) -> None:
        self.batches = as_batches(aux, batch_size)
        for index, batch in enumerate(self.batches):
            for leaf in auxchecks.leaves(batch):
                if auxchecks.is_array(leaf):
                    auxchecks.refuse_array(leaf, f"Aux batch {index} holds a value that")
        auxchecks.refuse_meta_aux(self.batches)
        _check_finite(self.batches)
        auxchecks.warn_few_samples(self.batches)
        self._on: tuple[torch.device, list[Any]] | None = None
        self._fingerprint: str | None = None

    def fingerprint(self) -> str:
        """A hash of the batches' bytes, shapes and dtypes (computed once), kept in saved states."""
        if self._fingerprint is None:
            self._fingerprint = aux_fingerprint(self.batches)
        return self._fingerprint

    def __getstate__(self) -> dict[str, Any]:
        """Copies carry the batches, not their device copies; a batch that is a view of a larger tensor
        travels as its own tensor (pickle would carry the whole tensor with every view)."""
        state = self.__dict__.copy()
        state["_on"] = None
        state["batches"] = [_own(b) for b in self.batches]
        return state

    def __len__(self) -> int:
        return len(self.batches)

    def on(self, device: torch.device) -> list[Any]:
        """The batches on ``device``: copied there at the first call for that device, then reused."""
        if self._on is None or self._on[0] != device:
            self._on = (device, [_to_device(b, device) for b in self.batches])
        return self._on[1]

    def release(self) -> None:
        """Drop the device copies (the CPU batches stay)."""
        self._on = None

    @staticmethod
    def run(model: nn.Module, batch: Any) -> None:
        """Run ``model`` on one batch; a model that cannot take it raises a ``ValueError`` that says why.

        Out-of-memory errors and :class:`MeasurementError` pass through unchanged; any other error of the
        model's forward that is not about the batch's dtype or shape keeps its type and message, with a
        note naming the aux batch it failed on.
        """
        try:
            _call(model, batch)
        except (torch.OutOfMemoryError, MeasurementError):
            raise
        except TypeError as exc:
            labels = auxchecks.labels_passed(model, batch, exc)
            if labels:
                raise ValueError(labels) from exc
            raise
        except IndexError as exc:
            clash = auxchecks.vocab_clash(model, batch)
            if clash:
                raise ValueError(f"{clash} ({type(model).__name__} failed on it: {exc})") from exc
            raise
        except RuntimeError as exc:
            mismatch = auxchecks.dtype_mismatch(model, batch) or auxchecks.vocab_clash(model, batch)
            if mismatch:
                raise ValueError(f"{mismatch} ({type(model).__name__} failed on it: {exc})") from exc
            if not _SHAPE_ERROR.search(str(exc)):
                exc.add_note(
                    f"(neve_tune: raised by {type(model).__name__}'s forward on an aux batch of shape"
                    f" {_batch_shape(batch)}, while measuring its velocity.)"
                )
                raise
            raise ValueError(
                f"The aux set does not fit the model: {type(model).__name__} failed on an aux batch"
                f" of shape {_batch_shape(batch)}: {exc}.{_expected_input(model)} Pass aux inputs"
                " shaped like one training batch, e.g. neve_tune.noise_aux(sample_shape) with the shape of"
                " one sample (no batch dim)."
            ) from exc


#: What torch says when a batch's shape does not fit a layer (matmul, conv channels, view, broadcasting, rank).
_SHAPE_ERROR = re.compile(r"shape|size|dimension|channels|expected .*input|must match", re.IGNORECASE)


def _check_finite(batches: list[Any]) -> None:
    """Refuse NaN/inf inputs: every measurement on them would read as diverged."""
    for index, batch in enumerate(batches):
        for t in auxchecks.tensors(batch):
            if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                raise ValueError(
                    f"The aux set holds {bad} NaN/inf value(s) (aux batch {index}, a tensor of shape"
                    f" {tuple(t.shape)}): every velocity measured on it would be NaN, so every trial would read"
                    " as diverged. Pass finite inputs (e.g. torch.nan_to_num(aux), or fix the transform or"
                    " normalisation that produced them)."
                )


def _own(batch: Any) -> Any:
    """``batch`` with every tensor that views a larger storage replaced by its own copy."""
    if isinstance(batch, Tensor):
        return batch.clone() if batch.untyped_storage().nbytes() > batch.numel() * batch.element_size() else batch
    if isinstance(batch, Mapping):
        return {k: _own(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_own(v) for v in batch)
    return batch


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _call(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _batch_shape(batch: Any) -> Any:
    if isinstance(batch, Tensor):
        return tuple(batch.shape)
    if isinstance(batch, Mapping):
        return {k: _batch_shape(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return [_batch_shape(v) for v in batch]
    return type(batch).__name__


def _expected_input(model: nn.Module) -> str:
    """What the model's first weighted layer wants, for error messages; empty when it cannot be told."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            spatial = len(m.kernel_size)
            dims = ", ".join(["H", "W", "D"][:spatial]) if spatial > 1 else "L"
            return (
                f" Its first layer '{name}' ({type(m).__name__}) expects inputs shaped"
                f" (N, {m.in_channels}, {dims})."
            )
        if isinstance(m, nn.Linear):
            return f" Its first layer '{name}' (Linear) expects inputs shaped (N, ..., {m.in_features})."
        if isinstance(m, nn.Embedding):
            return f" Its first layer '{name}' (Embedding) expects integer indices below {m.num_embeddings}."
    return ""
