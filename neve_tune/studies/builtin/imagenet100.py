"""ImageNet-100 from an image folder, ResNet-50, for GPUs.

Layout (the usual ImageNet-100 subset, e.g. the CMC class list): ``<data-root>/train/<wnid>/*.JPEG`` and
``<data-root>/val/<wnid>/*.JPEG``, read with ``torchvision.datasets.ImageFolder``. ImageNet's official
validation split serves as the *test* split (its test labels are not public). The baseline arms hold out
a stratified 10% of ``train`` for validation; the NeVe arm trains on all of ``train``. Nothing is
downloaded: point ``--data-root`` (or ``$NEVE_TUNE_IMAGENET100``) at the folder.

Transforms: ``RandomResizedCrop(224)`` + ``RandomHorizontalFlip`` for training, ``Resize(256)`` +
``CenterCrop(224)`` otherwise, ImageNet normalisation. Model: ``torchvision.models.resnet50`` with 100
classes, trained from scratch. The NeVe aux set is 100 noise images of 3x224x224.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from neve_tune.studies import Budget, DataRequest, DatasetData, LogUniform, NeVeSettings, StudyDefinition

from .cifar import stratified_split

INPUT_SHAPE = (3, 224, 224)
NUM_CLASSES = 100
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def default_data_root() -> str:
    """``$NEVE_TUNE_IMAGENET100``, else ``~/.cache/neve_tune/data/imagenet100``."""
    return os.environ.get("NEVE_TUNE_IMAGENET100") or os.path.expanduser("~/.cache/neve_tune/data/imagenet100")


def transforms_for(*, train: bool, augment: bool = True, size: int = 224) -> Any:
    from torchvision import transforms

    if train and augment:
        steps: list[Any] = [transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip()]
    else:
        steps = [transforms.Resize(round(size * 256 / 224)), transforms.CenterCrop(size)]
    return transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize(MEAN, STD)])


def check_layout(root: str) -> None:
    """Raise a clear error when ``root`` lacks ``train/<class>/`` and ``val/<class>/`` folders."""
    missing = [s for s in ("train", "val") if not os.path.isdir(os.path.join(root, s))]
    if missing:
        raise FileNotFoundError(
            f"ImageNet-100 needs {root}/train/<wnid>/*.JPEG and {root}/val/<wnid>/*.JPEG; missing: "
            f"{', '.join(missing)}. Pass --data-root (or set NEVE_TUNE_IMAGENET100) to the folder holding them."
        )


def load_imagenet100(request: DataRequest, *, size: int = 224) -> DatasetData:
    """The ImageNet-100 splits of one trial (see the module docstring)."""
    from torchvision.datasets import ImageFolder

    root = request.data_root or default_data_root()
    check_layout(root)
    train_aug = ImageFolder(
        os.path.join(root, "train"), transform=transforms_for(train=True, augment=request.augment, size=size)
    )
    test = ImageFolder(os.path.join(root, "val"), transform=transforms_for(train=False, size=size))
    if test.classes != train_aug.classes:
        raise ValueError(
            f"{root}/train and {root}/val hold different classes ({len(train_aug.classes)} vs {len(test.classes)}); "
            "both must have the same <wnid> folders."
        )
    train_idx, val_idx = stratified_split(list(train_aug.targets), request.val_fraction, request.seed)
    val = None
    if val_idx:
        plain = copy.copy(train_aug)
        plain.transform = transforms_for(train=False, size=size)
        val = torch.utils.data.Subset(plain, val_idx)
    train: torch.utils.data.Dataset = train_aug if not val_idx else torch.utils.data.Subset(train_aug, train_idx)
    return DatasetData(
        train=train,
        val=val,
        test=test,
        batch_size=request.batch_size,
        eval_batch_size=max(request.batch_size, 256),
        num_workers=request.num_workers,
        pin_memory=torch.cuda.is_available(),
    )


def build_model(config: Mapping[str, Any]) -> nn.Module:
    from torchvision.models import resnet50

    return resnet50(weights=None, num_classes=NUM_CLASSES)


def prepare(data_root: str | None) -> None:
    check_layout(data_root or default_data_root())


STUDY = StudyDefinition(
    name="imagenet100",
    description="ImageNet-100 from an image folder (train/ and val/), ResNet-50, GPU",
    input_shape=INPUT_SHAPE,
    num_classes=NUM_CLASSES,
    build_model=build_model,
    load_data=load_imagenet100,
    search_space={"lr": LogUniform(0.02, 0.5), "weight_decay": LogUniform(1e-5, 5e-4)},
    budget=Budget(
        trials=8,
        max_epochs=100,
        batch_size=256,
        val_fraction=0.1,
        grace_period=5,
        reduction_factor=3,
        lr_schedule="cosine",
        momentum=0.9,
        neve=NeVeSettings(),  # the paper's defaults: patience 10, factor 0.5, threshold 1e-3, 100 noise samples
        checkpoint_every=5,
        max_failures=2,
        cpus_per_trial=8.0,
        gpus_per_trial=1.0,
    ),
    prepare=prepare,
    data_note="an ImageFolder tree with train/ and val/ (not downloaded)",
)
