"""The CIFAR and ImageNet-100 loaders on small files written in each dataset's real on-disk format.

CIFAR: the python-pickle batches torchvision reads (``cifar-10-batches-py/data_batch_1..5``, ``test_batch``,
``batches.meta``; ``cifar-100-python/train``, ``test``, ``meta``). torchvision checks every file against
the MD5 of the real release, which small generated files cannot match, so the tests point torchvision's
checksum table at the generated files' MD5s; everything else (integrity check, ``download=True`` finding
the files verified, unpickling, metadata, transforms) is torchvision's real code. These files are test
fixtures, never shipped as data.

ImageNet-100: ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG`` JPEG files, read by ``ImageFolder``.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("torchvision")

from torchvision import datasets

from neve_tune.studies import DataRequest, get_study
from neve_tune.studies.builtin import cifar, imagenet100

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _images(n: int, seed: int) -> np.ndarray:
    """n CIFAR rows: uint8 (n, 3072), channel-major (R plane, G plane, B plane) as in the real files."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3072), dtype=np.uint8)


def write_cifar10(root: Path, per_batch: int = 20, n_test: int = 20) -> dict:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written: dict = {"train": [], "test": None}
    for i in range(1, 6):
        data = _images(per_batch, i)
        labels = [(j + i) % 10 for j in range(per_batch)]
        batch = {
            "batch_label": f"training batch {i} of 5",
            "labels": labels,
            "data": data,
            "filenames": [f"img_{i}_{j}.png" for j in range(per_batch)],
        }
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch, protocol=2))
        written["train"].append((data, labels))
    test = {
        "batch_label": "testing batch 1 of 1",
        "labels": [j % 10 for j in range(n_test)],
        "data": _images(n_test, 99),
    }
    test["filenames"] = [f"test_{j}.png" for j in range(n_test)]
    (folder / "test_batch").write_bytes(pickle.dumps(test, protocol=2))
    written["test"] = (test["data"], test["labels"])
    meta = {"num_cases_per_batch": per_batch, "label_names": CIFAR10_NAMES, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return written


def write_cifar100(root: Path, n_train: int = 200, n_test: int = 100) -> None:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, n, seed in (("train", n_train, 1), ("test", n_test, 2)):
        fine = [j % 100 for j in range(n)]
        entry = {
            "filenames": [f"{name}_{j}.png" for j in range(n)],
            "batch_label": f"{name} batch",
            "fine_labels": fine,
            "coarse_labels": [f // 5 for f in fine],
            "data": _images(n, seed),
        }
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
    meta = {
        "fine_label_names": [f"class_{i:02d}" for i in range(100)],
        "coarse_label_names": [f"super_{i}" for i in range(20)],
    }
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))


def point_checksums_at(monkeypatch: pytest.MonkeyPatch, cls: type, root: Path) -> None:
    """Make torchvision's MD5 table describe the generated files (the only thing that differs from a release)."""
    folder = root / cls.base_folder
    monkeypatch.setattr(cls, "train_list", [[n, _md5(folder / n)] for n, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[n, _md5(folder / n)] for n, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": _md5(folder / cls.meta["filename"])})


def test_cifar10_loader_reads_the_real_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    written = write_cifar10(tmp_path)
    point_checksums_at(monkeypatch, datasets.CIFAR10, tmp_path)
    cifar.prepare("cifar10", str(tmp_path))  # download=True: finds the files verified, downloads nothing

    request = DataRequest(val_fraction=0.1, seed=3, batch_size=16, data_root=str(tmp_path), augment=False)
    data = cifar.load_cifar("cifar10", request)
    assert (data.num_train, data.num_val, data.num_test) == (90, 10, 20)
    # Stratified: one validation image of every class (each class has 10 training images).
    val_labels = sorted(int(data.val[i][1]) for i in range(data.num_val))
    assert val_labels == list(range(10))
    assert data.test.classes == CIFAR10_NAMES

    # The first test image, decoded and normalised by the eval transform, is exactly the pixels we wrote.
    x0, y0 = data.test[0]
    raw = torch.from_numpy(written["test"][0][0].reshape(3, 32, 32)).float() / 255
    mean, std = torch.tensor(cifar.MEAN["cifar10"]).view(3, 1, 1), torch.tensor(cifar.STD["cifar10"]).view(3, 1, 1)
    assert y0 == written["test"][1][0]
    torch.testing.assert_close(x0, (raw - mean) / std, atol=1e-5, rtol=0)

    batches = list(data.train_batches(torch.Generator().manual_seed(0)))
    assert [len(y) for _, y in batches] == [16] * 5 + [10]
    assert batches[0][0].shape == (16, 3, 32, 32)
    assert sum(len(y) for _, y in data.eval_batches("test")) == 20

    # NeVe's arm holds nothing out.
    full = cifar.load_cifar("cifar10", DataRequest(val_fraction=0.0, seed=3, batch_size=16, data_root=str(tmp_path)))
    assert (full.num_train, full.num_val) == (100, 0)
    assert list(full.eval_batches("val")) == []


def test_cifar_training_augmentation_is_crop_and_flip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_cifar10(tmp_path)
    point_checksums_at(monkeypatch, datasets.CIFAR10, tmp_path)
    request = DataRequest(val_fraction=0.0, seed=0, batch_size=8, data_root=str(tmp_path))
    data = cifar.load_cifar("cifar10", request)
    names = [type(t).__name__ for t in data.train.transform.transforms]
    assert names == ["RandomCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    crop = data.train.transform.transforms[0]
    assert (crop.size, crop.padding) == ((32, 32), 4)
    torch.manual_seed(0)
    a, _ = data.train[0]
    b, _ = data.train[0]
    assert a.shape == (3, 32, 32) and not torch.equal(a, b)  # random augmentation differs between draws


def test_cifar100_loader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_cifar100(tmp_path)
    point_checksums_at(monkeypatch, datasets.CIFAR100, tmp_path)
    cifar.prepare("cifar100", str(tmp_path))
    data = cifar.load_cifar("cifar100", DataRequest(val_fraction=0.5, seed=0, batch_size=50, data_root=str(tmp_path)))
    assert (data.num_train, data.num_val, data.num_test) == (100, 100, 100)
    assert data.test.classes[:2] == ["class_00", "class_01"] and len(data.test.classes) == 100
    x, y = next(iter(data.eval_batches("test")))
    assert x.shape == (100, 3, 32, 32) and y.tolist() == list(range(100))  # one eval batch, file order


def test_cifar_missing_files_say_what_to_do(tmp_path: Path) -> None:
    request = DataRequest(val_fraction=0.1, seed=0, batch_size=8, data_root=str(tmp_path))
    with pytest.raises(RuntimeError, match="--data-root"):
        cifar.load_cifar("cifar10", request)


def test_cifar_resnets_match_the_paper_sizes() -> None:
    # He et al. (2016), Table 6: ResNet-20 has 0.27M parameters, ResNet-32 0.46M (CIFAR-10 head).
    n20 = sum(p.numel() for p in cifar.resnet20(10).parameters())
    n32 = sum(p.numel() for p in cifar.resnet32(10).parameters())
    assert 0.26e6 < n20 < 0.28e6 and 0.45e6 < n32 < 0.47e6
    assert cifar.resnet32(100)(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    with pytest.raises(ValueError, match="6n\\+2"):
        cifar.CifarResNet(21)
    assert get_study("cifar10").build_model({}).fc.out_features == 10
    assert get_study("cifar100").build_model({}).fc.out_features == 100
    assert get_study("cifar10").budget.val_fraction == 0.1


def write_image_folder(root: Path, split: str, wnids: list[str], per_class: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(len(split))
    for wnid in wnids:
        folder = root / split / wnid
        folder.mkdir(parents=True)
        for j in range(per_class):
            pixels = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{wnid}_{j}.JPEG", format="JPEG")


def test_imagenet100_loader_reads_an_image_folder(tmp_path: Path) -> None:
    wnids = ["n01440764", "n01443537", "n01484850"]
    write_image_folder(tmp_path, "train", wnids, 10)
    write_image_folder(tmp_path, "val", wnids, 2)
    imagenet100.prepare(str(tmp_path))
    request = DataRequest(val_fraction=0.1, seed=0, batch_size=4, data_root=str(tmp_path), augment=True)
    data = imagenet100.load_imagenet100(request, size=32)
    assert (data.num_train, data.num_val, data.num_test) == (27, 3, 6)
    assert data.test.classes == wnids
    assert sorted(int(data.val[i][1]) for i in range(3)) == [0, 1, 2]
    x, y = next(iter(data.train_batches(torch.Generator().manual_seed(0))))
    assert x.shape == (4, 3, 32, 32) and y.dtype == torch.long
    xt, yt = next(iter(data.eval_batches("test")))
    assert xt.shape == (6, 3, 32, 32) and yt.tolist() == [0, 0, 1, 1, 2, 2]


def test_imagenet100_layout_errors(tmp_path: Path) -> None:
    write_image_folder(tmp_path, "train", ["n01440764"], 1)
    with pytest.raises(FileNotFoundError, match="missing: val"):
        imagenet100.load_imagenet100(DataRequest(val_fraction=0.1, seed=0, batch_size=4, data_root=str(tmp_path)))
    write_image_folder(tmp_path, "val", ["n01443537"], 1)
    with pytest.raises(ValueError, match="different classes"):
        imagenet100.load_imagenet100(DataRequest(val_fraction=0.0, seed=0, batch_size=4, data_root=str(tmp_path)))


def test_imagenet100_model_is_resnet50_with_100_classes() -> None:
    model = get_study("imagenet100").build_model({})
    n = sum(p.numel() for p in model.parameters())
    assert 23.6e6 < n < 23.8e6  # ResNet-50 with a 100-way head
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, *imagenet100.INPUT_SHAPE)).shape == (1, 100)
