"""NeVe in a plain PyTorch loop: side effects, resume, errors, metrics, LRScheduler conventions."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from neve_tune import NeVe, NeVeRule, StopReason, VelocityMonitor, keys, noise_aux
from neve_tune.studies.builtin.digits import DigitsCNN, load_digits_splits
from tests.readme import readme_example


class DropoutNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.Dropout(0.3)
        )
        self.frozen_bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        return self.head(self.frozen_bn(self.body(x)).flatten(1))


def train(model, opt, data, epochs, neve=None, gen_seed=0):
    """Train; optionally step NeVe after each epoch. Returns the NeVe results."""
    x, y = data
    results = []
    torch.manual_seed(gen_seed)
    for _ in range(epochs):
        model.train()
        model.frozen_bn.eval()  # a submodule the user keeps in eval mode
        for xb, yb in zip(x.split(32), y.split(32), strict=True):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
        if neve is not None:
            results.append(neve.step())
    return results


@pytest.fixture(scope="module")
def digits():
    s = load_digits_splits()
    return s.x_train[:256], s.y_train[:256]


def test_measuring_every_epoch_is_bit_identical_to_not_measuring(digits):
    torch.manual_seed(0)
    a = DropoutNet()
    b = DropoutNet()
    b.load_state_dict(a.state_dict())
    opt_a = torch.optim.SGD(a.parameters(), lr=0.05, momentum=0.9)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9)
    neve = NeVe(b, opt_b, noise_aux((1, 8, 8), n=50), patience=1000, stop_threshold=1e-12)

    train(a, opt_a, digits, 3)
    rng_a = torch.get_rng_state()
    results = train(b, opt_b, digits, 3, neve=neve)
    rng_b = torch.get_rng_state()

    assert all(r.model_velocity > 0 for r in results)  # NeVe really measured
    assert torch.equal(rng_a, rng_b)  # global RNG untouched (dropout draws match)
    for (name, ta), (_, tb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(ta, tb), name  # weights and BN running statistics
    assert [m.training for m in a.modules()] == [m.training for m in b.modules()]
    assert b.training and not b.frozen_bn.training


def test_digits_convergence_decays_and_stops_by_itself():
    splits = load_digits_splits()
    torch.manual_seed(0)
    model = DigitsCNN(width=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    neve = NeVe(model, opt, noise_aux((1, 8, 8)), patience=1)
    x, y = splits.x_train, splits.y_train
    for _ in range(100):
        model.train()
        for xb, yb in zip(x.split(32), y.split(32), strict=True):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
        result = neve.step()
        if result.should_stop:
            break
    assert result.converged and result.stop_reason is StopReason.CONVERGED
    assert result.model_velocity < 1e-3 and result.epoch < 100
    assert neve.rule.num_decays >= 1 and result.lrs[0] <= 0.05  # the plateau rule halved the LR
    assert neve.get_last_lr() == result.lrs == [g["lr"] for g in opt.param_groups]
    model.eval()
    with torch.no_grad():
        assert (model(splits.x_test).argmax(1) == splits.y_test).float().mean() > 0.95


def test_state_dict_round_trip_mid_run_gives_identical_velocities_and_decisions(digits):
    def make():
        torch.manual_seed(0)
        model = DigitsCNN(width=8)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return model, opt

    aux = noise_aux((1, 8, 8), n=40)
    model, opt = make()
    neve = NeVe(model, opt, aux, patience=0)
    x, y = digits

    def epoch(model, opt, seed):
        torch.manual_seed(seed)
        model.train()
        perm = torch.randperm(len(y))
        for idx in perm.split(32):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()

    for e in range(3):
        epoch(model, opt, e)
        neve.step()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "neve": neve.state_dict()}, buffer)
    saved_metrics = neve.metrics()
    expected = []
    for e in range(3, 8):
        epoch(model, opt, e)
        expected.append(neve.step())

    buffer.seek(0)
    ckpt = torch.load(buffer, weights_only=False)
    model2, opt2 = make()
    neve2 = NeVe(model2, opt2, aux, patience=0)  # takes its own baseline, then is overwritten
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    neve2.load_state_dict(ckpt["neve"])
    assert neve2.metrics() == saved_metrics
    got = []
    for e in range(3, 8):
        epoch(model2, opt2, e)
        got.append(neve2.step())
    assert got == expected  # velocities, changes, LRs, decays, stop reasons: exactly equal
    assert any(r.lr_decayed for r in expected)


def test_metrics_keys_and_values():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD([{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.01}], lr=0.1)
    neve = NeVe(model, opt, torch.randn(16, 4))
    assert neve.metrics() == {
        keys.EPOCH: 0.0,
        keys.LR: 0.1,
        keys.lr_key(0): 0.1,
        keys.lr_key(1): 0.01,
        keys.LR_DECAYED: 0.0,
        keys.NUM_DECAYS: 0.0,
        keys.CONVERGED: 0.0,
        keys.DIVERGED: 0.0,
        keys.STALLED: 0.0,
        keys.COLLAPSED: 0.0,
        keys.MEMORIZING: 0.0,
        keys.STOP_THRESHOLD: 1e-3,
        keys.MIN_EPOCHS: 5.0,
    }
    with torch.no_grad():
        model[0].weight.mul_(-1.0)
    first = neve.step()
    m = neve.metrics()
    assert keys.VELOCITY_CHANGE not in m and m[keys.MODEL_VELOCITY] == first.model_velocity > 0
    neve.step()
    m = neve.metrics()
    assert m[keys.EPOCH] == 2.0 and m[keys.VELOCITY_CHANGE] == neve.last_result.velocity_change
    assert all(type(v) is float for v in m.values())
    assert all(k.startswith(keys.PREFIX) for k in m)


def test_nan_loss_reports_diverged_and_is_never_zeroed(digits):
    torch.manual_seed(0)
    model = DigitsCNN(width=4)
    opt = torch.optim.SGD(model.parameters(), lr=1e6)
    neve = NeVe(model, opt, noise_aux((1, 8, 8), n=20))
    x, y = digits
    result = None
    for _ in range(5):
        for xb, yb in zip(x.split(64), y.split(64), strict=True):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
        result = neve.step()
        if result.should_stop:
            break
    assert result.diverged and result.stop_reason is StopReason.DIVERGED
    assert not math.isfinite(result.model_velocity)
    assert not result.converged and not result.lr_decayed
    assert neve.metrics()[keys.DIVERGED] == 1.0
    assert "diverged" in result.message and "lower the learning rate" in result.message


def test_is_an_lr_scheduler_for_lightning_style_drivers():
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    neve = NeVe(model, opt, torch.randn(4, 3))
    assert isinstance(neve, torch.optim.lr_scheduler.LRScheduler)
    assert neve.get_last_lr() == [0.1]
    state = neve.state_dict()
    assert "optimizer" not in state and opt not in state.values()
    assert not hasattr(opt.step, "_wrapped_by_lr_sched")  # we do not patch the optimizer


# ---------------------------------------------------------------- errors that name the fix


def test_error_optimizer_is_not_an_optimizer():
    model = nn.Linear(3, 2)
    with pytest.raises(TypeError, match="^list is not an Optimizer$"):
        NeVe(model, [torch.optim.SGD(model.parameters(), lr=0.1)], torch.randn(4, 3))


def test_error_factor_must_be_below_one():
    model = nn.Linear(3, 2)
    message = r"factor must be between 0 and 1 exclusive \(factor < 1.0\), but got factor=1.5"
    with pytest.raises(ValueError, match=message):
        NeVe(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.randn(4, 3), factor=1.5)


def test_error_min_lr_per_group_count():
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="expected 1 min_lrs"):
        NeVe(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.randn(4, 3), min_lr=[0.0, 0.1])


def test_error_aux_shape_names_the_shape_the_model_needs():
    model = DigitsCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError) as info:
        NeVe(model, opt, noise_aux((3, 32, 32), n=4))
    text = str(info.value)
    assert "aux batch of shape (4, 3, 32, 32)" in text
    assert "'features.0' (Conv2d) expects inputs shaped (N, 1, H, W)" in text
    assert "noise_aux" in text
    # nothing was lost: the model still trains and a correct aux set works
    assert NeVe(model, opt, noise_aux((1, 8, 8), n=4)).step().epoch == 1


def test_error_linear_aux_shape():
    with pytest.raises(ValueError, match=r"expects inputs shaped \(N, \.\.\., 7\)"):
        VelocityMonitor(nn.Sequential(nn.Linear(7, 2)), torch.randn(3, 5)).measure()


@pytest.mark.parametrize("aux", [torch.empty(0, 3), [], iter([])])
def test_error_empty_aux(aux):
    with pytest.raises(ValueError, match="aux set is empty.*noise_aux"):
        VelocityMonitor(nn.Linear(3, 2), aux)


def test_error_no_hookable_layer_and_selection_matching_nothing():
    with pytest.raises(ValueError, match="has no layer NeVe hooks by default.*layers="):
        VelocityMonitor(nn.Sequential(nn.ReLU(), nn.Tanh()), torch.randn(2, 3))
    with pytest.raises(ValueError, match="matches no module.*Module names look like"):
        VelocityMonitor(DigitsCNN(), torch.randn(2, 1, 8, 8), layers=["encoder.*"])


def test_error_hooked_module_returning_non_tensor():
    class TupleOut(nn.Module):
        def forward(self, x):
            return x, x

    model = nn.Sequential(nn.Linear(3, 3))
    model.add_module("pair", TupleOut())
    mon = VelocityMonitor(nn.Sequential(model), torch.randn(2, 3), layers=lambda n, m: isinstance(m, TupleOut))
    with pytest.raises(TypeError, match="returns tuple, not a tensor.*Exclude it with `layers=`"):
        mon.measure()


# ---------------------------------------------------------------- the README example


def test_readme_pytorch_example_stops_by_itself_with_high_accuracy(capsys):
    namespace: dict = {}
    exec(readme_example("pytorch"), namespace)
    result, test_acc = namespace["result"], namespace["test_acc"]
    assert result.converged and result.epoch < 100
    assert test_acc >= 0.95
    assert "converged" in capsys.readouterr().out


def test_step_result_metrics_are_neves_metrics_key_for_key(digits):
    """One builder: StepResult.metrics() is what NeVe.metrics() returned right after that step."""
    torch.manual_seed(0)
    model = DigitsCNN(width=4)
    opt = torch.optim.SGD([{"params": model.features.parameters()}, {"params": model.head.parameters()}], lr=0.5)
    neve = NeVe(model, opt, noise_aux((1, 8, 8), n=20), momentum=0.0, patience=0, stop_threshold=1e-12)
    x, y = digits
    seen = []
    for epoch in range(6):
        for xb, yb in zip(x.split(64), y.split(64), strict=True):
            if epoch >= 2:  # then the model stands still: v = 0, D stops improving, the LR decays
                break
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
        result = neve.step()
        assert result.metrics() == neve.metrics()
        assert result.num_decays == neve.rule.num_decays
        seen.append(result.metrics())
    assert seen[-1][keys.NUM_DECAYS] >= 1.0  # patience=0: the LR decayed along the way
    assert {keys.lr_key(0), keys.lr_key(1), keys.NUM_DECAYS, keys.VELOCITY_CHANGE} <= set(seen[-1])

    restored = NeVe(model, opt, noise_aux((1, 8, 8), n=20), momentum=0.0, patience=0, stop_threshold=1e-12)
    restored.load_state_dict(neve.state_dict())
    assert restored.metrics() == neve.metrics() == restored.last_result.metrics()


# ---------------------------------------------------------------- issue 12: converged only for a network that learned
# The README's digits loop, varied as a new user would. Before issue 12 every one of these but the healthy run was
# called "converged" (no BN lr=1e-4: epoch 1 at 11.8%; BN lr=1e-5: epoch 7 at 13.3%; the collapse: epoch 11 at 10%).


def _readme_loop(*, bn=True, lr=0.1, batch=64, with_loss=True, epochs=60, **neve_kwargs):
    """The README's plain-PyTorch loop (seed 0, unshuffled batches), passing the epoch's mean loss to step()."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    torch.manual_seed(0)
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16
    y = torch.tensor(data.target)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, stratify=y, random_state=0)
    norm = [nn.BatchNorm2d(16)] if bn else []
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), *norm, nn.ReLU(inplace=True), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(256, 10)
    )
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    neve = NeVe(model, opt, noise_aux((1, 8, 8), n=100), **neve_kwargs)
    with _one_thread():
        result = _train_readme(neve, model, opt, x_tr, y_tr, batch, with_loss, epochs)
    model.eval()
    with torch.no_grad():
        test_acc = (model(x_te).argmax(1) == y_te).float().mean().item()
    return neve, result, test_acc


class _one_thread:
    """Train on one thread (the numbers do not depend on it; the 2 shared cores do)."""

    def __enter__(self):
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.threads)


def _train_readme(neve, model, opt, x_tr, y_tr, batch, with_loss, epochs):
    for _ in range(epochs):
        model.train()
        total = 0.0
        for xb, yb in zip(x_tr.split(batch), y_tr.split(batch), strict=True):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
            total += loss.item() * len(yb)
        result = neve.step(total / len(y_tr) if with_loss else None)
        if neve.should_stop:
            break
    return result


@pytest.mark.parametrize("with_loss", [True, False])
def test_healthy_readme_run_still_converges_at_epoch_18(with_loss):
    neve, result, test_acc = _readme_loop(with_loss=with_loss)
    assert (result.epoch, result.stop_reason) == (18, StopReason.CONVERGED)
    assert neve.converged and neve.should_stop and neve.stop_reason is StopReason.CONVERGED
    assert test_acc >= 0.98  # 0.987


@pytest.mark.parametrize(("with_loss", "epoch"), [(True, 6), (False, 5)])
def test_no_batchnorm_lr_1e4_is_stalled_not_converged(with_loss, epoch):
    """HEAD: converged at epoch 1 at 11.8% test accuracy. The network never moved (peak V ~2e-4)."""
    neve, result, test_acc = _readme_loop(bn=False, lr=1e-4, with_loss=with_loss)
    assert (result.epoch, result.stop_reason) == (epoch, StopReason.STALLED)
    assert neve.should_stop and not neve.converged and result.stalled
    assert test_acc < 0.2
    assert "stalled" in result.message and "learning rate" in result.message


def test_batchnorm_lr_1e5_is_stalled_with_the_training_loss():
    """HEAD: converged at epoch 7 at 13.3% (the early V is BN statistics settling). The loss shows no learning."""
    _, result, test_acc = _readme_loop(lr=1e-5)
    assert (result.epoch, result.stop_reason) == (7, StopReason.STALLED)
    assert "chance-level loss" in result.detail
    assert test_acc < 0.2


@pytest.mark.parametrize(("lr", "epoch", "acc"), [(1e-4, 32, 0.85), (3e-4, 25, 0.92)])
def test_a_slow_learner_is_not_converged_while_its_loss_still_falls(lr, epoch, acc):
    """Before: converged at epoch 12 at 74.2% (lr 1e-4, loss 1.68 and falling) and at 8 at 86.9% (lr 3e-4): its
    aux responses had settled, but it was still learning. Now it trains on until the loss flattens too."""
    neve, result, test_acc = _readme_loop(lr=lr, epochs=100)
    assert (result.epoch, result.stop_reason) == (epoch, StopReason.CONVERGED)  # 89.1%, 94.2%
    assert test_acc >= acc
    assert neve.rule.detector.slope() < neve.rule.detector.criteria.min_slope  # the loss no longer falls


@pytest.mark.parametrize(("lr", "with_loss"), [(0.2, True), (0.5, False), (2.0, True), (5.5, False)])
def test_collapsed_network_sgd_momentum_batch_16_is_collapsed(lr, with_loss):
    """HEAD: converged at epoch 11 at chance (every ReLU dead). The raw change freezes at epoch 4."""
    neve, result, test_acc = _readme_loop(lr=lr, batch=16, with_loss=with_loss)
    assert (result.epoch, result.stop_reason) == (5, StopReason.COLLAPSED)  # frozen at 4, reported after warm-up
    assert result.collapsed and neve.should_stop and not neve.converged
    assert "froze at epoch 4" in result.detail
    assert test_acc <= 0.11
    m = neve.metrics()
    assert (m[keys.COLLAPSED], m[keys.CONVERGED], m[keys.STALLED]) == (1.0, 0.0, 0.0)


def test_warm_up_decides_nothing_but_divergence():
    _, result, _ = _readme_loop(bn=False, lr=1e-4, min_epochs=9)
    assert (result.epoch, result.stop_reason) == (9, StopReason.STALLED)  # V was under 1e-3 from epoch 1
    _, result, _ = _readme_loop(lr=1e4, min_epochs=50, epochs=3)
    assert (result.epoch, result.stop_reason) == (1, StopReason.DIVERGED)  # divergence ignores the warm-up


def _tabular_loop(*, lr, batch, norm, with_loss=True, epochs=60):
    from sklearn.datasets import make_classification
    from sklearn.model_selection import train_test_split

    x, y = make_classification(
        n_samples=3000, n_features=20, n_informative=10, n_redundant=4, n_classes=5, random_state=0
    )
    x_tr, _, y_tr, _ = train_test_split(torch.tensor(x, dtype=torch.float32), torch.tensor(y), test_size=0.25,
                                        stratify=y, random_state=0)  # fmt: skip
    x_tr = (x_tr - x_tr.mean(0)) / x_tr.std(0)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(20, 128), norm(128), nn.ReLU(), nn.Linear(128, 64), norm(64), nn.ReLU(), nn.Linear(64, 5)
    )
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    neve = NeVe(model, opt, noise_aux((20,), n=100))
    g = torch.Generator().manual_seed(0)
    with _one_thread():
        return _train_tabular(neve, model, opt, x_tr, y_tr, g, batch, with_loss, epochs)


def _train_tabular(neve, model, opt, x_tr, y_tr, g, batch, with_loss, epochs):
    for _ in range(epochs):
        total = 0.0
        for idx in torch.randperm(len(y_tr), generator=g).split(batch):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x_tr[idx]), y_tr[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        result = neve.step(total / len(y_tr) if with_loss else None)
        if result.should_stop:
            break
    return result


@pytest.mark.slow
def test_stuck_at_chance_with_a_velocity_that_never_settles_is_stalled_with_the_loss():
    """An LR too large for batch 16: V stays ~1e-2 for 60 epochs at chance. HEAD: ran to the cap."""
    result = _tabular_loop(lr=2.0, batch=16, norm=nn.LayerNorm)
    assert (result.epoch, result.stop_reason) == (35, StopReason.STALLED)
    assert result.detail.startswith("unsettled") and result.model_velocity > 1e-3
    # Without the loss nothing validation-free tells it from a network still learning: it runs to the cap.
    result = _tabular_loop(lr=2.0, batch=16, norm=nn.LayerNorm, with_loss=False)
    assert (result.epoch, result.stop_reason) == (60, None)


def test_num_classes_is_inferred_only_from_a_final_linear():
    opt = lambda m: torch.optim.SGD(m.parameters(), lr=0.1)  # noqa: E731
    head = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    assert NeVe(head, opt(head), torch.randn(8, 4)).rule.num_classes == 3
    regression = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    assert NeVe(regression, opt(regression), torch.randn(8, 4)).rule.num_classes is None
    normed = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8))
    assert NeVe(normed, opt(normed), torch.randn(8, 4)).rule.num_classes is None
    assert NeVe(head, opt(head), torch.randn(8, 4), num_classes=0).rule.num_classes is None
    assert NeVe(head, opt(head), torch.randn(8, 4), num_classes=7).rule.num_classes == 7


def test_step_takes_a_loss_tensor_and_refuses_other_things():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    neve = NeVe(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.randn(8, 4))
    assert neve.step(torch.tensor(0.7, requires_grad=True)).train_loss == pytest.approx(0.7)
    assert neve.metrics()[keys.TRAIN_LOSS] == pytest.approx(0.7)
    with pytest.raises(TypeError, match=r"one-element tensor, but got a tensor of shape \(2,\)"):
        neve.step(torch.tensor([0.5, 0.6]))
    with pytest.raises(TypeError, match="train_loss must be a number or a one-element tensor, but got str"):
        neve.step("0.5")  # type: ignore[arg-type]
    result = neve.step(math.nan)
    assert result.diverged and "the training loss is nan" in result.message


def test_properties_before_and_after_a_stop():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    neve = NeVe(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.randn(8, 4), min_epochs=1)
    assert (neve.should_stop, neve.converged, neve.stop_reason) == (False, False, None)
    neve.step()  # nothing moved: stalled
    assert (neve.should_stop, neve.converged, neve.stop_reason) == (True, False, StopReason.STALLED)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"momentum": 1.0}, r"momentum must be in \[0, 1\), but got momentum=1.0."),
        ({"momentum": -0.1}, r"momentum must be in \[0, 1\), but got momentum=-0.1."),
        ({"momentum": math.nan}, r"momentum must be in \[0, 1\), but got momentum=nan."),
        ({"stop_threshold": 0.0}, r"stop_threshold must be a finite number > 0, but got stop_threshold=0.0."),
        ({"stop_threshold": -1e-3}, r"stop_threshold must be a finite number > 0, but got stop_threshold=-0.001."),
        ({"min_epochs": -1}, r"min_epochs must be an integer >= 0, but got min_epochs=-1."),
        ({"min_epochs": 2.5}, r"min_epochs must be an integer >= 0, but got min_epochs=2.5."),
        ({"num_classes": 1}, r"num_classes must be None, 0 \(unknown\) or an integer >= 2, but got num_classes=1."),
    ],
)
def test_bad_settings_are_refused_with_their_value(kwargs, message):
    model = nn.Sequential(nn.Linear(4, 2))
    with pytest.raises(ValueError, match=message):
        NeVe(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.randn(8, 4), **kwargs)


def test_state_keeps_the_stop_detector_as_json():
    """The rule state (detector histories included) is plain JSON and restores exactly."""
    import json

    neve, result, _ = _readme_loop(lr=0.5, batch=16, epochs=4)
    assert result.stop_reason is None  # frozen at epoch 4, but the warm-up lasts to epoch 5
    state = json.loads(json.dumps(neve.state_dict()["rule"]))
    assert state["detector"]["froze_at"] == 4 and state["min_epochs"] == 5
    rule = NeVeRule()
    rule.load_state_dict(state)
    assert rule.detector.state_dict() == neve.rule.detector.state_dict()


def test_a_model_error_that_is_not_about_the_aux_shape_keeps_its_type_and_message():
    class Buggy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR")

    model = Buggy()
    with pytest.raises(RuntimeError, match="CUDNN_STATUS_INTERNAL_ERROR") as info:
        NeVe(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.randn(4, 3))
    assert not isinstance(info.value, ValueError)
    assert "aux batch of shape (4, 3)" in " ".join(getattr(info.value, "__notes__", []))
    assert "does not fit" not in str(info.value)


def test_report_step_is_the_one_report_path_and_refuses_a_second_step_per_epoch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    neve = NeVe(model, opt, torch.randn(16, 4), min_epochs=1)
    reported = neve.report_step(2.0)  # steps NeVe with the loss, then returns its metrics
    assert neve.last_epoch == 1 and reported == neve.metrics() and reported[keys.TRAIN_LOSS] == 2.0
    neve.step(1.5)  # the loop stepped itself this epoch...
    with pytest.raises(
        ValueError, match=r"report_epoch\(\.\.\., train_loss=\.\.\.\) steps NeVe itself.*not to report_epoch"
    ):
        neve.report_step(1.5, who="report_epoch")  # ...so a loss here would step twice
    assert neve.last_epoch == 2
    assert neve.report_step() == neve.metrics()  # without a loss: report what the loop stepped
    assert neve.report_step(1.0)[keys.EPOCH] == 3.0  # reported, so the next epoch may step here again


def test_step_result_is_the_rules_result_plus_the_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    neve = NeVe(model, opt, torch.randn(16, 4), min_epochs=0, patience=0)
    twin = NeVeRule(min_epochs=0, patience=0, num_classes=2)
    for loss in (0.7, 0.6):
        with torch.no_grad():
            model[0].weight.mul_(1.1)
        got = neve.step(loss)
        rule_result = twin.step(got.model_velocity, got.velocity_change, [0.1], train_loss=loss)
        assert set(got.layer_velocity) == {"0", "2"} and rule_result.layer_velocity == {}
        assert (got.epoch, got.lrs, got.stop_reason, got.num_decays) == (
            rule_result.epoch,
            rule_result.lrs,
            rule_result.stop_reason,
            rule_result.num_decays,
        )
