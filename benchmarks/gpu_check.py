"""One short GPU check of the measurement path (run it where a CUDA device exists).

Checks that velocities measured on the GPU equal a CPU measurement of the same weights (to 1e-4
relative), that a measurement synchronises once and keeps everything on the device, and times
``measure()`` against a bare ``no_grad`` forward (ratios, plus absolute times since this is a GPU).

Run: ``python benchmarks/gpu_check.py``. Exits 0 with a note when no CUDA device is present.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from neve_tune import VelocityMonitor, noise_aux
from studies.cifar import resnet20


def cuda_time(fn, repeats: int = 20) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device here: nothing to check (the CPU path is covered by the test suite)")
        return 0
    dev = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name(dev)}, torch {torch.__version__}")
    torch.manual_seed(0)
    cpu_model = resnet20().eval()
    gpu_model = resnet20().to(dev).eval()
    gpu_model.load_state_dict(cpu_model.state_dict())
    aux = noise_aux((3, 32, 32), n=100)
    cpu_mon, gpu_mon = VelocityMonitor(cpu_model, aux), VelocityMonitor(gpu_model, aux)
    cpu_mon.measure(), gpu_mon.measure()
    assert gpu_mon._v.device.type == "cuda", "per-neuron state must live on the GPU"
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        deltas = [0.02 * p.abs().mean() * torch.randn(p.shape, generator=gen) for p in cpu_model.parameters()]
        for p, d in zip(cpu_model.parameters(), deltas, strict=True):
            p.add_(d)
        for p, d in zip(gpu_model.parameters(), deltas, strict=True):
            p.add_(d.to(dev))
    c, g = cpu_mon.measure(), gpu_mon.measure()
    rel = abs(c.model_velocity - g.model_velocity) / c.model_velocity
    print(f"V cpu {c.model_velocity:.6g}  V gpu {g.model_velocity:.6g}  relative difference {rel:.2e}")
    ok = rel < 1e-4

    for batch_size in (None, 25):
        mon = VelocityMonitor(gpu_model, aux, batch_size=batch_size)
        mon.measure()
        aux_dev = aux.to(dev)
        chunk = batch_size or len(aux)

        def bare(aux_dev=aux_dev, size=chunk) -> None:
            with torch.no_grad():
                for b in aux_dev.split(size):
                    gpu_model(b)

        bare_s = cuda_time(bare)
        measure_s = cuda_time(mon.measure)
        print(
            f"batch_size={batch_size}: forward {bare_s * 1e3:.2f} ms, measure {measure_s * 1e3:.2f} ms,"
            f" ratio {measure_s / bare_s:.3f}"
        )
    with torch.autocast("cuda", dtype=torch.bfloat16):
        amp = VelocityMonitor(gpu_model, aux)
        amp.measure()
        m = amp.measure()
    print(f"bf16 autocast: V of an unchanged model {m.model_velocity:.2e} (expect 0)")
    ok = ok and m.model_velocity < 1e-6
    print("GPU CHECK", "PASSED" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
