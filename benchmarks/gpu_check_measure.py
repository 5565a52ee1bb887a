"""Items 1-4 of the GPU check, run by ``gpu_check.py`` (benchmarks/README.md says what each line means):
velocities against the test suite's float64 reference, cost ratios, host synchronisations, memory.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from neve_tune import VelocityMonitor, noise_aux
from neve_tune.studies.builtin.cifar import resnet20, resnet32

#: A check's outcome: status (PASSED, FAILED or SKIPPED), its figure, and details for the JSON.
Result = tuple[str, str, dict[str, Any]]
#: One line of the check: its id ("2a": item 2), its name, and what runs it.
Check = tuple[str, str, Callable[[], Result]]

ROOT = Path(__file__).resolve().parents[1]
REL = 1e-4  # item 1: relative agreement; denominators are floored at FLOOR (the tests' atol 1e-7 at rel 1e-4)
FLOOR = 1e-3
RATIO_TARGET, EPOCH_TARGET = 1.3, 0.005
BOUNDED_ERROR = 0.05  # item 4: the bounded-memory mode's V may differ from the exact V by this much (relative)


def verdict(ok: bool) -> str:
    return "PASSED" if ok else "FAILED"


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def seconds(fn: Callable[[], object], dev: torch.device) -> float:
    """Wall time of ``fn`` on a GPU (synchronised); on the CPU, this process's CPU time, which other
    processes on a shared machine inflate less."""
    clock = time.perf_counter if dev.type == "cuda" else time.process_time
    sync(dev)
    t0 = clock()
    fn()
    sync(dev)
    return clock() - t0


def amp(dev: torch.device, on: bool) -> contextlib.AbstractContextManager[Any]:
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=on)


@contextlib.contextmanager
def no_tf32() -> Iterator[None]:
    """Item 1 compares with float64: TF32 convolutions and matmuls (10-bit mantissa) would dominate it."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def tests_module(name: str) -> Any:
    """A module of the test suite (its models and float64 reference), imported from the repository root."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module(name)


def first_tensor(out: Any) -> Tensor:
    """The first tensor of a model output (a tensor, a tuple, or a Hugging Face ModelOutput)."""
    return out if isinstance(out, Tensor) else out[0]


def train_steps(model: nn.Module, inputs: Any, dev: torch.device, autocast: bool, lr: float) -> None:
    """Three SGD steps (cross-entropy of the output's last dim against fixed random targets), as in the
    tests: moves weights and BatchNorm statistics."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(2)
    model.train()
    for _ in range(3):
        with amp(dev, autocast):
            out = first_tensor(model(inputs)).float()
        target = torch.randint(0, out.shape[-1], out.shape[:-1], generator=gen).to(dev)
        loss = nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()


# ---------------------------------------------------------------------------------------------- item 1
class Case(NamedTuple):
    """A model of item 1 with its aux set and the test suite's float64 response capture."""

    factory: Callable[[], nn.Module]
    aux: Tensor
    batch: int | None
    capture: Callable[..., dict[str, Tensor]]
    lr: float  # of the training steps between measurements: moves each model without blowing it up


def velocity_cases(quick: bool) -> dict[str, Case]:
    tv, tl = tests_module("tests.test_velocity"), tests_module("tests.test_layers")
    capture = tests_module("tests.velocity_reference").capture_responses
    slow = {"sequence_NTC", "lstm_bidirectional", "transformer_encoder"}  # barely move at lr 0.05
    cases: dict[str, Case] = {}
    for name, (factory, shape, n_aux, batch, _) in tv.CASES.items():
        cases[name] = Case(factory, noise_aux(shape, n=n_aux, seed=1), batch, capture, 0.5 if name in slow else 0.05)
    gen = torch.Generator().manual_seed(1)
    for name, (factory, make_aux, _) in tl.CASES.items():
        cases[name] = Case(factory, make_aux(gen), 3, tl.reference_responses, 0.5 if name in slow else 0.05)
    cl = torch.channels_last
    aux = noise_aux((3, 32, 32), n=8 if quick else 100, seed=1).contiguous(memory_format=cl)
    cases["resnet20_channels_last"] = Case(lambda: resnet20().to(memory_format=cl), aux, None, capture, 0.05)
    return cases


def compare_case(case: Case, dev: torch.device, autocast: bool) -> dict[str, Any]:
    """Train on the device, copy the weights to a CPU model, and compare 2 measurements with the test
    suite's reference (float64 velocities of the CPU model's responses): the worst
    |device - reference| / max(|reference|, FLOOR) over V, D and every neuron's v."""
    factory, aux, batch, capture, lr = case
    reference = tests_module("tests.velocity_reference").ReferenceVelocity(momentum=0.5)
    torch.manual_seed(0)
    model = factory().to(dev)
    ref_model = copy.deepcopy(model).cpu()
    batches = list(aux.split(batch or len(aux)))
    monitor = VelocityMonitor(model, aux, batch_size=batch)
    with amp(dev, autocast):
        monitor.measure()
    names = monitor.layer_names
    reference.update(capture(ref_model, names, batches))
    worst, smallest_v, inputs = 0.0, float("inf"), aux[: batch or len(aux)].to(dev)
    for _ in range(2):  # V, then V and D
        train_steps(model, inputs, dev, autocast, lr)
        ref_model.load_state_dict(model.state_dict())
        with amp(dev, autocast):
            m = monitor.measure()
        assert m is not None
        V, D, v = reference.update(capture(ref_model, names, batches))
        got = torch.tensor([m.model_velocity, m.velocity_change if D is not None else 0.0], dtype=torch.float64)
        want = torch.tensor([V, D if D is not None else 0.0], dtype=torch.float64)
        got, want = torch.cat([got, *(m.layers[n] for n in names)]), torch.cat([want, *(v[n] for n in names)])
        worst = max(worst, float(((got - want).abs() / want.abs().clamp_min(FLOOR)).max()))
        smallest_v = min(smallest_v, V)
    state = monitor.state_dict(snapshot="full")
    kept = [t for layer in state["layers"] for row in layer["snapshots"] for t in row if t is not None]
    return {
        "rel": worst,
        "V": smallest_v,
        "on_device": state["v"].device.type == dev.type and all(t.device.type == dev.type for t in kept),
        "channels_last": kept[0].is_contiguous(memory_format=torch.channels_last),
    }


def check_velocities(dev: torch.device, quick: bool) -> Result:
    results = {}
    with no_tf32():
        for name, case in velocity_cases(quick).items():
            for mode, autocast in (("fp32", False), ("bf16_autocast", True)):
                results[f"{name}/{mode}"] = compare_case(case, dev, autocast)
    worst = max(r["rel"] for r in results.values())
    moved = min(r["V"] for r in results.values())
    on_device = all(r["on_device"] for r in results.values())
    layout = all(r["channels_last"] for k, r in results.items() if k.startswith("resnet20_channels_last"))
    ok = worst <= REL and moved > 1e-4 and on_device and layout
    figure = (
        f"max rel. difference {worst:.2e} (target <= {REL:g}) over {len(results)} model x precision cases;"
        f" smallest V {moved:.2e}; state and snapshot on {dev.type}: {on_device}; channels_last kept: {layout}"
    )
    return verdict(ok), figure, {"cases": results}


# ---------------------------------------------------------------------------------------------- items 2-4
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
    """Items 1-4; the models of items 2-4 are built by the first of them that runs."""
    cases: list[CostCase] = []

    def on_cases(check: Callable[[list[CostCase]], Result]) -> Callable[[], Result]:
        def run() -> Result:
            if not cases:
                cases.extend(cost_cases(dev, quick))
            return check(cases)

        return run

    return [
        ("1", "velocities on the device = float64 CPU reference", lambda: check_velocities(dev, quick)),
        ("2a", "measure() / bare no_grad forward", on_cases(lambda c: check_forward_ratio(c, dev, quick))),
        ("2b", "measure() / one CIFAR-10-sized epoch", on_cases(lambda c: check_epoch_ratio(c[0], dev, quick))),
        ("3", "host synchronisations per measurement", on_cases(lambda c: check_syncs(c, dev, quick))),
        ("4a", "memory kept against one fp32 snapshot", on_cases(lambda c: check_snapshot_memory(c, dev))),
        ("4b", "bounded-memory mode and its error", on_cases(lambda c: check_bounded_memory(c[-1], dev, quick))),
    ]
