"""Aux sets: fixed, label-free, and never touching the global RNG."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from neve_tune import VelocityMonitor, image_folder_aux, noise_aux, subset_aux


def test_noise_aux_is_reproducible_and_leaves_the_global_rng_alone():
    before = torch.get_rng_state()
    a = noise_aux((3, 4, 4), n=10, seed=7)
    b = noise_aux((3, 4, 4), n=10, seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    assert a.shape == (10, 3, 4, 4) and torch.equal(a, b)
    assert not torch.equal(a, noise_aux((3, 4, 4), n=10, seed=8))
    assert abs(float(a.mean())) < 0.2 and 0.8 < float(a.std()) < 1.2  # standard normal
    u = noise_aux((1000,), n=2, distribution="uniform")
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    with pytest.raises(ValueError, match="distribution must be"):
        noise_aux((3,), distribution="laplace")
    with pytest.raises(ValueError, match="n >= 1"):
        noise_aux((3,), n=0)


def test_subset_aux_drops_labels_and_is_fixed():
    data = torch.utils.data.TensorDataset(torch.arange(50.0).view(50, 1), torch.zeros(50, dtype=torch.long))
    before = torch.get_rng_state()
    a, b = subset_aux(data, n=8, seed=1), subset_aux(data, n=8, seed=1)
    assert torch.equal(torch.get_rng_state(), before)
    assert a.shape == (8, 1) and torch.equal(a, b)
    assert len(set(a.view(-1).tolist())) == 8  # distinct samples, no labels
    assert subset_aux(data, n=500).shape == (50, 1)
    with pytest.raises(ValueError, match="empty dataset"):
        subset_aux([], n=3)


def test_image_folder_aux_reads_real_image_files(tmp_path):
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for i, cls in enumerate(["n01", "n02", "n02"]):
        (tmp_path / cls).mkdir(exist_ok=True)
        pixels = (torch.rand(40, 30, 3, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(tmp_path / cls / f"img{i}.{'png' if i else 'JPEG'}")
    (tmp_path / "notes.txt").write_text("not an image")
    from torchvision import transforms

    small = transforms.Compose([transforms.Resize((16, 16)), transforms.ToTensor()])
    aux = image_folder_aux(tmp_path, n=10, transform=small)
    assert aux.shape == (3, 3, 16, 16) and float(aux.min()) >= 0.0 and float(aux.max()) <= 1.0
    default = image_folder_aux(tmp_path, n=2)
    assert default.shape == (2, 3, 224, 224)
    with pytest.raises(ValueError, match="no image"):
        image_folder_aux(_empty(tmp_path))
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        image_folder_aux(tmp_path / "missing")


def _empty(tmp_path):
    path = tmp_path / "empty"
    path.mkdir()
    return path


def test_iterables_of_tensor_tuple_and_dict_batches():
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 4)

        def forward(self, x, scale):
            return self.a(x) * scale

    model = TwoInputs()
    x = torch.randn(6, 3)
    tuples = [(x[:3], 2.0), (x[3:], 2.0)]
    dicts = [{"x": x[:3], "scale": 2.0}, {"x": x[3:], "scale": 2.0}]
    mons = [VelocityMonitor(model, tuples), VelocityMonitor(model, dicts), VelocityMonitor(model, iter(tuples))]
    for m in mons:
        m.measure()
    with torch.no_grad():
        model.a.weight.add_(0.3)
    values = [m.measure().model_velocity for m in mons]
    assert values[0] > 0 and values[0] == values[1] == values[2]
    with pytest.raises(ValueError, match="batch_size= only splits a tensor"):
        VelocityMonitor(model, tuples, batch_size=2)


@pytest.mark.parametrize("dtype", [torch.long, torch.int32, torch.uint8, torch.bool])
def test_noise_aux_with_an_integer_dtype_points_to_token_aux(dtype):
    pointer = r"noise_aux draws floating noise.*neve_tune\.token_aux\(vocab_size, seq_len, n\)"
    with pytest.raises(TypeError, match=pointer):
        noise_aux((8,), n=4, dtype=dtype)
    assert noise_aux((2,), n=3, dtype=torch.float64).dtype == torch.float64
