"""Auxiliary sets: the fixed, label-free inputs on which neural velocity is measured.

None of these touch the global RNG: each draws from its own ``torch.Generator``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def noise_aux(
    sample_shape: Sequence[int],
    n: int = 100,
    *,
    distribution: Literal["normal", "uniform"] = "normal",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``n`` noise inputs shaped like one model input: the default, data-free aux set.

    Args:
        sample_shape: one sample's shape without the batch dim, e.g. ``(3, 32, 32)``.
        n: number of samples (the paper uses 100).
        distribution: ``"normal"`` (standard normal, default) or ``"uniform"`` (on [0, 1)).
        seed: seed of the generator; the same seed always gives the same set.
        dtype: floating dtype of the result (for integer token ids use :func:`neve_tune.token_aux`).

    Raises:
        TypeError: an integer or bool ``dtype``.
        ValueError: ``n < 1``, a non-positive size, or an unknown ``distribution``.

    Returns:
        A CPU tensor of shape ``(n, *sample_shape)``.

    Example:
        >>> noise_aux((3, 32, 32), n=4).shape
        torch.Size([4, 3, 32, 32])
    """
    if dtype == torch.bool or not (dtype.is_floating_point or dtype.is_complex):
        raise TypeError(
            f"noise_aux draws floating noise, but got {dtype=}, an integer dtype. For token ids (embedding or"
            " language models) use neve_tune.token_aux(vocab_size, seq_len, n) instead, or"
            " neve_tune.token_subset_aux(tokenized_dataset, n) for a subset of your tokenized data."
        )
    shape = tuple(int(s) for s in sample_shape)
    if n < 1 or not shape or any(s < 1 for s in shape):
        raise ValueError(
            f"noise_aux needs n >= 1 and a sample shape of positive sizes, but got {n=}, {sample_shape=}."
        )
    gen = torch.Generator().manual_seed(seed)
    if distribution == "normal":
        return torch.randn((n, *shape), generator=gen, dtype=dtype)
    if distribution == "uniform":
        return torch.rand((n, *shape), generator=gen, dtype=dtype)
    raise ValueError(f"distribution must be 'normal' or 'uniform', but got {distribution=}.")


def _input_of(item: Any) -> Tensor:
    """The input of a dataset item: the item itself, or the first element of an (input, label) pair."""
    x = item[0] if isinstance(item, (tuple, list)) else item
    if not isinstance(x, Tensor):
        raise TypeError(
            f"Dataset items must be tensors or (tensor, label) pairs; got {type(x).__name__}. Give the dataset"
            " a transform that returns tensors (e.g. torchvision.transforms.ToTensor())."
        )
    return x


def subset_aux(dataset: Any, n: int = 100, *, seed: int = 0) -> Tensor:
    """A fixed, label-free subset of ``n`` inputs of a map-style dataset (labels are dropped).

    The training data themselves can serve as aux set: nothing has to be held out, since NeVe never
    looks at labels. Indices are drawn once from a generator seeded with ``seed``.

    Returns:
        A tensor of shape ``(min(n, len(dataset)), *input_shape)``.
    """
    size = len(dataset)
    if size == 0:
        raise ValueError("subset_aux got an empty dataset; pass a dataset with at least one item.")
    if n < 1:
        raise ValueError(f"n must be >= 1, but got {n=}.")
    gen = torch.Generator().manual_seed(seed)
    index = torch.randperm(size, generator=gen)[: min(n, size)].sort().values
    return torch.stack([_input_of(dataset[int(i)]) for i in index])


def image_folder_aux(
    root: str | Path,
    n: int = 100,
    *,
    transform: Callable[[Any], Tensor] | None = None,
    seed: int = 0,
) -> Tensor:
    """``n`` images from a folder (searched recursively; class subfolders are fine, labels are ignored).

    Args:
        root: the folder.
        n: how many images to take (a fixed random choice; all of them if there are fewer).
        transform: turns a PIL image into a tensor; default: resize to 256, center-crop 224, to tensor,
            ImageNet normalisation (needs torchvision).
        seed: seed of the choice.
    """
    from PIL import Image

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image_folder_aux: {root} is not a folder. Pass the folder holding the images.")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise ValueError(
            f"image_folder_aux: no image ({', '.join(IMAGE_EXTENSIONS)}) under {root}. Point it at a folder of images."
        )
    if transform is None:
        from torchvision import transforms

        transform = transforms.Compose(
            [
                transforms.Resize(256),
                transforms.CenterCrop(224),
                transforms.ToTensor(),
                transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
            ]
        )
    gen = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(files), generator=gen)[: min(n, len(files))].sort().values
    images = []
    for i in index:
        with Image.open(files[int(i)]) as img:
            images.append(transform(img.convert("RGB")))
    return torch.stack(images)
