"""Per-result decision cost of NeVeScheduler at 10 and at 10,000 live trials; the cost must stay flat.

Each live trial is a real ``ray.tune.experiment.Trial`` registered with ``on_trial_add``. The timed loop
calls ``on_trial_result`` round-robin over all live trials with flat results shaped like Tune's (auto-filled
keys, the user's metrics and ``neve.metrics()``), one copy per call, as ``TuneController`` passes
``flatten_dict(result)`` (the copy's cost is timed in a second loop and subtracted). Both sizes cycle
through the same 10,000 distinct results, so the only difference between them is the number of live
trials. It prints the cost per result at both sizes and their ratio, measured in this one run (no Ray
instance is started); the two sizes are measured alternately, each loop best of ``--repeats``.

Run: ``python benchmarks/scheduler_decision.py``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ray.tune.experiment import Trial

from neve_tune import keys
from neve_tune.ray import NeVeScheduler


def make_result(trial_id: str, iteration: int, velocity: float) -> dict:
    return {
        "training_iteration": iteration,
        "time_total_s": 0.5 * iteration,
        "time_this_iter_s": 0.5,
        "timestamp": 1_700_000_000 + iteration,
        "trial_id": trial_id,
        "done": False,
        "pid": 1234,
        "hostname": "node",
        "node_ip": "127.0.0.1",
        "train_loss": 0.3,
        "train_acc": 0.9,
        keys.EPOCH: float(iteration),
        keys.MODEL_VELOCITY: velocity,
        keys.VELOCITY_CHANGE: 1e-3,
        keys.LR: 0.05,
        keys.LR_DECAYED: 0.0,
        keys.NUM_DECAYS: 0.0,
        keys.CONVERGED: 0.0,
        keys.DIVERGED: 0.0,
    }


NUM_DISTINCT_RESULTS = 10_000


class Bench:
    """One scheduler with ``num_trials`` live trials and a fixed stream of results."""

    def __init__(self, num_trials: int, num_results: int) -> None:
        self.scheduler = NeVeScheduler(grace_period=5, max_t=10**9)
        trials = [Trial("train_fn", stub=True) for _ in range(num_trials)]
        for trial in trials:
            self.scheduler.on_trial_add(None, trial)
        # Velocities above the threshold: every decision is CONTINUE, every trial stays live.
        results = [make_result(f"t{i}", 10, 0.1 + 1e-7 * i) for i in range(NUM_DISTINCT_RESULTS)]
        self.order = [(trials[i % num_trials], results[i % NUM_DISTINCT_RESULTS]) for i in range(num_results)]
        self.num_trials = num_trials

    def timings(self) -> tuple[float, float]:
        """Seconds per result for (copy + on_trial_result, copy alone)."""
        on_result = self.scheduler.on_trial_result
        start = time.perf_counter()
        for trial, result in self.order:
            on_result(None, trial, result.copy())
        with_call = time.perf_counter() - start
        start = time.perf_counter()
        for _trial, result in self.order:
            result.copy()
        copy_only = time.perf_counter() - start
        assert self.scheduler.num_live_trials == self.num_trials
        return with_call / len(self.order), copy_only / len(self.order)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=int, default=200_000, help="on_trial_result calls per repeat")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    benches = {n: Bench(n, args.results) for n in (10, 10_000)}
    best = {n: (float("inf"), float("inf")) for n in benches}
    for _ in range(args.repeats):
        for n, bench in benches.items():
            with_call, copy_only = bench.timings()
            best[n] = (min(best[n][0], with_call), min(best[n][1], copy_only))
    small, large = (best[n][0] - best[n][1] for n in (10, 10_000))
    print(f"NeVeScheduler.on_trial_result, best of {args.repeats} x {args.results:,} results:")
    print(f"  10 live trials:      {small * 1e6:.3f} us per result")
    print(f"  10,000 live trials:  {large * 1e6:.3f} us per result")
    print(f"  ratio (10,000 / 10): {large / small:.2f}x   (flat = about 1)")


if __name__ == "__main__":
    main()
