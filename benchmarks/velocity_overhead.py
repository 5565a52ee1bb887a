"""Cost of one velocity measurement, as ratios measured in one run (SPEC §5).

* time: ``VelocityMonitor.measure()`` over a bare ``no_grad`` eval forward of the same aux set
  (CIFAR ResNet-20, 100 noise images 32x32, 2 threads). Target <= 1.25 (reference code: 4.46). Printed for
  the compiled-kernel fast path (the default where a C compiler exists) and for the PyTorch-ops fallback.
* memory: bytes kept between measurements over the bytes of one fp32 snapshot of every hooked output.
  Target <= 1.0 snapshot.
* bounded-memory mode (``max_positions``): its memory ratio and its error against exact velocities.
* compact states (``state_dict(snapshot="half" | "none")``): their bytes, and the error of the first
  measurement after resuming from a float16 snapshot, at several sizes of the epoch's weight change.
* a transformer case: a 6-layer, 256-wide ``nn.TransformerEncoder`` (batch_first, Embedding front) over 100
  random token sequences of length 128. Target <= 1.3. The bare forward takes PyTorch's fused
  encoder-layer fast path; hooks make each layer take its plain path, so the ratio is also given against a
  forward with no-op hooks on the same modules. ``--transformer-repeats 0`` skips it.

glibc's malloc hands big freed blocks back to the kernel and faults them in again, which makes even the
bare forward pay thousands of page faults per call in a fresh process; by how much depends on what the
process allocated before. So that neither side of the ratio is timed in that state, the script re-runs
itself with ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` raised (``--system-malloc`` keeps the
defaults), and prints the page faults per call of each side.

Run: ``python benchmarks/velocity_overhead.py [--threads 2] [--repeats 21] [--transformer-repeats 7]``
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable

import torch

from neve_tune import VelocityMonitor, noise_aux, token_aux
from neve_tune._measure import kernel as _kernel
from neve_tune.studies.builtin.cifar import resnet20
from neve_tune.testing import compute_path

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 31), "MALLOC_TRIM_THRESHOLD_": str(1 << 31)}


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def perturb(model: torch.nn.Module, scale: float, gen: torch.Generator) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=gen))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--system-malloc", action="store_true", help="keep glibc's default malloc thresholds")
    parser.add_argument("--channels-last", action="store_true", help="model and aux in channels_last memory format")
    parser.add_argument(
        "--transformer-repeats", type=int, default=7, help="runs timed in the transformer case (0: skip)"
    )
    args = parser.parse_args()
    if sys.platform.startswith("linux") and not args.system_malloc and any(k not in os.environ for k in MALLOC_ENV):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV})
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = resnet20(num_classes=10).eval()
    aux = noise_aux((3, 32, 32), n=args.n)
    if args.channels_last:
        model, aux = model.to(memory_format=torch.channels_last), aux.contiguous(memory_format=torch.channels_last)
    kernel = _kernel.get()
    monitor = VelocityMonitor(model, aux)
    monitor.measure()  # baseline (allocates the snapshot)
    with compute_path("torch_ops"):  # as a machine without a C compiler would
        fallback = VelocityMonitor(model, aux)
        fallback.measure()

    def bare() -> None:
        with torch.no_grad():
            model(aux)

    def measure_fallback() -> None:
        with compute_path("torch_ops"):
            fallback.measure()

    runs: dict[str, Callable[[], object]] = {"bare": bare, "kernel": monitor.measure, "torch_ops": measure_fallback}
    for _ in range(3):  # warm up allocator and kernels
        for fn in runs.values():
            fn()
    # Each measurement is timed right after a bare forward, and its ratio is taken against that forward:
    # machine noise and cache state then hit both sides of each ratio alike.
    times: dict[str, list[float]] = {k: [] for k in runs}
    ratios: dict[str, list[float]] = {"kernel": [], "torch_ops": []}
    fault_counts: dict[str, int] = dict.fromkeys(runs, 0)
    for _ in range(args.repeats):
        for name in ratios:
            for key in ("bare", name):
                f0 = faults()
                times[key] += timed(runs[key], 1)
                fault_counts[key] += faults() - f0
            ratios[name].append(times[name][-1] / times["bare"][-1])
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = {k: statistics.median(v) for k, v in ratios.items()}

    # One fp32 snapshot of every hooked output, counted independently of what the monitor keeps.
    sizes: list[int] = []
    handles = [
        dict(model.named_modules())[name].register_forward_hook(lambda m, i, o: sizes.append(o.numel()))
        for name in monitor.layer_names
    ]
    bare()
    for h in handles:
        h.remove()
    fp32_snapshot = 4 * sum(sizes)

    layout = ", channels_last" if args.channels_last else ""
    print(f"model: CIFAR ResNet-20{layout}, aux: {args.n} noise images 3x32x32, threads: {torch.get_num_threads()}")
    print(f"hooked modules: {len(monitor.layer_names)}, one fp32 snapshot: {fp32_snapshot / 4 / 1e6:.1f}M floats")
    print(f"kernel: {kernel.path if kernel else 'not available (PyTorch ops only)'}")
    print(f"malloc: {'glibc defaults' if args.system_malloc else 'MALLOC_MMAP/TRIM_THRESHOLD_ raised'}")
    for name in runs:
        print(
            f"{name:9s}: {med[name] * 1e3:7.1f} ms median of {len(times[name])},"
            f" {fault_counts[name] / len(times[name]):8.0f} page faults per call"
        )
    for name, label in (("kernel", "kernel   "), ("torch_ops", "torch ops")):
        q = statistics.quantiles(ratios[name], n=4)
        print(
            f"time ratio   measure/forward, {label} = {ratio[name]:.3f}   (median of {args.repeats} adjacent pairs,"
            f" IQR {q[0]:.3f}-{q[2]:.3f}){'   (target <= 1.25)' if name == 'kernel' else ''}"
        )
    print(f"memory ratio activations kept / snapshot = {monitor.snapshot_bytes() / fp32_snapshot:.4f}")
    print(f"memory ratio all state kept / snapshot   = {monitor.state_bytes() / fp32_snapshot:.4f}   (target <= 1.0)")
    print(f"memory ratio all state kept, torch ops   = {fallback.state_bytes() / fp32_snapshot:.4f}")

    # Bounded-memory mode: memory and error against exact velocities over a few perturbed epochs.
    gen = torch.Generator().manual_seed(1)
    for k in (64, 16):
        exact = VelocityMonitor(model, aux)
        approx = VelocityMonitor(model, aux, max_positions=k)
        exact.measure(), approx.measure()
        errors, rel_layer = [], []
        state = {n: t.clone() for n, t in model.state_dict().items()}
        for _ in range(4):
            perturb(model, 0.02, gen)
            e, a = exact.measure(), approx.measure()
            errors.append(abs(a.model_velocity - e.model_velocity) / e.model_velocity)
            rel_layer += [
                abs(a.layer_velocity[n] - e.layer_velocity[n]) / e.layer_velocity[n] for n in e.layer_velocity
            ]
        model.load_state_dict(state)
        print(
            f"bounded memory max_positions={k:3d}: memory {approx.snapshot_bytes() / fp32_snapshot:.4f} snapshot,"
            f" V rel. error max {max(errors):.4f}, per-layer mean|v| rel. error median"
            f" {statistics.median(rel_layer):.4f} max {max(rel_layer):.4f}"
        )

    compact_states(model, aux, gen)
    transformer_case(args.n, args.transformer_repeats)


def compact_states(model: torch.nn.Module, aux: torch.Tensor, gen: torch.Generator) -> None:
    """Bytes of each state encoding, and the error of resuming from the float16 one: V and D of the first
    measurement after the restore, against the monitor that kept its exact snapshot."""
    exact = VelocityMonitor(model, aux)
    exact.measure()
    perturb(model, 0.02, gen)
    exact.measure()
    sizes = {}
    for encoding in ("full", "half", "none"):
        buffer = io.BytesIO()
        torch.save(exact.state_dict(snapshot=encoding), buffer)
        sizes[encoding] = buffer.tell()
    print("state bytes (torch.save): " + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in sizes.items()))
    full, half = exact.state_dict(), exact.state_dict(snapshot="half")
    saved = {n: t.clone() for n, t in model.state_dict().items()}
    for scale in (0.02, 0.002, 0.0002):
        errors_v, errors_d, abs_v = [], [], []
        for _ in range(4):
            restored = VelocityMonitor(model, aux)
            restored.load_state_dict(half)
            reference = VelocityMonitor(model, aux)
            reference.load_state_dict(full)
            perturb(model, scale, gen)
            e, h = reference.measure(), restored.measure()
            assert e is not None and h is not None and e.velocity_change is not None
            assert h.velocity_change is not None
            abs_v.append(abs(h.model_velocity - e.model_velocity))
            errors_v.append(abs_v[-1] / e.model_velocity)
            errors_d.append(abs(h.velocity_change - e.velocity_change) / e.velocity_change)
            model.load_state_dict(saved)
        print(
            f"half state, weight change {scale:g}: V {e.model_velocity:.3g}, V rel. error max {max(errors_v):.2e},"
            f" abs. {max(abs_v):.1e}, D rel. error max {max(errors_d):.2e}"
        )


class TokenEncoder(torch.nn.Module):
    """Embedding -> 6-layer, 256-wide nn.TransformerEncoder (batch_first) -> mean over positions -> Linear."""

    def __init__(self, vocab: int = 1000, width: int = 256, layers: int = 6, classes: int = 10) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        layer = torch.nn.TransformerEncoderLayer(width, 8, 4 * width, dropout=0.1, batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = torch.nn.Linear(width, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(ids)).mean(1))


def transformer_case(n: int, repeats: int) -> None:
    """measure/forward and state/snapshot for TokenEncoder on ``n`` random token sequences of length 128
    (``repeats`` adjacent runs of each; none at all for 0)."""
    if repeats <= 0:
        return
    torch.manual_seed(0)
    model = TokenEncoder().eval()
    aux = token_aux(1000, 128, n=n)
    assert isinstance(aux, torch.Tensor)
    monitor = VelocityMonitor(model, aux)
    monitor.measure()

    def bare() -> None:
        with torch.no_grad():
            model(aux)

    modules = dict(model.named_modules())

    def bare_hooked() -> None:
        """The forward a measurement runs: no-op hooks on the same modules send each encoder layer down its
        plain path (attention keeps its native kernel)."""
        handles = [modules[name].register_forward_hook(lambda m, i, o: None) for name in monitor.layer_names]
        try:
            bare()
        finally:
            for h in handles:
                h.remove()

    runs: dict[str, Callable[[], object]] = {"bare": bare, "bare_hooked": bare_hooked, "measure": monitor.measure}
    for fn in runs.values():  # warm up
        fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    cpu: dict[str, list[float]] = {k: [] for k in runs}  # process CPU time: less sensitive to a shared machine
    ratios: dict[str, list[float]] = {"bare": [], "bare_hooked": []}
    for _ in range(repeats):
        for key in runs:
            c0 = time.process_time()
            times[key] += timed(runs[key], 1)
            cpu[key].append(time.process_time() - c0)
        for key in ratios:
            ratios[key].append(times["measure"][-1] / times[key][-1])
    sizes: list[int] = []
    handles = [
        modules[name].register_forward_hook(lambda m, i, o: sizes.append((o[0] if isinstance(o, tuple) else o).numel()))
        for name in monitor.layer_names
    ]
    bare()
    for h in handles:
        h.remove()
    fp32_snapshot = 4 * sum(sizes)
    state = {}
    for encoding in ("full", "half", "none"):
        buffer = io.BytesIO()
        torch.save(monitor.state_dict(snapshot=encoding), buffer)
        state[encoding] = buffer.tell()
    print(
        f"transformer: 6-layer 256-wide nn.TransformerEncoder (batch_first), aux: {n} random token sequences of"
        f" length 128, threads: {torch.get_num_threads()}, hooked modules: {len(monitor.layer_names)},"
        f" coverage {monitor.coverage:.3f}, one fp32 snapshot: {fp32_snapshot / 4 / 1e6:.1f}M floats"
    )
    for name in runs:
        print(f"transformer {name:10s}: {statistics.median(times[name]) * 1e3:8.1f} ms median of {repeats}")
    for key, label in (("bare", "forward"), ("bare_hooked", "hooked forward")):
        q = statistics.quantiles(ratios[key], n=4) if repeats > 1 else [ratios[key][0]] * 3
        print(
            f"transformer time ratio measure/{label} = {statistics.median(ratios[key]):.3f}   (median of {repeats}"
            f" adjacent runs, IQR {q[0]:.3f}-{q[2]:.3f}){'   (target <= 1.3)' if key == 'bare' else ''}"
        )
    cpu_med = {k: statistics.median(v) for k, v in cpu.items()}
    print(
        f"transformer CPU-time ratio measure/forward = {cpu_med['measure'] / cpu_med['bare']:.3f},"
        f" measure/hooked forward = {cpu_med['measure'] / cpu_med['bare_hooked']:.3f}   (medians of {repeats})"
    )
    print(f"transformer memory ratio all state kept / snapshot = {monitor.state_bytes() / fp32_snapshot:.4f}")
    print("transformer state bytes (torch.save): " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in state.items()))


if __name__ == "__main__":
    main()
