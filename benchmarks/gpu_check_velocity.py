"""Item 1 of the GPU check, and the helpers of items 1-4: velocities measured on the device against the test
suite's float64 reference. ``gpu_check.py`` runs it; benchmarks/README.md says what each line means.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from neve_tune import VelocityMonitor, noise_aux
from neve_tune.studies.builtin.cifar import resnet20

#: A check's outcome: status (PASSED, FAILED or SKIPPED), its figure, and details for the JSON.
Result = tuple[str, str, dict[str, Any]]
#: One line of the check: its id ("2a": item 2), its name, and what runs it.
Check = tuple[str, str, Callable[[], Result]]

ROOT = Path(__file__).resolve().parents[1]
REL = 1e-4  # item 1: relative agreement; denominators are floored at FLOOR (the tests' atol 1e-7 at rel 1e-4)
FLOOR = 1e-3


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
    """Train on the device and compare 2 measurements with the test suite's float64 reference, computed on the
    CPU from the device model's own responses ("rel") and from a CPU copy's forward ("rel_cpu_forward": on a
    GPU it also holds the two devices' float32 rounding; on the CPU it is "rel", not computed twice). Each is
    the worst |device - reference| / max(|reference|, FLOOR) over V, D and every neuron's v."""
    factory, aux, batch, capture, lr = case
    velocity_reference = tests_module("tests.velocity_reference")
    torch.manual_seed(0)
    model = factory().to(dev)
    monitor = VelocityMonitor(model, aux, batch_size=batch)
    with amp(dev, autocast):
        monitor.measure()
    names, batches = monitor.layer_names, list(aux.split(batch or len(aux)))  # the modules the aux set ran
    models = {"rel": (model, [b.to(dev) for b in batches])}
    if dev.type != "cpu":  # on the CPU the copy's forward is the model's own: "rel_cpu_forward" = "rel"
        models["rel_cpu_forward"] = (copy.deepcopy(model).cpu(), batches)
    refs = {key: velocity_reference.ReferenceVelocity(momentum=0.5) for key in models}
    worst, smallest_v, inputs = dict.fromkeys(models, 0.0), float("inf"), batches[0].to(dev)
    for epoch in range(3):  # the baseline, then V, then V and D
        if epoch:
            train_steps(model, inputs, dev, autocast, lr)
            with amp(dev, autocast):
                m = monitor.measure()
            assert m is not None
            got = torch.cat(
                [
                    torch.tensor([m.model_velocity, m.velocity_change or 0.0], dtype=torch.float64),
                    *(m.layers[n] for n in names),
                ]
            )
        for key, (ref_model, ref_batches) in models.items():
            if ref_model is not model:
                ref_model.load_state_dict(model.state_dict())
            out = refs[key].update({n: r.cpu() for n, r in capture(ref_model, names, ref_batches).items()})
            if epoch:
                V, D, v = out
                want = torch.cat([torch.tensor([V, D or 0.0], dtype=torch.float64), *(v[n] for n in names)])
                worst[key] = max(worst[key], float(((got - want).abs() / want.abs().clamp_min(FLOOR)).max()))
                smallest_v = min(smallest_v, V)
    state = monitor.state_dict(snapshot="full")
    kept = [t for layer in state["layers"] for row in layer["snapshots"] for t in row if t is not None]
    return {
        "rel_cpu_forward": worst["rel"],
        **worst,
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
    also = f" (from a CPU copy's forward: {max(r['rel_cpu_forward'] for r in results.values()):.2e}, not judged)"
    figure = (
        f"max rel. difference {worst:.2e}{also} (target <= {REL:g}) over {len(results)} model x precision cases;"
        f" smallest V {moved:.2e}; state and snapshot on {dev.type}: {on_device}; channels_last kept: {layout}"
    )
    return verdict(ok), figure, {"cases": results}


def checks(dev: torch.device, quick: bool) -> list[Check]:
    """Item 1."""
    return [("1", "velocities on the device = float64 CPU reference", lambda: check_velocities(dev, quick))]
