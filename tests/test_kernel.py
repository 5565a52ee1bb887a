"""The compiled CPU comparison kernel, its build/fallback, and BatchNorms measured from their source's pass."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from neve_tune import MeasurementError, VelocityMonitor, noise_aux
from neve_tune._measure import kernel as _kernel
from neve_tune.testing import compute_path, reloaded_kernel
from tests.test_velocity import ATOL, RTOL, BNConvNet, train_epoch, train_twins
from tests.velocity_reference import ReferenceVelocity, capture_responses


def neuron_rows(t: torch.Tensor, dim: int) -> torch.Tensor:
    return t.double().movedim(dim, 0).reshape(t.shape[dim], -1)


def assert_epochs_match_reference(monitor, ref, model, batches, gen, epochs=3):
    """Train an epoch, then measure: velocities equal the float64 reference's, every epoch."""
    for _ in range(epochs):
        train_epoch(model, (3, 8, 8), gen)
        V, _, v = ref.update(capture_responses(model, monitor.layer_names, batches))
        m = monitor.measure()
        assert m.model_velocity == pytest.approx(V, rel=RTOL, abs=ATOL) and V > 1e-4
        for name in monitor.layer_names:
            torch.testing.assert_close(m.layers[name], v[name], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("shape", "dim"),
    # neurons in the middle; innermost in narrow rows (column tiles of 16 plus a tail, several row blocks);
    # innermost in wide rows (summed row by row)
    [((7, 5, 6, 3), 1), ((4, 9, 6), 2), ((33, 5), 1), ((300, 16), 1), ((300, 21), 1), ((50, 40), 1), ((3, 50, 37), 2)],
)
def test_sums_equal_float64_and_the_snapshot_is_overwritten(kernel, shape, dim, dtype):
    gen = torch.Generator().manual_seed(0)
    out = torch.randn(shape, generator=gen, dtype=dtype)
    prev = (out + 0.01 * torch.randn(shape, generator=gen, dtype=dtype)) * 3
    expected_prev = prev.clone()
    c = shape[dim]
    scale = torch.rand(c, generator=gen, dtype=torch.float64) + 0.5
    cur, diff = torch.full((c,), 2.0, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)
    kernel.compare(out, prev, dim, scale, cur, diff)
    a, b = neuron_rows(out, dim), neuron_rows(expected_prev, dim)
    torch.testing.assert_close(cur, 2.0 + (a * a).sum(1), rtol=1e-13, atol=0)  # accumulates
    torch.testing.assert_close(diff, ((a - scale[:, None] * b) ** 2).sum(1), rtol=1e-12, atol=0)
    assert torch.equal(prev, out)


@pytest.mark.parametrize("c", [5, 21, 40])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_batchnorm_sums_come_from_the_source_pass(kernel, c, memory_format):
    gen = torch.Generator().manual_seed(1)
    bn = nn.BatchNorm2d(c).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=gen))
        bn.running_var.copy_(torch.rand(c, generator=gen) + 0.1)
        bn.weight.copy_(torch.randn(c, generator=gen))
        bn.bias.copy_(torch.randn(c, generator=gen))
    out = torch.randn(6, c, 4, 4, generator=gen).contiguous(memory_format=memory_format)
    prev = (out + 0.1 * torch.randn(out.shape, generator=gen)).contiguous(memory_format=memory_format)
    old = prev.clone()
    affine = torch.zeros(4, c, dtype=torch.float64)
    affine[2] = torch.rand(c, generator=gen, dtype=torch.float64) + 0.5  # alpha', beta' "before"
    affine[3] = torch.randn(c, generator=gen, dtype=torch.float64)
    zeros = [torch.zeros(c, dtype=torch.float64) for _ in range(4)]
    kernel.compare(out, prev, 1, torch.ones(c, dtype=torch.float64), zeros[0], zeros[1], bn, affine, *zeros[2:])
    assert torch.equal(prev, out)
    alpha = bn.weight.double() / (bn.running_var.double() + bn.eps).sqrt()
    beta = bn.bias.double() - bn.running_mean.double() * alpha
    torch.testing.assert_close(affine[0], alpha, rtol=1e-15, atol=0)
    torch.testing.assert_close(affine[1], beta, rtol=1e-14, atol=1e-15)
    y = neuron_rows(bn(out), 1)  # PyTorch's own float32 BatchNorm output
    y_before = affine[2, :, None] * neuron_rows(old, 1) + affine[3, :, None]
    torch.testing.assert_close(zeros[2], (y * y).sum(1), rtol=1e-6, atol=0)
    torch.testing.assert_close(zeros[3], ((y - y_before) ** 2).sum(1), rtol=1e-5, atol=0)


@pytest.mark.parametrize(
    ("c", "memory_format"), [(16, torch.contiguous_format), (21, torch.channels_last), (40, torch.channels_last)]
)
def test_results_do_not_depend_on_the_thread_count(kernel, c, memory_format):
    out = torch.randn(64, c, 32, 32).contiguous(memory_format=memory_format)
    prev0 = out + 0.01 * torch.randn_like(out)
    assert prev0.stride() == out.stride()
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            cur, diff = torch.zeros(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)
            kernel.compare(out, prev0.clone(), 1, torch.ones(c, dtype=torch.float64), cur, diff)
            results.append((cur, diff))
    finally:
        torch.set_num_threads(threads)
    for cur, diff in results[1:]:
        assert torch.equal(cur, results[0][0]) and torch.equal(diff, results[0][1])


def test_built_once_per_cache_then_loaded(kernel, tmp_path, monkeypatch):
    monkeypatch.setenv("NEVE_TUNE_CACHE_DIR", str(tmp_path))
    with reloaded_kernel():
        first = _kernel.get()
    assert first is not None and first.path.parent == tmp_path
    built = first.path.stat().st_mtime_ns
    with reloaded_kernel():
        again = _kernel.get()
    assert again is not None and again.path == first.path and again.path.stat().st_mtime_ns == built
    assert [p.name for p in tmp_path.iterdir()] == [first.path.name]  # no temporary files left behind


def test_without_a_compiler_it_falls_back_to_torch_ops_and_says_so(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("NEVE_TUNE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "no-such-compiler")
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing to find on PATH
    with reloaded_kernel():
        with caplog.at_level(logging.INFO, logger="neve_tune._measure.kernel"):
            assert _kernel.get() is None
        assert "no C compiler found" in caplog.text and "same numbers, slower" in caplog.text
        assert "Install a C compiler" in caplog.text
        model = BNConvNet()
        monitor = VelocityMonitor(model, noise_aux((3, 8, 8), n=4))
        monitor.measure()
        with torch.no_grad():
            model.conv1.weight.mul_(1.1).add_(0.01)
        assert monitor.measure().model_velocity > 0  # measured with PyTorch ops
        assert monitor.state_bytes() - monitor.snapshot_bytes() == 6 * 8 * (8 * 4 + 5)  # no fused BatchNorm


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("NEVE_TUNE_KERNEL", "0")
    with reloaded_kernel():
        assert _kernel.get() is None
        with pytest.raises(RuntimeError, match="kernel is not available"), compute_path("kernel"):
            pass


class ConvInplaceBN(nn.Module):
    """conv -> in-place ReLU -> BN: the BN's input is the conv output *changed*, so no pairing."""

    def __init__(self, track: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6, track_running_stats=track)
        self.conv2 = nn.Conv2d(6, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4, track_running_stats=track)  # paired when it tracks running stats
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        x = self.bn(torch.relu_(self.conv(x)))
        return self.fc(self.bn2(self.conv2(x)).flatten(1))


@pytest.mark.parametrize("track", [True, False])
def test_only_eval_batchnorms_fed_the_unchanged_output_are_paired_and_all_stay_exact(kernel, track):
    torch.manual_seed(0)
    model = ConvInplaceBN(track)
    aux = noise_aux((3, 8, 8), n=6)
    monitor = VelocityMonitor(model, aux, batch_size=4)
    ref = ReferenceVelocity()
    names, batches = monitor.layer_names, list(aux.split(4))
    monitor.measure()
    ref.update(capture_responses(model, names, batches))
    paired = {layer.name for layer in monitor._layers if any(p is not None for p in layer.fed_by)}
    assert paired == ({"bn2"} if track else set())
    per_sample = 2 * 6 * 64 + 4 * 64 + (0 if track else 4 * 64) + 3  # conv, bn, conv2, [bn2], fc
    assert monitor.snapshot_bytes() == 4 * 6 * per_sample
    assert_epochs_match_reference(monitor, ref, model, batches, torch.Generator().manual_seed(1))


def test_a_paired_batchnorm_that_stops_taking_its_source_output_rebaselines(kernel):
    class Switch(BNConvNet):
        skip = False

        def forward(self, x):
            h = self.conv1(x)
            if Switch.skip:
                h = h + 0  # bn1 now gets another tensor than conv1's output
            x = self.relu(self.bn1(h))
            x = self.relu(self.bn2(self.conv2(x)))
            return self.fc(x.flatten(1))

    model = Switch()
    monitor = VelocityMonitor(model, noise_aux((3, 8, 8), n=4))
    monitor.measure()
    assert monitor._layers[1].fed_by == [(monitor._layers[0], 0)]
    Switch.skip = True
    with pytest.raises(MeasurementError, match="BatchNorm 'bn1' no longer takes the output"):
        monitor.measure()
    assert monitor.measure() is None  # re-baseline, now without that pairing
    assert monitor._layers[1].fed_by == [None]
    assert monitor.measure().model_velocity == 0.0


def test_state_saved_on_the_fast_path_resumes_on_torch_ops(kernel):
    torch.manual_seed(0)
    model = BNConvNet()
    aux = noise_aux((3, 8, 8), n=6)
    fast = VelocityMonitor(model, aux, batch_size=4)
    gen = torch.Generator().manual_seed(5)
    fast.measure()
    train_epoch(model, (3, 8, 8), gen)
    fast.measure()
    state = fast.state_dict()
    assert fast.snapshot_bytes() == 4 * 6 * (2 * 8 * 64 + 5)  # conv1, conv2, fc: bn1/bn2 come from the convs
    clone = BNConvNet()
    clone.load_state_dict(model.state_dict())
    with compute_path("torch_ops"):  # a machine without the kernel
        slow = VelocityMonitor(clone, aux, batch_size=4)
        slow.load_state_dict(state)  # rebuilds bn1/bn2's snapshots from conv1/conv2's
    assert slow.snapshot_bytes() == 4 * 6 * (4 * 8 * 64 + 5)
    for _ in range(2):
        train_twins(model, clone, gen)
        a = fast.measure()
        with compute_path("torch_ops"):
            b = slow.measure()
        assert b.model_velocity == pytest.approx(a.model_velocity, rel=1e-5)
        for name in a.layers:
            torch.testing.assert_close(b.layers[name], a.layers[name], rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("shape", "order", "dim"),
    [((7, 5, 6, 3), (0, 2, 3, 1), 1), ((3, 4, 5, 2, 3), (0, 2, 3, 4, 1), 1), ((4, 9, 6), (2, 0, 1), 2)],
)
def test_permuted_dense_layouts_are_summed_in_memory_order(kernel, shape, order, dim, dtype):
    """channels_last(_3d) and other dense permutations: same sums as float64, the snapshot keeps its layout."""
    gen = torch.Generator().manual_seed(3)
    inverse = [order.index(d) for d in range(len(order))]
    out = torch.randn([shape[d] for d in order], generator=gen, dtype=dtype).permute(inverse)
    prev = torch.empty_like(out).copy_((out + 0.02 * torch.randn(shape, generator=gen, dtype=dtype)) * 2)
    assert not out.is_contiguous() and prev.stride() == out.stride()
    assert _kernel.memory_order(out) == order and kernel.supports(out, prev)
    assert not kernel.supports(out, prev.contiguous())  # strides must match
    assert not kernel.supports(out[:, :2], prev[:, :2])  # gapped views are not dense
    expected_prev = prev.clone()
    c = shape[dim]
    scale = torch.rand(c, generator=gen, dtype=torch.float64) + 0.5
    cur, diff = torch.zeros(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)
    kernel.compare(out, prev, dim, scale, cur, diff)
    a, b = neuron_rows(out, dim), neuron_rows(expected_prev, dim)
    torch.testing.assert_close(cur, (a * a).sum(1), rtol=1e-13, atol=0)
    torch.testing.assert_close(diff, ((a - scale[:, None] * b) ** 2).sum(1), rtol=1e-12, atol=0)
    assert torch.equal(prev, out) and prev.stride() == out.stride()


def test_channels_last_models_keep_channels_last_snapshots_pair_batchnorms_and_stay_exact(compute_path):
    torch.manual_seed(0)
    model = BNConvNet().to(memory_format=torch.channels_last)
    aux = noise_aux((3, 8, 8), n=6).contiguous(memory_format=torch.channels_last)
    monitor = VelocityMonitor(model, aux, batch_size=4)
    ref = ReferenceVelocity()
    names, batches = monitor.layer_names, list(aux.split(4))
    monitor.measure()
    ref.update(capture_responses(model, names, batches))
    by_name = {layer.name: layer for layer in monitor._layers}
    for name in ("conv1", "conv2"):
        assert all(t.is_contiguous(memory_format=torch.channels_last) for t in by_name[name].snapshots[0])
        assert not by_name[name].snapshots[0][0].is_contiguous()
    paired = {layer.name for layer in monitor._layers if any(p is not None for p in layer.fed_by)}
    if compute_path == "kernel":  # the same pairing, and the same bytes, as the contiguous model
        assert paired == {"bn1", "bn2"}
        assert monitor.snapshot_bytes() == 4 * 6 * (2 * 8 * 64 + 5)
    else:
        assert paired == set() and monitor.snapshot_bytes() == 4 * 6 * (4 * 8 * 64 + 5)
    assert_epochs_match_reference(monitor, ref, model, batches, torch.Generator().manual_seed(2))


def test_a_model_switched_to_channels_last_between_measurements_stays_exact(compute_path):
    """Snapshot contiguous, outputs channels_last: PyTorch ops compare them; a paired BatchNorm re-baselines."""
    torch.manual_seed(0)
    model = BNConvNet()
    aux = noise_aux((3, 8, 8), n=6)
    monitor = VelocityMonitor(model, aux)
    ref = ReferenceVelocity()
    names = monitor.layer_names
    monitor.measure()
    ref.update(capture_responses(model, names, [aux]))
    gen = torch.Generator().manual_seed(4)
    train_epoch(model, (3, 8, 8), gen)
    model.to(memory_format=torch.channels_last)
    if compute_path == "kernel":
        with pytest.raises(MeasurementError, match="changed its output dtype or layout"):
            monitor.measure()
        assert monitor.measure() is None  # the re-baseline records the new layout, pairing included
        assert monitor._layers[1].fed_by == [(monitor._layers[0], 0)]
        assert monitor._layers[0].snapshots[0][0].is_contiguous(memory_format=torch.channels_last)
        ref = ReferenceVelocity()  # velocities are still zero: nothing was measured before
        ref.update(capture_responses(model, names, [aux]))
        train_epoch(model, (3, 8, 8), gen)
    else:
        assert monitor._layers[0].snapshots[0][0].is_contiguous()
    V, _, v = ref.update(capture_responses(model, names, [aux]))
    m = monitor.measure()
    assert m.model_velocity == pytest.approx(V, rel=RTOL, abs=ATOL) and V > 1e-4
    for name in names:
        torch.testing.assert_close(m.layers[name], v[name], rtol=RTOL, atol=ATOL)
