"""Cost of one velocity measurement, as ratios measured in one run (SPEC §5).

* time: ``VelocityMonitor.measure()`` over a bare ``no_grad`` eval forward of the same aux set
  (CIFAR ResNet-20, 100 noise images 32x32, 2 threads). Target <= 1.25 (reference code: 4.46).
* memory: bytes kept between measurements over the bytes of one fp32 snapshot of the hooked outputs.
  Target <= 1.0 snapshot.
* bounded-memory mode (``max_positions``): its memory ratio and its error against exact velocities.

Run: ``python benchmarks/velocity_overhead.py [--threads 2] [--repeats 15]``
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from neve_tune import VelocityMonitor, noise_aux
from studies.cifar import resnet20


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
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--n", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = resnet20(num_classes=10).eval()
    aux = noise_aux((3, 32, 32), n=args.n)
    monitor = VelocityMonitor(model, aux)
    monitor.measure()  # baseline (allocates the snapshot)

    def bare() -> None:
        with torch.no_grad():
            model(aux)

    for _ in range(3):  # warm up allocator and kernels
        bare()
        monitor.measure()
    # Interleave the two so that machine noise hits both alike.
    t_bare, t_measure = [], []
    for _ in range(args.repeats):
        t_bare += timed(bare, 1)
        t_measure += timed(monitor.measure, 1)
    bare_s, measure_s = statistics.median(t_bare), statistics.median(t_measure)

    fp32_snapshot = sum(t.numel() * 4 for layer in monitor._layers for c in layer.snapshots for t in c)
    print(f"model: CIFAR ResNet-20, aux: {args.n} noise images 3x32x32, threads: {torch.get_num_threads()}")
    print(f"hooked modules: {len(monitor.layer_names)}, snapshot: {fp32_snapshot / 4 / 1e6:.1f}M floats")
    print(f"bare no_grad forward   : {bare_s * 1e3:8.1f} ms (median of {args.repeats})")
    print(f"VelocityMonitor.measure: {measure_s * 1e3:8.1f} ms (median of {args.repeats})")
    print(f"time ratio   measure/forward             = {measure_s / bare_s:.3f}   (target <= 1.25)")
    print(f"memory ratio activations kept / snapshot = {monitor.snapshot_bytes() / fp32_snapshot:.4f}")
    print(f"memory ratio all state kept / snapshot   = {monitor.state_bytes() / fp32_snapshot:.4f}   (target <= 1.0)")

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


if __name__ == "__main__":
    main()
