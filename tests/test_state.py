"""Copies, autocast, bad input where it enters, and compact states (issue 12, items 4-7)."""

from __future__ import annotations

import copy
import io
import math
import pickle

import pytest
import torch
from torch import nn

from neve_tune import MeasurementError, NeVe, VelocityMonitor, noise_aux
from tests.test_velocity import BNConvNet, train_epoch, train_twins


def _pickled(obj):
    return pickle.loads(pickle.dumps(obj))


def _torch_saved(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


COPIES = {"pickle": _pickled, "deepcopy": copy.deepcopy, "torch.save": _torch_saved}


def _measured_monitor(batch_size=4):
    torch.manual_seed(0)
    model = BNConvNet()
    monitor = VelocityMonitor(model, noise_aux((3, 8, 8), n=6), batch_size=batch_size)
    gen = torch.Generator().manual_seed(5)
    monitor.measure()
    train_epoch(model, (3, 8, 8), gen)
    monitor.measure()
    return model, monitor, gen


def _assert_same(a, b):
    assert (a.model_velocity, a.velocity_change) == (b.model_velocity, b.velocity_change)
    for name in a.layers:
        assert torch.equal(a.layers[name], b.layers[name])


# ---------------------------------------------------------------------- item 4: copies
@pytest.mark.parametrize("how", list(COPIES))
def test_a_copied_monitor_measures_exactly_like_the_original_on_its_own_model(compute_path, how):
    model, monitor, gen = _measured_monitor()
    clone = COPIES[how](monitor)
    assert clone.model is not model and clone.snapshot_bytes() == monitor.snapshot_bytes()
    for _ in range(2):
        train_twins(model, clone.model, gen)  # the copy's hooks are on the copied model
        a, b = monitor.measure(), clone.measure()
        assert a.model_velocity > 1e-4
        _assert_same(a, b)


@pytest.mark.parametrize("how", list(COPIES))
def test_a_copied_neve_decides_exactly_like_the_original(compute_path, how):
    torch.manual_seed(0)
    model = BNConvNet()
    neve = NeVe(model, torch.optim.SGD(model.parameters(), lr=0.1), noise_aux((3, 8, 8), n=6), batch_size=4)
    gen = torch.Generator().manual_seed(1)
    train_epoch(model, (3, 8, 8), gen)
    neve.step()
    clone = COPIES[how](neve)
    assert clone.monitor.model is not model
    assert clone.optimizer.param_groups[0]["params"][0] is next(clone.monitor.model.parameters())
    train_twins(model, clone.monitor.model, gen)
    a, b = neve.step(), clone.step()
    assert a.model_velocity is not None and a.model_velocity > 1e-4
    fields = ("epoch", "model_velocity", "velocity_change", "lrs", "stop_reason")
    assert [getattr(a, f) for f in fields] == [getattr(b, f) for f in fields]


def test_a_pickled_monitor_carries_each_buffer_once(compute_path):
    _, monitor, _ = _measured_monitor(batch_size=2)  # 3 aux batches: many views of each flat buffer
    size = len(pickle.dumps(monitor))
    model_bytes = sum(t.numel() * t.element_size() for t in monitor.model.state_dict().values())
    aux_bytes = 6 * 3 * 8 * 8 * 4
    assert size < 1.3 * (monitor.state_bytes() + model_bytes + aux_bytes) + 200_000


class LitLike(nn.Module):
    """Holds its network and its NeVe, as a LightningModule does (``self.neve``)."""

    def __init__(self, measure_self: bool) -> None:
        super().__init__()
        self.net = BNConvNet()
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        self.neve = NeVe(self if measure_self else self.net, opt, noise_aux((3, 8, 8), n=6), batch_size=4)

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("measure_self", [False, True])
def test_deepcopy_of_a_module_holding_its_neve_gives_a_neve_on_the_copied_module(compute_path, measure_self):
    torch.manual_seed(0)
    lit = LitLike(measure_self)
    twin = copy.deepcopy(lit)
    assert twin.neve is not lit.neve
    assert twin.neve.monitor.model is (twin if measure_self else twin.net)
    twin_modules = {id(m) for m in twin.modules()}
    assert all(id(layer.module) in twin_modules for layer in twin.neve.monitor._layers)
    gen = torch.Generator().manual_seed(2)
    train_twins(lit.net, twin.net, gen)
    a, b = lit.neve.step(), twin.neve.step()
    assert a.model_velocity is not None and a.model_velocity > 1e-4 and a.model_velocity == b.model_velocity
    train_epoch(twin.net, (3, 8, 8), gen)  # only the copy trains: only its NeVe sees responses move
    still, moved = lit.neve.step().model_velocity, twin.neve.step().model_velocity
    assert still == pytest.approx(0.5 * a.model_velocity, rel=1e-6)  # 1 - rho = 0: v = -momentum * v_prev
    assert moved != pytest.approx(still, rel=1e-2)


# ---------------------------------------------------------------------- item 5: autocast
def test_step_inside_autocast_measures_as_outside_and_the_epoch_count_never_drifts(compute_path):
    torch.manual_seed(0)
    model, twin = BNConvNet(), BNConvNet()
    twin.load_state_dict(model.state_dict())
    aux = noise_aux((3, 8, 8), n=6)
    inside = NeVe(model, torch.optim.SGD(model.parameters(), lr=0.1), aux)
    outside = NeVe(twin, torch.optim.SGD(twin.parameters(), lr=0.1), aux)
    gen = torch.Generator().manual_seed(3)
    for epoch in range(1, 4):
        train_twins(model, twin, gen)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            a = inside.step()
        b = outside.step()
        assert a.epoch == b.epoch == inside.last_epoch == epoch
        assert a.model_velocity is not None and a.model_velocity == b.model_velocity
    assert inside.monitor._layers[0].snapshots[0][0].dtype == torch.float32  # the model's own dtype


def test_the_epoch_count_equals_the_number_of_steps_after_a_failed_measurement():
    class Flaky(BNConvNet):
        fail = False

        def forward(self, x):
            if Flaky.fail:
                raise MeasurementError("injected failure")
            return super().forward(x)

    model = Flaky()
    neve = NeVe(model, torch.optim.SGD(model.parameters(), lr=0.1), noise_aux((3, 8, 8), n=4))
    neve.step()
    Flaky.fail = True
    with pytest.raises(MeasurementError):
        neve.step()
    Flaky.fail = False
    rebaseline = neve.step()
    assert rebaseline.model_velocity is None and rebaseline.epoch == neve.last_epoch == 3
    assert neve.step().epoch == 4


# ---------------------------------------------------------------------- item 6: bad input
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_aux_inputs_are_refused_when_neve_is_built(bad):
    aux = noise_aux((3, 8, 8), n=6)
    aux[4, 1, 2, 3] = bad
    model = BNConvNet()
    with pytest.raises(ValueError, match=r"aux set holds 1 NaN/inf value\(s\) .* read as diverged"):
        NeVe(model, torch.optim.SGD(model.parameters(), lr=0.1), aux)
    with pytest.raises(ValueError, match="NaN/inf"):
        VelocityMonitor(model, [(aux[:3],), {"x": aux[3:]}])


class Heads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
        self.head = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


@pytest.mark.parametrize(
    ("layers", "names"),
    [
        ("head", ["head"]),
        ("features.*", ["features.0", "features.1", "features.2"]),
        (nn.Linear, ["head"]),
        (lambda n, m: n.endswith("2"), ["features.2"]),
        (["head", nn.Conv2d], ["features.0", "features.2", "head"]),
        ([nn.Conv2d], ["features.0", "features.2"]),
    ],
)
def test_layers_takes_one_name_glob_type_or_predicate_or_a_sequence_of_them(layers, names):
    monitor = VelocityMonitor(Heads(), noise_aux((3, 8, 8), n=2), layers=layers)
    assert monitor.layer_names == names
    monitor.measure()
    assert set(monitor.measure().layers) == set(names)


def test_bad_layer_selectors_say_what_is_accepted():
    with pytest.raises(TypeError, match=r"not an nn.Module type; pass a module type"):
        VelocityMonitor(Heads(), noise_aux((3, 8, 8), n=2), layers=int)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"got 3 in \[3\]"):
        VelocityMonitor(Heads(), noise_aux((3, 8, 8), n=2), layers=[3])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="matches no module"):
        VelocityMonitor(Heads(), noise_aux((3, 8, 8), n=2), layers="tail")


def _saved(model, aux):
    monitor = VelocityMonitor(model, aux)
    monitor.measure()
    monitor.measure()
    return monitor.state_dict()


def test_a_state_saved_with_another_aux_set_is_refused_at_load():
    torch.manual_seed(0)
    model = BNConvNet()
    state = _saved(model, noise_aux((3, 8, 8), n=6, seed=0))
    other = VelocityMonitor(model, noise_aux((3, 8, 8), n=6, seed=1))
    other.measure()
    with pytest.raises(ValueError, match=r"saved with another aux set .* seed"):
        other.load_state_dict(state)
    assert other.measure().model_velocity == 0.0  # refused: the monitor is as it was
    same = VelocityMonitor(model, noise_aux((3, 8, 8), n=6, seed=0))
    same.load_state_dict(state)
    assert same.measure().model_velocity == 0.0


def test_a_state_from_a_wider_model_is_refused_at_load_and_says_which_layer():
    class Net(nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, width), nn.Linear(width, 2)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    aux = noise_aux((4,), n=5)
    state = _saved(Net(16), aux)
    narrow = VelocityMonitor(Net(8), aux)
    narrow.measure()
    with pytest.raises(ValueError, match=r"layer 'fc1' has 16 neurons, but this model's has 8"):
        narrow.load_state_dict(state)
    unmeasured = VelocityMonitor(Net(8), aux)  # no output seen yet: the parameter shapes tell
    with pytest.raises(ValueError, match=r"layer 'fc1' has parameter shapes .*'weight': \[16, 4\]"):
        unmeasured.load_state_dict(state)
    again = VelocityMonitor(Net(16), aux)
    again.load_state_dict(state)  # into the model it was saved with


@pytest.mark.parametrize("version", [None, 1, 2, 4])
def test_a_state_of_another_format_is_refused_with_its_version(version):
    aux = torch.randn(8, 4)
    state = _saved(nn.Sequential(nn.Linear(4, 3)), aux)
    if version is None:
        del state["format_version"]
    else:
        state["format_version"] = version
    monitor = VelocityMonitor(nn.Sequential(nn.Linear(4, 3)), aux)
    with pytest.raises(ValueError, match=rf"format_version={version}, but this version of neve_tune reads format 3"):
        monitor.load_state_dict(state)


def test_a_float_aux_on_a_double_model_is_reported_as_a_dtype_problem():
    model = BNConvNet().double()
    with pytest.raises(ValueError, match=r"dtype \(float32\) is not the model's \(float64\).*model\.float\(\)") as err:
        NeVe(model, torch.optim.SGD(model.parameters(), lr=0.1), noise_aux((3, 8, 8), n=4))
    assert "dtype=torch.float64" in str(err.value) and "shape problem" in str(err.value)


# ---------------------------------------------------------------------- item 7: compact states
def _resumed(state, model, aux):
    clone = BNConvNet()
    clone.load_state_dict(model.state_dict())
    restored = VelocityMonitor(clone, aux, batch_size=4)
    restored.load_state_dict(state)
    return clone, restored


def test_half_state_is_half_the_bytes_and_resumes_within_its_error(compute_path):
    model, monitor, gen = _measured_monitor()
    full, half = monitor.state_dict(), monitor.state_dict(snapshot="half")

    def snapshot_bytes(state):
        slices = [t for e in state["layers"] for row in e["snapshots"] for t in row if t is not None]
        return sum(t.numel() * t.element_size() for t in slices)

    assert snapshot_bytes(half) * 2 == snapshot_bytes(full) == monitor.snapshot_bytes()
    buffer = io.BytesIO()
    torch.save(half, buffer)  # a checkpoint of plain tensors, floats and strings
    buffer.seek(0)
    clone, restored = _resumed(torch.load(buffer, weights_only=True), model, noise_aux((3, 8, 8), n=6))
    train_twins(model, clone, gen)
    a, b = monitor.measure(), restored.measure()
    assert b.model_velocity != a.model_velocity
    assert b.model_velocity == pytest.approx(a.model_velocity, rel=1e-3)
    assert b.velocity_change == pytest.approx(a.velocity_change, rel=1e-2)


def test_a_state_without_snapshot_rebaselines_on_resume_then_continues(compute_path):
    model, monitor, gen = _measured_monitor()
    monitor.state_snapshot = "none"  # the constructor option, set afterwards
    state = monitor.state_dict()
    assert state["snapshot"] == "none" and all(e["snapshots"] == [] for e in state["layers"])
    clone, restored = _resumed(state, model, noise_aux((3, 8, 8), n=6))
    assert restored.snapshot_bytes() == 0
    train_twins(model, clone, gen)
    monitor.measure()
    assert restored.measure() is None  # the lost epoch: a fresh baseline
    train_twins(model, clone, gen)
    a, b = monitor.measure(), restored.measure()
    assert b.index == a.index - 1 and b.model_velocity is not None and b.model_velocity > 1e-4  # one lost
    with pytest.raises(ValueError, match=r"snapshot must be one of \('full', 'half', 'none'\)"):
        monitor.state_dict(snapshot="bf16")  # type: ignore[arg-type]


def test_neve_resumed_from_a_state_without_snapshot_loses_one_epoch_of_velocity():
    torch.manual_seed(0)
    model = BNConvNet()
    aux = noise_aux((3, 8, 8), n=6)
    neve = NeVe(model, torch.optim.SGD(model.parameters(), lr=0.1), aux)
    neve.monitor.state_snapshot = "none"
    neve.step()
    state = neve.state_dict()
    resumed = NeVe(model, torch.optim.SGD(model.parameters(), lr=0.1), aux)
    resumed.load_state_dict(state)
    first, second = resumed.step(), resumed.step()
    assert (first.epoch, first.model_velocity) == (2, None)
    assert second.epoch == 3 and second.model_velocity is not None


def test_neve_passes_its_state_snapshot_choice_to_the_monitor():
    model = BNConvNet()
    neve = NeVe(model, torch.optim.SGD(model.parameters(), lr=0.1), noise_aux((3, 8, 8), n=4), state_snapshot="half")
    assert neve.monitor.state_snapshot == "half"
    assert neve.state_dict()["monitor"]["snapshot"] == "half"
    with pytest.raises(ValueError, match="snapshot must be one of"):
        NeVe(model, torch.optim.SGD(model.parameters(), lr=0.1), noise_aux((3, 8, 8), n=4), state_snapshot="fp8")
