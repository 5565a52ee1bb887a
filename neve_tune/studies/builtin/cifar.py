"""CIFAR-10 / CIFAR-100 through torchvision, with the CIFAR ResNets of He et al. (2016), for GPUs.

* Data: ``torchvision.datasets.CIFAR10/100`` (downloaded once, in the driver, to ``--data-root``; default
  ``$NEVE_TUNE_DATA`` or ``~/.cache/neve_tune/data``). Training batches get the standard augmentation
  (``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip``) and per-channel normalisation; validation
  and test batches only the normalisation.
* Splits: the official 50,000/10,000 train/test split. The baseline arms hold out a stratified 10% of
  the training set for validation (seeded); the NeVe arm trains on all 50,000 images.
* Models: CIFAR ResNet-20 (CIFAR-10) and ResNet-32 (CIFAR-100): three stages of 3 (or 5) basic blocks
  with 16/32/64 channels and parameter-free ("option A") shortcuts, as in the paper.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from neve_tune.studies import (
    Budget,
    DataRequest,
    DatasetData,
    LogUniform,
    NeVeSettings,
    StudyDefinition,
)

INPUT_SHAPE = (3, 32, 32)
MEAN = {"cifar10": (0.4914, 0.4822, 0.4465), "cifar100": (0.5071, 0.4865, 0.4409)}
STD = {"cifar10": (0.2470, 0.2435, 0.2616), "cifar100": (0.2673, 0.2564, 0.2762)}


def default_data_root() -> str:
    """``$NEVE_TUNE_DATA``, else ``~/.cache/neve_tune/data``."""
    return os.environ.get("NEVE_TUNE_DATA") or os.path.expanduser("~/.cache/neve_tune/data")


# ---------------------------------------------------------------------------- models


class _PadShortcut(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad the new channels (no parameters)."""

    def __init__(self, extra_channels: int) -> None:
        super().__init__()
        self.extra = extra_channels

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, ::2, ::2]
        pad = self.extra // 2
        return nn.functional.pad(x, (0, 0, 0, 0, pad, self.extra - pad))


class BasicBlock(nn.Module):
    """Two 3x3 conv/BN layers with a residual connection."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = _PadShortcut(planes - in_planes)

    def forward(self, x: Tensor) -> Tensor:
        out = nn.functional.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return nn.functional.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: ResNet-20 is n=3, ResNet-32 is n=5."""

    def __init__(self, depth: int = 20, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"A CIFAR ResNet has depth 6n+2 (20, 32, 44, 56, 110), but got {depth=}.")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers: list[nn.Module] = []
        in_planes = 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(n):
                layers.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: Tensor) -> Tensor:
        out = nn.functional.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = nn.functional.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


def resnet20(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(20, num_classes)


def resnet32(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(32, num_classes)


# ---------------------------------------------------------------------------- data


def _dataset_class(name: str) -> Any:
    from torchvision import datasets

    return {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[name]


def transforms_for(name: str, *, train: bool, augment: bool = True) -> Any:
    """Standard CIFAR transforms: crop+flip augmentation (training only) and normalisation."""
    from torchvision import transforms

    steps: list[Any] = []
    if train and augment:
        steps += [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()]
    steps += [transforms.ToTensor(), transforms.Normalize(MEAN[name], STD[name])]
    return transforms.Compose(steps)


def stratified_split(targets: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, val) indices: ``fraction`` of every class goes to val, chosen with a seeded generator."""
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction must be in [0, 1), but got {fraction=}.")
    if fraction == 0:
        return list(range(len(targets))), []
    gen = torch.Generator().manual_seed(int(seed))
    labels = torch.as_tensor(targets)
    train: list[int] = []
    val: list[int] = []
    for cls in labels.unique().tolist():
        idx = torch.nonzero(labels == cls).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        k = round(fraction * len(idx))
        val += idx[:k].tolist()
        train += idx[k:].tolist()
    return sorted(train), sorted(val)


def load_cifar(name: str, request: DataRequest, *, download: bool = False) -> DatasetData:
    """The CIFAR splits of one trial (see the module docstring).

    The driver downloads the data once (:func:`prepare`); trials then read it without downloading.
    torchvision checks the files' MD5s either way.
    """
    root = request.data_root or default_data_root()
    cls = _dataset_class(name)
    try:
        train_aug = cls(
            root, train=True, transform=transforms_for(name, train=True, augment=request.augment), download=download
        )
        test = cls(root, train=False, transform=transforms_for(name, train=False), download=False)
    except RuntimeError as err:
        raise RuntimeError(
            f"{name}: {err} (looked in {root}). Run the study once with network access (it downloads to "
            "--data-root), or copy the extracted 'cifar-10-batches-py'/'cifar-100-python' folder there."
        ) from err
    train_idx, val_idx = stratified_split(list(train_aug.targets), request.val_fraction, request.seed)
    val = None
    if val_idx:
        plain = copy.copy(train_aug)  # same arrays, no augmentation
        plain.transform = transforms_for(name, train=False)
        val = torch.utils.data.Subset(plain, val_idx)
    train: torch.utils.data.Dataset = train_aug if not val_idx else torch.utils.data.Subset(train_aug, train_idx)
    return DatasetData(
        train=train,
        val=val,
        test=test,
        batch_size=request.batch_size,
        num_workers=request.num_workers,
        pin_memory=torch.cuda.is_available(),
    )


def prepare(name: str, data_root: str | None) -> None:
    """Download (and MD5-check) the dataset once, before any trial starts."""
    root = data_root or default_data_root()
    os.makedirs(root, exist_ok=True)
    cls = _dataset_class(name)
    cls(root, train=True, download=True)
    cls(root, train=False, download=True)


# ---------------------------------------------------------------------------- study definitions

SEARCH_SPACE = {
    "lr": LogUniform(0.01, 0.5),
    "weight_decay": LogUniform(1e-5, 1e-3),
}


def _budget() -> Budget:
    return Budget(
        trials=16,
        max_epochs=200,
        batch_size=128,
        val_fraction=0.1,
        grace_period=10,
        reduction_factor=3,
        lr_schedule="step",
        momentum=0.9,
        neve=NeVeSettings(),  # the paper's defaults: patience 10, factor 0.5, threshold 1e-3, 100 noise samples
        checkpoint_every=10,
        max_failures=2,
        cpus_per_trial=2.0,
        gpus_per_trial=0.25,
    )


def _definition(name: str, depth: int, num_classes: int) -> StudyDefinition:
    def build_model(config: Mapping[str, Any]) -> nn.Module:
        return CifarResNet(depth, num_classes)

    def load_data(request: DataRequest) -> DatasetData:
        return load_cifar(name, request)

    def prepare_data(data_root: str | None) -> None:
        prepare(name, data_root)

    return StudyDefinition(
        name=name,
        description=f"{name.upper()} (torchvision download), CIFAR ResNet-{depth}, GPU",
        input_shape=INPUT_SHAPE,
        num_classes=num_classes,
        build_model=build_model,
        load_data=load_data,
        search_space=SEARCH_SPACE,
        budget=_budget(),
        prepare=prepare_data,
        data_note=f"torchvision.datasets.{name.upper()} (downloaded to --data-root)",
    )


CIFAR10_STUDY = _definition("cifar10", 20, 10)
CIFAR100_STUDY = _definition("cifar100", 32, 100)
