"""The GPU check: every item of the GPU path in one process, one PASSED/FAILED/SKIPPED line per check.

Item 1 (velocities against the float64 reference) is in ``gpu_check_velocity.py``, items 2-4 (cost ratios,
host synchronisations, memory) in ``gpu_check_cost.py``, items 5-6 (Ray Tune with NeVeScheduler, the CLI
study) in ``gpu_check_tune.py``; ``benchmarks/README.md`` says what each line means.

``--device cpu --quick`` runs every line with small shapes (the test suite does); ``--out`` writes the lines
as JSON. Exits 1 when a check FAILED, 2 when ``--device cuda`` finds no CUDA device. Every dataset is generated
from tensors: nothing is downloaded.

Run: ``python benchmarks/gpu_check.py --device cuda --out gpu_check.json``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import gpu_check_cost
import gpu_check_tune
import gpu_check_velocity
import torch
from gpu_check_velocity import Check


def run(check: Check) -> dict[str, Any]:
    """One line, printed; an exception is its FAILED line, so that the next checks still run."""
    line, name, fn = check
    started = time.perf_counter()
    try:
        status, figure, details = fn()
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # one broken check must not hide the others (pytest.importorskip's is a BaseException)
        traceback.print_exc()
        status, figure, details = "FAILED", f"raised {type(err).__name__}: {err}", {}
    print(f"[{line}] {status:7s} {name}: {figure}", flush=True)
    took = round(time.perf_counter() - started, 1)
    return {
        "item": int(line[0]),
        "check": line,
        "name": name,
        "status": status,
        "figure": figure,
        "seconds": took,
        "details": details,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu to run every line on the CPU")
    parser.add_argument("--quick", action="store_true", help="small shapes: every code path, in seconds")
    parser.add_argument("--out", type=Path, help="also write the lines as JSON to this file")
    parser.add_argument("--items", default="1,2,3,4,5,6", help="which items to run (default: all)")
    args = parser.parse_args(argv)
    items = {int(i) for i in args.items.split(",")}
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print(f"--device {args.device}: torch sees no CUDA device here; pass --device cpu to run on the CPU.")
        return 2
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"device: {name}, torch {torch.__version__}, {'quick' if args.quick else 'full'} mode", flush=True)
    started = time.perf_counter()
    lines = []
    try:
        modules = (gpu_check_velocity, gpu_check_cost, gpu_check_tune)
        for check in [check for module in modules for check in module.checks(dev, args.quick)]:
            if int(check[0][0]) in items:
                lines.append(run(check))
    finally:
        gpu_check_tune.stop_ray()
    failed = [line["check"] for line in lines if line["status"] == "FAILED"]
    elapsed = time.perf_counter() - started
    print(f"GPU CHECK {'FAILED: ' + ', '.join(failed) if failed else 'PASSED'} ({elapsed:.0f} s)")
    if args.out:
        summary = {"device": name, "torch": torch.__version__, "quick": args.quick, "seconds": round(elapsed, 1)}
        args.out.write_text(json.dumps({**summary, "passed": not failed, "lines": lines}, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
