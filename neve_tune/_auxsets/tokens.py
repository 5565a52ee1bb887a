"""Aux sets for token models: random token ids, attention masks, and fixed subsets of tokenized data.

Language models take integer ids, not floating noise: :func:`token_aux` draws random ids (with an
attention mask where the model wants one, as a dict for Hugging Face models, which the monitor calls as
``model(**batch)``), and :func:`token_subset_aux` takes a fixed, label-free subset of a tokenized
dataset. Neither touches the global RNG: each draws from its own ``torch.Generator``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

#: Column names that hold labels: a token subset never carries them (NeVe never looks at labels).
LABEL_COLUMNS = ("label", "labels", "label_ids", "start_positions", "end_positions")


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, but got {name}={value!r}.")
    return value


def _allowed_ids(vocab_size: int, special_ids: Iterable[int] | None) -> Tensor | None:
    """The ids random tokens are drawn from when some are excluded; None when all of them are allowed."""
    if special_ids is None:
        return None
    special = {int(i) for i in special_ids}
    bad = sorted(i for i in special if not 0 <= i < vocab_size)
    if bad:
        raise ValueError(f"special_ids must lie in [0, vocab_size={vocab_size}), but got {bad}.")
    allowed = torch.tensor([i for i in range(vocab_size) if i not in special], dtype=torch.long)
    if allowed.numel() == 0:
        raise ValueError(
            f"special_ids exclude every id of the vocabulary (vocab_size={vocab_size}); leave at least one id"
            " to draw tokens from."
        )
    return allowed


def token_aux(
    vocab_size: int,
    seq_len: int,
    n: int = 100,
    *,
    seed: int = 0,
    attention_mask: Literal[False, "full", "random_padding"] = False,
    special_ids: Iterable[int] | None = None,
    pad_id: int = 0,
    as_dict: bool | None = None,
    key: str = "input_ids",
) -> Tensor | dict[str, Tensor]:
    """``n`` random token sequences: the data-free aux set of a language model.

    Ids are uniform over the vocabulary (minus ``special_ids``), dtype ``torch.long``, drawn from a
    generator seeded with ``seed``; the same arguments always give the same set.

    Args:
        vocab_size: number of token ids; ids lie in ``[0, vocab_size)``.
        seq_len: length of every sequence.
        n: number of sequences (the paper uses 100 aux samples).
        seed: seed of the generator.
        attention_mask: ``False`` (no mask), ``"full"`` (all ones) or ``"random_padding"`` (each sequence
            keeps a random length in ``[1, seq_len]``, drawn from the same generator, and is right-padded
            with ``pad_id``; the mask is 1 on real tokens, 0 on padding).
        special_ids: ids never drawn (e.g. the pad, CLS and SEP ids); padding still uses ``pad_id``.
        pad_id: the id of padded positions (``"random_padding"`` only); must lie in ``[0, vocab_size)``.
        as_dict: return ``{key: ids, "attention_mask": mask}`` (for Hugging Face models; the monitor calls
            ``model(**batch)``) rather than the ids tensor. Default: a dict exactly when a mask is asked for.
        key: the name of the ids in the dict.

    Returns:
        A ``(n, seq_len)`` long tensor, or a dict of such tensors (``as_dict``); ``batch_size=`` of the
        monitor splits either along dim 0.

    Raises:
        ValueError: an argument is out of range, or a mask is asked for without a dict.

    Example:
        >>> token_aux(1000, 16, n=4).shape
        torch.Size([4, 16])
        >>> sorted(token_aux(1000, 16, n=4, attention_mask="full"))
        ['attention_mask', 'input_ids']
    """
    _positive("vocab_size", vocab_size)
    _positive("seq_len", seq_len)
    _positive("n", n)
    if attention_mask not in (False, None, "full", "random_padding"):
        raise ValueError(
            f"attention_mask must be False, 'full' or 'random_padding', but got {attention_mask=}."
        )
    if isinstance(pad_id, bool) or not isinstance(pad_id, int) or not 0 <= pad_id < vocab_size:
        raise ValueError(f"pad_id must lie in [0, vocab_size={vocab_size}), but got {pad_id=}.")
    if as_dict is None:
        as_dict = bool(attention_mask)
    if attention_mask and not as_dict:
        raise ValueError(
            f"attention_mask={attention_mask!r} needs as_dict=True: the mask travels with the ids in a dict"
            " that the monitor passes as model(**batch)."
        )
    if not key:
        raise ValueError(f"key must be a non-empty name, but got {key=}.")
    gen = torch.Generator().manual_seed(seed)
    allowed = _allowed_ids(vocab_size, special_ids)
    if allowed is None:
        ids = torch.randint(vocab_size, (n, seq_len), generator=gen, dtype=torch.long)
    else:
        ids = allowed[torch.randint(allowed.numel(), (n, seq_len), generator=gen)]
    if not as_dict:
        return ids
    out = {key: ids}
    if attention_mask == "full":
        out["attention_mask"] = torch.ones(n, seq_len, dtype=torch.long)
    elif attention_mask == "random_padding":
        lengths = torch.randint(1, seq_len + 1, (n, 1), generator=gen)
        mask = (torch.arange(seq_len).unsqueeze(0) < lengths).long()
        out[key] = ids.masked_fill(mask == 0, pad_id)
        out["attention_mask"] = mask
    return out


def _row_count(data: Any) -> int:
    if isinstance(data, Mapping):
        if not data:
            raise ValueError("token_subset_aux got an empty mapping; pass columns such as 'input_ids'.")
        lengths = {name: len(col) for name, col in data.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"token_subset_aux: the columns differ in length: {lengths}.")
        return next(iter(lengths.values()))
    if isinstance(data, (str, bytes)) or not hasattr(data, "__len__") or not hasattr(data, "__getitem__"):
        raise TypeError(
            "token_subset_aux takes a mapping of columns (e.g. a tokenizer's output) or a sequence of dict rows"
            f" (e.g. a Hugging Face dataset), but got {type(data).__name__}."
        )
    return len(data)


def _row(data: Any, index: int) -> Mapping[str, Any]:
    row = {name: col[index] for name, col in data.items()} if isinstance(data, Mapping) else data[index]
    if not isinstance(row, Mapping):
        raise TypeError(
            f"token_subset_aux: row {index} is a {type(row).__name__}, not a dict of columns. Pass a dataset"
            " whose items are dicts such as {'input_ids': [...], 'attention_mask': [...]}."
        )
    return row


def _stack(values: list[Tensor], pad: int, name: str) -> Tensor:
    """Stack rows, right-padding 1-D rows of different lengths with ``pad``."""
    shapes = {tuple(v.shape) for v in values}
    if len(shapes) == 1:
        return torch.stack(values)
    if any(v.ndim != 1 for v in values):
        raise ValueError(
            f"token_subset_aux: column '{name}' holds rows of different shapes {sorted(shapes)}; only 1-D"
            " rows (token sequences) can be padded to a common length."
        )
    out = torch.full((len(values), max(v.numel() for v in values)), pad, dtype=values[0].dtype)
    for i, v in enumerate(values):
        out[i, : v.numel()] = v
    return out


def token_subset_aux(
    data: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    n: int = 100,
    *,
    seed: int = 0,
    columns: Sequence[str] = ("input_ids", "attention_mask"),
    pad_id: int = 0,
) -> dict[str, Tensor]:
    """A fixed, label-free subset of ``n`` rows of a tokenized dataset, as a dict of long tensors.

    The training data themselves can serve as aux set (NeVe never looks at labels). Rows are drawn once
    from a generator seeded with ``seed`` and kept in dataset order. The ``datasets`` package is not
    needed: any sequence of dict rows works, as does a mapping of columns.

    Args:
        data: a mapping of columns (a tokenizer's output: tensors or lists of rows), or a sequence of dict
            rows (a Hugging Face ``datasets.Dataset`` yields those).
        n: how many rows (all of them if there are fewer).
        seed: seed of the choice.
        columns: the columns to keep, the token ids first; every other column (labels above all) is
            dropped. A missing ``"attention_mask"`` is built: 1 on each row's tokens, 0 on its padding.
        pad_id: the id that pads the first column; the other columns pad with 0.

    Returns:
        ``{column: tensor}``, each of shape ``(min(n, len(data)), max_length, ...)``, dtype ``torch.long``.

    Raises:
        ValueError: ``n < 1``, an empty dataset, no columns, a label column asked for, or rows that cannot
            be padded to one length.
        KeyError: a requested column (other than ``"attention_mask"``) is missing.

    Example:
        >>> rows = [{"input_ids": [5, 6, 7], "label": 1}, {"input_ids": [8], "label": 0}]
        >>> token_subset_aux(rows)["attention_mask"].tolist()
        [[1, 1, 1], [1, 0, 0]]
    """
    _positive("n", n)
    columns = tuple(columns)
    if not columns:
        raise ValueError("columns must name at least one column (the token ids first), but got columns=().")
    labels = [c for c in columns if c in LABEL_COLUMNS]
    if labels:
        raise ValueError(f"columns must not include labels ({labels}): an aux set is label-free.")
    size = _row_count(data)
    if size == 0:
        raise ValueError("token_subset_aux got an empty dataset; pass a dataset with at least one row.")
    gen = torch.Generator().manual_seed(seed)
    index = torch.randperm(size, generator=gen)[: min(n, size)].sort().values
    rows = [_row(data, int(i)) for i in index]
    present = rows[0].keys()
    build_mask = "attention_mask" in columns and "attention_mask" not in present
    missing = [c for c in columns if c not in present and not (c == "attention_mask" and build_mask)]
    if missing:
        raise KeyError(f"token_subset_aux: column(s) {missing} not in the data, which has {sorted(present)}.")
    out: dict[str, Tensor] = {}
    for pos, name in enumerate(columns):
        if name == "attention_mask" and build_mask:
            continue
        values = [torch.as_tensor(r[name]).long() for r in rows]
        out[name] = _stack(values, pad_id if pos == 0 else 0, name)
    if build_mask:
        ids = [torch.as_tensor(r[columns[0]]) for r in rows]
        out["attention_mask"] = _stack([torch.ones(v.shape, dtype=torch.long) for v in ids], 0, columns[0])
    return {name: out[name] for name in columns}
