"""One short GPU check of the measurement path (run it where a CUDA device exists).

Checks that velocities measured on the GPU equal a CPU measurement of the same weights (to 1e-4
relative), that a measurement synchronises once and keeps everything on the device, and times
``measure()`` against a bare ``no_grad`` forward (ratios, plus absolute times since this is a GPU).

Also checks a ``channels_last`` copy of the model: its snapshot keeps that layout and its velocities equal
the CPU ones.

Run: ``python benchmarks/gpu_check.py``. Exits 0 with a note when no CUDA device is present.
``--device cpu`` runs the same checks on the CPU (to try the script itself on a machine without a GPU).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from neve_tune import VelocityMonitor, noise_aux
from neve_tune.studies.builtin.cifar import resnet20


def device_time(fn, dev: torch.device, repeats: int = 20) -> float:
    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu to try the script itself")
    dev = torch.device(parser.parse_args().device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: nothing to check (the CPU path is covered by the test suite)")
        return 0
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"device: {name}, torch {torch.__version__}")
    torch.manual_seed(0)
    cpu_model = resnet20().eval()
    gpu_model = resnet20().to(dev).eval()
    gpu_model.load_state_dict(cpu_model.state_dict())
    cl_model = resnet20().to(dev).eval()
    cl_model.load_state_dict(cpu_model.state_dict())
    cl_model.to(memory_format=torch.channels_last)
    aux = noise_aux((3, 32, 32), n=100)
    cl_aux = aux.contiguous(memory_format=torch.channels_last)
    cpu_mon, gpu_mon, cl_mon = (
        VelocityMonitor(cpu_model, aux),
        VelocityMonitor(gpu_model, aux),
        VelocityMonitor(cl_model, cl_aux),
    )
    cpu_mon.measure(), gpu_mon.measure(), cl_mon.measure()
    assert gpu_mon._sums is not None and gpu_mon._sums.v.device.type == dev.type, "per-neuron state on the device"
    ok = cl_mon._layers[0].snapshots[0][0].is_contiguous(memory_format=torch.channels_last)
    print(f"channels_last model: its snapshot keeps the layout = {ok}")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        deltas = [0.02 * p.abs().mean() * torch.randn(p.shape, generator=gen) for p in cpu_model.parameters()]
        for p, d in zip(cpu_model.parameters(), deltas, strict=True):
            p.add_(d)
        for model in (gpu_model, cl_model):
            for p, d in zip(model.parameters(), deltas, strict=True):
                p.add_(d.to(dev))
    c, g, cl = cpu_mon.measure(), gpu_mon.measure(), cl_mon.measure()
    for label, m in (("gpu", g), ("gpu channels_last", cl)):
        rel = abs(c.model_velocity - m.model_velocity) / c.model_velocity
        print(f"V cpu {c.model_velocity:.6g}  V {label} {m.model_velocity:.6g}  relative difference {rel:.2e}")
        ok = ok and rel < 1e-4

    for label, model, inputs, batch_size in (
        ("", gpu_model, aux, None),
        ("", gpu_model, aux, 25),
        (" channels_last", cl_model, cl_aux, None),
    ):
        mon = VelocityMonitor(model, inputs, batch_size=batch_size)
        mon.measure()
        aux_dev = inputs.to(dev)
        chunk = batch_size or len(inputs)

        def bare(model=model, aux_dev=aux_dev, size=chunk) -> None:
            with torch.no_grad():
                for b in aux_dev.split(size):
                    model(b)

        bare_s = device_time(bare, dev)
        measure_s = device_time(mon.measure, dev)
        print(
            f"batch_size={batch_size}{label}: forward {bare_s * 1e3:.2f} ms, measure {measure_s * 1e3:.2f} ms,"
            f" ratio {measure_s / bare_s:.3f}"
        )
    with torch.autocast(dev.type, dtype=torch.bfloat16):
        amp = VelocityMonitor(gpu_model, aux)
        amp.measure()
        m = amp.measure()
    print(f"bf16 autocast: V of an unchanged model {m.model_velocity:.2e} (expect 0)")
    ok = ok and m.model_velocity < 1e-6
    print("GPU CHECK", "PASSED" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
