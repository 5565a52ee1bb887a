"""Items 2-4 of the GPU check: cost as ratios, host synchronisations per measurement, memory (and the
bounded-memory mode). ``gpu_check.py`` runs them; benchmarks/README.md says what each line means.
"""

from __future__ import annotations

import copy
import statistics
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from gpu_check_velocity import (
    Check,
    Result,
    amp,
    first_tensor,
    seconds,
    sync,
    velocity_cases,
    verdict,
)
from torch import Tensor, nn

from neve_tune import VelocityMonitor, noise_aux
from neve_tune.studies.builtin.cifar import resnet20, resnet32

RATIO_TARGET, EPOCH_TARGET = 1.3, 0.005
BOUNDED_ERROR = 0.05  # item 4: the bounded-memory mode's V may differ from the exact V by this much (relative)


@dataclass
class CostCase:
    """A model with its aux set and a monitor that has taken its baseline, and the memory that took."""

    name: str
    model: nn.Module
    aux: Tensor
    batch: int | None
    monitor: VelocityMonitor
    fp32_snapshot: int
    resident: int | None  # device bytes the baseline left allocated (None on cpu)


def fp32_snapshot_bytes(model: nn.Module, names: list[str], aux: Tensor, batch: int | None) -> int:
    """Bytes of one float32 copy of every hooked output, counted with plain hooks."""
    sizes: list[int] = []
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(lambda m, i, o: sizes.append(first_tensor(o).numel())) for n in names]
    try:
        with torch.no_grad():
            for b in aux.split(batch or len(aux)):
                model(b.to(next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    return 4 * sum(sizes)


def cost_cases(dev: torch.device, quick: bool) -> list[CostCase]:
    import torchvision

    big = (3, 64, 64) if quick else (3, 224, 224)
    small = 32 if quick else 100
    specs = [  # name, model, aux shape, aux size, aux batch (the ResNet-50's keeps the forward's memory small)
        ("ResNet-20", lambda: resnet20(10), (3, 32, 32), small, None),
        ("ResNet-32", lambda: resnet32(100), (3, 32, 32), small, None),
        (f"ResNet-50 {big[1]}x{big[2]}", torchvision.models.resnet50, big, 2 if quick else 100, 1 if quick else 25),
    ]
    cases = []
    for name, factory, shape, n, batch in specs:
        torch.manual_seed(0)
        model = factory().to(dev).eval()
        aux = noise_aux(shape, n=n)
        monitor = VelocityMonitor(model, aux, batch_size=batch)
        sync(dev)
        before = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
        monitor.measure()
        resident = torch.cuda.memory_allocated(dev) - before if dev.type == "cuda" else None
        fp32 = fp32_snapshot_bytes(model, monitor.layer_names, aux, batch)
        cases.append(CostCase(name, model, aux, batch, monitor, fp32, resident))
    return cases


def check_forward_ratio(cases: list[CostCase], dev: torch.device, quick: bool) -> Result:
    """Median over adjacent pairs (a bare forward, then a measurement) of measure/forward."""
    ratios = {}
    for case in cases:
        aux_dev = case.aux.to(dev)

        def bare(case: CostCase = case, aux_dev: Tensor = aux_dev) -> None:
            with torch.no_grad():
                for b in aux_dev.split(case.batch or len(aux_dev)):
                    case.model(b)

        pairs = []
        for i in range(4 if quick else 21):
            t_bare, t_measure = seconds(bare, dev), seconds(case.monitor.measure, dev)
            if i:  # the first pair warms up
                pairs.append((t_measure / t_bare, t_bare, t_measure))
        ratio = statistics.median(p[0] for p in pairs)
        ratios[case.name] = {
            "ratio": ratio,
            "forward_ms": 1e3 * statistics.median(p[1] for p in pairs),
            "measure_ms": 1e3 * statistics.median(p[2] for p in pairs),
        }
    worst = max(r["ratio"] for r in ratios.values())
    figure = ", ".join(
        f"{k} {r['ratio']:.3f} ({r['measure_ms']:.1f}/{r['forward_ms']:.1f} ms)" for k, r in ratios.items()
    )
    figure = f"measure/forward {figure} (target <= {RATIO_TARGET})"
    if dev.type != "cuda":
        return "SKIPPED", f"n/a (cpu): the target is a GPU one (the CPU's: velocity_overhead.py); {figure}", ratios
    return verdict(worst <= RATIO_TARGET), figure, ratios


def check_epoch_ratio(case: CostCase, dev: torch.device, quick: bool) -> Result:
    """One epoch over 50,000 generated 32x32 images, batch 128 (quick: 2 batches of 32, scaled to 50,000),
    bf16 autocast, channels_last, SGD; against one measurement of the ResNet-20 on its aux set."""
    from gpu_check_tune import generated_cifar, train_epoch

    cl = torch.channels_last
    model = copy.deepcopy(case.model).to(memory_format=cl)
    monitor = VelocityMonitor(model, case.aux.contiguous(memory_format=cl))
    n, batch = (64, 32) if quick else (50_000, 128)
    x, y = generated_cifar(n + batch, seed=0, device=dev)
    x = x.contiguous(memory_format=cl)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    train_epoch(model, opt, x[n:], y[n:], batch, autocast=True)  # warm-up
    with amp(dev, True):
        monitor.measure()  # baseline
    epoch_s = seconds(lambda: train_epoch(model, opt, x[:n], y[:n], batch, autocast=True), dev) * 50_000 / n
    with amp(dev, True):
        measure_s = statistics.median(seconds(monitor.measure, dev) for _ in range(2 if quick else 5))
    ratio = measure_s / epoch_s
    scaled = f" (timed {n} images, scaled to 50,000)" if quick else ""
    figure = (
        f"measure {measure_s * 1e3:.1f} ms / epoch {epoch_s:.2f} s{scaled} = {100 * ratio:.3f}%"
        f" (target <= {100 * EPOCH_TARGET:g}%)"
    )
    return verdict(ratio <= EPOCH_TARGET), figure, {"ratio": ratio, "measure_s": measure_s, "epoch_s": epoch_s}


def count_syncs(fn: Callable[[], object], dev: torch.device) -> int:
    """Synchronising CUDA calls made by ``fn``, as warned by torch.cuda.set_sync_debug_mode (none on cpu)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if dev.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            if dev.type == "cuda":
                torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught)


def check_syncs(cases: list[CostCase], dev: torch.device, quick: bool) -> Result:
    counts: dict[str, int] = {}
    velocity, repeats = velocity_cases(quick), 1 if quick else 3
    for name in ("resnet20_channels_last", "lstm_bidirectional", "gpt2"):
        factory, aux, batch, _, _ = velocity[name]
        monitor = VelocityMonitor(factory().to(dev), aux, batch_size=batch)
        monitor.measure()
        counts[name] = max(count_syncs(monitor.measure, dev) for _ in range(repeats))
    for case in cases:
        with amp(dev, True):
            counts[f"{case.name} (bf16 autocast)"] = max(count_syncs(case.monitor.measure, dev) for _ in range(repeats))
    figure = "syncs per measurement: " + ", ".join(f"{k} {v}" for k, v in counts.items())
    if dev.type != "cuda":
        return "SKIPPED", f"n/a (cpu): no CUDA device, nothing to synchronise; counted anyway, {figure}", counts
    return verdict(max(counts.values()) <= 1), f"{figure} (target <= 1)", counts


def check_snapshot_memory(cases: list[CostCase], dev: torch.device) -> Result:
    """Bytes the monitor keeps (its own count; on a GPU also what the baseline left allocated, beyond the aux
    set's copy, within 1%) against one fp32 snapshot; on a GPU also a measurement's transient peak."""
    rows, ok = {}, True
    for case in cases:
        kept, state = case.monitor.snapshot_bytes(), case.monitor.state_bytes()
        row: dict[str, Any] = {"fp32_snapshot": case.fp32_snapshot, "snapshot": kept, "state": state}
        ok = ok and kept <= case.fp32_snapshot
        if case.resident is not None:
            row["device_resident"] = case.resident - 4 * case.aux.numel()
            ok = ok and row["device_resident"] <= 1.01 * state + 2**20
            sync(dev)
            before = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            case.monitor.measure()
            row["measure_peak"] = torch.cuda.max_memory_allocated(dev) - before
        rows[case.name] = row

    words = {"snapshot": "snapshot", "state": "all state", "device_resident": "on device", "measure_peak": "peak"}

    def ratios(r: dict[str, Any]) -> str:
        return ", ".join(f"{w} {r[k] / r['fp32_snapshot']:.3f}" for k, w in words.items() if k in r)

    figure = "; ".join(f"{k}: {ratios(r)}" for k, r in rows.items())
    return verdict(ok), f"bytes / one fp32 snapshot: {figure} (target: snapshot <= 1)", rows


def check_bounded_memory(case: CostCase, dev: torch.device, quick: bool) -> Result:
    """max_positions=k on the ResNet-50 against its exact monitor, over 3 perturbations of the weights."""
    k = 64 if quick else 256
    approx = VelocityMonitor(case.model, case.aux, batch_size=case.batch, max_positions=k)
    approx.measure()
    case.monitor.measure()  # both compare against the same weights
    gen = torch.Generator(device=dev).manual_seed(1)
    errors, layer_errors = [], []
    saved = copy.deepcopy(case.model.state_dict())
    for _ in range(3):
        with torch.no_grad():
            for p in case.model.parameters():
                p.add_(0.02 * p.abs().mean() * torch.randn(p.shape, generator=gen, device=dev))
        e, a = case.monitor.measure(), approx.measure()
        assert e is not None and a is not None
        errors.append(abs(a.model_velocity - e.model_velocity) / e.model_velocity)
        layer_errors += [abs(a.layer_velocity[n] - x) / x for n, x in e.layer_velocity.items()]
    case.model.load_state_dict(saved)
    memory = approx.snapshot_bytes() / case.fp32_snapshot
    figure = (
        f"{case.name}, max_positions={k}: {memory:.4f} of one fp32 snapshot, V rel. error max {max(errors):.4f}"
        f" (bar <= {BOUNDED_ERROR}), per-layer median {statistics.median(layer_errors):.4f}"
    )
    ok = memory < 1.0 and max(errors) <= BOUNDED_ERROR
    return verdict(ok), figure, {"max_positions": k, "memory": memory, "v_rel_error": max(errors)}


def checks(dev: torch.device, quick: bool) -> list[Check]:
    """Items 2-4; their models are built by the first of them that runs."""
    cases: list[CostCase] = []

    def on_cases(check: Callable[[list[CostCase]], Result]) -> Callable[[], Result]:
        def run() -> Result:
            if not cases:
                cases.extend(cost_cases(dev, quick))
            return check(cases)

        return run

    return [
        ("2a", "measure() / bare no_grad forward", on_cases(lambda c: check_forward_ratio(c, dev, quick))),
        ("2b", "measure() / one CIFAR-10-sized epoch", on_cases(lambda c: check_epoch_ratio(c[0], dev, quick))),
        ("3", "host synchronisations per measurement", on_cases(lambda c: check_syncs(c, dev, quick))),
        ("4a", "memory kept against one fp32 snapshot", on_cases(lambda c: check_snapshot_memory(c, dev))),
        ("4b", "bounded-memory mode and its error", on_cases(lambda c: check_bounded_memory(c[-1], dev, quick))),
    ]
