"""Checks of an aux set before it runs, and plain explanations when a model cannot take it.

Each function returns a message (empty when it does not apply) or raises the error a user can act on:
numpy arrays instead of tensors, meta tensors, too few samples, float noise into an ``nn.Embedding``,
integer inputs into a float model, token ids beyond the embedding, ``(x, y)`` pairs passed to ``forward``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

#: Below this many aux samples a neuron's response has too few values for its cosine to mean anything.
MIN_AUX_SAMPLES = 8


def leaves(batch: Any) -> list[Any]:
    """Every non-container value of a batch (tensors, arrays, scalars), in order."""
    if isinstance(batch, Mapping):
        return [leaf for v in batch.values() for leaf in leaves(v)]
    if isinstance(batch, (tuple, list)):
        return [leaf for v in batch for leaf in leaves(v)]
    return [batch]


def tensors(batch: Any) -> list[Tensor]:
    """The tensors of a batch, in order."""
    return [leaf for leaf in leaves(batch) if isinstance(leaf, Tensor)]


def is_array(value: Any) -> bool:
    """A numpy (or other ``__array__``) array that is not a torch tensor."""
    return not isinstance(value, Tensor) and hasattr(value, "__array__") and hasattr(value, "shape")


def refuse_array(value: Any, where: str) -> None:
    """Raise a ``TypeError`` naming ``torch.as_tensor`` for a numpy array given where tensors are needed."""
    raise TypeError(
        f"{where} is a {type(value).__module__}.{type(value).__name__} of shape {tuple(value.shape)}, not a torch"
        " tensor: the model cannot take it. Convert it with torch.as_tensor(aux) (add .float() for float64"
        " data and a float32 model)."
    )


def refuse_meta_aux(batches: list[Any]) -> None:
    """Refuse aux tensors on the ``meta`` device: they hold no values to run or compare."""
    for index, batch in enumerate(batches):
        for t in tensors(batch):
            if t.is_meta:
                raise ValueError(
                    f"Aux batch {index} is a tensor on the 'meta' device (shape {tuple(t.shape)}): it holds no"
                    " values, so no velocity can be measured on it. Build the aux set on a real device, e.g."
                    " neve_tune.noise_aux(sample_shape) or neve_tune.subset_aux(dataset)."
                )


def refuse_meta_model(model: nn.Module) -> None:
    """Refuse a model whose parameters or buffers live on the ``meta`` device."""
    for name, value in [*model.named_parameters(), *model.named_buffers()]:
        if value.is_meta:
            raise ValueError(
                f"{type(model).__name__} has tensors on the 'meta' device (e.g. '{name}', shape"
                f" {tuple(value.shape)}): they hold no values, so no velocity can be measured. Materialise the"
                " model first (model.to_empty(device='cpu') and load its weights, or build it outside"
                " torch.device('meta')), then create the monitor."
            )


def warn_few_samples(batches: list[Any]) -> None:
    """Warn when the aux set holds fewer than :data:`MIN_AUX_SAMPLES` samples."""
    counts = [t.shape[0] for t in (next(iter(tensors(b)), None) for b in batches) if t is not None and t.ndim]
    total = sum(counts)
    if counts and total < MIN_AUX_SAMPLES:
        warnings.warn(
            f"The aux set holds only {total} sample(s) (fewer than {MIN_AUX_SAMPLES}): each neuron's response is"
            f" a vector of {total} value(s), so the cosines between snapshots are close to +-1 and the velocity is"
            " noise, not a measure of learning. Use about 100 samples, e.g. neve_tune.noise_aux(sample_shape,"
            " n=100) or neve_tune.subset_aux(dataset, n=100).",
            UserWarning,
            stacklevel=4,
        )


def _embedding(model: nn.Module) -> tuple[str, nn.Embedding] | None:
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            return name, module
    return None


def _dtypes(items: list[Tensor]) -> str:
    return ", ".join(sorted({str(t.dtype).removeprefix("torch.") for t in items}))


def dtype_mismatch(model: nn.Module, batch: Any) -> str:
    """Why the batch's dtypes cannot feed the model, with the fix; empty when the dtypes look right."""
    items = tensors(batch)
    floats = [t for t in items if t.is_floating_point()]
    ints = [t for t in items if not t.is_floating_point() and not t.is_complex() and t.dtype.is_signed]
    embedding = _embedding(model)
    if embedding is not None and floats and not ints:
        name, module = embedding
        return (
            f"The aux set holds floating-point inputs ({_dtypes(floats)}), but {type(model).__name__} feeds them"
            f" to the nn.Embedding '{name}', which takes integer token ids below {module.num_embeddings}. Build a"
            f" token aux set: neve_tune.token_aux(vocab_size={module.num_embeddings}, seq_len=...) or"
            " neve_tune.token_subset_aux(dataset), not noise_aux."
        )
    wanted = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    if wanted is None:
        return ""
    name = str(wanted).removeprefix("torch.")
    if embedding is None and ints and not floats:
        return (
            f"The aux set holds integer inputs ({_dtypes(ints)}), but {type(model).__name__} takes floating-point"
            f" inputs ({name}) and has no nn.Embedding for token ids. Convert the aux set with aux.to(torch.{name})"
            f" (aux.float() for float32), or build it with neve_tune.noise_aux(sample_shape)."
        )
    given = {t.dtype for t in floats}
    if not given or given == {wanted}:
        return ""
    got = ", ".join(sorted(str(d).removeprefix("torch.") for d in given))
    return (
        f"The aux set's dtype ({got}) is not the model's ({name}): a dtype mismatch, not a shape problem. Build"
        f" the aux set in {name} (e.g. neve_tune.noise_aux(shape, dtype=torch.{name}), or aux.to(torch.{name})),"
        " or convert the model to the aux set's dtype (e.g. model.float())."
    )


def vocab_clash(model: nn.Module, batch: Any) -> str:
    """Which sizes clash when the batch's token ids reach past the model's first embedding; else empty."""
    embedding = _embedding(model)
    if embedding is None:
        return ""
    name, module = embedding
    ids = batch.get("input_ids", batch) if isinstance(batch, Mapping) else batch
    ints = [t for t in tensors(ids) if not t.is_floating_point() and not t.is_complex() and t.numel()]
    if not ints:
        return ""
    top = max(int(t.max()) for t in ints)
    if top < module.num_embeddings:
        return ""
    return (
        f"The aux set's token ids reach {top}, but {type(model).__name__}'s embedding '{name}' has"
        f" {module.num_embeddings} rows (ids 0..{module.num_embeddings - 1}): the aux set's vocabulary is larger"
        f" than the model's. Build it with the model's vocabulary size, e.g."
        f" neve_tune.token_aux(vocab_size={module.num_embeddings}, seq_len=...)."
    )


def labels_passed(model: nn.Module, batch: Any, exc: TypeError) -> str:
    """Why a tuple batch failed with "takes N positional arguments": its labels went to ``forward``."""
    if not isinstance(batch, (tuple, list)) or len(batch) < 2 or "positional argument" not in str(exc):
        return ""
    shapes = [tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__ for v in batch]
    return (
        f"Every aux batch is a {type(batch).__name__} of {len(batch)} items {shapes}, passed to the model as"
        f" model(*batch), and {type(model).__name__}.forward does not take {len(batch)} inputs ({exc}): the aux"
        " set looks like (input, label) pairs, and the labels were passed to forward. NeVe needs inputs only:"
        " use neve_tune.subset_aux(dataset, n=100) (it drops the labels), or [x for x, _ in loader]."
    )
