"""Per-result cost of NeVeScheduler: flat in the number of live trials, and ASHA's cost when composed with it.

Two measurements, in this one run, the cases measured alternately:

1. **NeVe alone** at 10 and 10,000 live trials (no Ray instance needed). Each live trial is a real
   ``ray.tune.experiment.Trial`` registered with ``on_trial_add``. The timed loop calls
   ``on_trial_result`` round-robin over all live trials with flat results shaped like Tune's
   (auto-filled keys, the user's metrics and ``neve.metrics()``), one copy per call, as
   ``TuneController`` passes ``flatten_dict(result)`` (the copy's cost is timed in a second loop and
   subtracted, here and below). Both sizes cycle through the same 10,000 distinct results, so the only
   difference between them is the number of live trials. Target: a ratio (10,000 / 10) of about 1.
2. **Composed**: ``NeVeScheduler(base_scheduler=ASHAScheduler(...))`` against ``ASHAScheduler`` alone, at
   10 and 3,000 live trials, on the same experiment: round after round every trial reports its next epoch
   (1 .. 99; ASHA's ``max_t`` 100, rungs at 1, 2, 4, ..., 64, where ASHA computes its cutoff), NeVe's
   flags all 0 and every trial tied at each rung, so both keep every trial live. Both get fresh
   schedulers each repeat (a recorded rung is not ranked twice). The trials carry a real Tune
   ``StorageContext``, so the composed scheduler persists its base's state for ``Tuner.restore`` as in a
   real experiment: this starts a local Ray instance (one CPU). It writes that state at the first add
   (untimed), and otherwise on a step of Tune's controller at most once every few seconds, never on a
   result: no write is timed here, and one write's cost is printed apart. Target: composed / ASHA within
   1.2x at both sizes.

Each loop is timed in CPU time of this thread (``time.thread_time``: the time other processes took on a
shared machine is not counted), in chunks of 500 results, and each chunk's best over the repeats is
kept. In the composed case ASHA alone and the composed scheduler take each chunk in turn.

Run: ``python benchmarks/scheduler_decision.py`` (``--quick`` for a short smoke run).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from neve_tune import keys
from neve_tune.ray import NeVeScheduler
from neve_tune.ray._composite import PERSIST_EVERY_S


def make_result(trial_id: str, iteration: int, velocity: float, train_loss: float = 0.3) -> dict:
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
        "train_loss": train_loss,
        "train_acc": 0.9,
        keys.EPOCH: float(iteration),
        keys.MODEL_VELOCITY: velocity,
        keys.VELOCITY_CHANGE: 1e-3,
        keys.LR: 0.05,
        keys.LR_DECAYED: 0.0,
        keys.NUM_DECAYS: 0.0,
        **dict.fromkeys(keys.DECISION_FLAGS.values(), 0.0),  # every flag `NeVe.metrics()` sends, none set
        keys.STOP_THRESHOLD: 1e-3,
        keys.MIN_EPOCHS: 5.0,
    }


CHUNK = 500  # results timed together; each chunk's best over the repeats is kept (filters preemption)


def timed(scheduler: TrialScheduler, order: list[tuple[Trial, dict]]) -> tuple[list[float], list[str]]:
    """Seconds of copy + ``on_trial_result`` for each chunk of ``order``, and the decisions."""
    on_result = scheduler.on_trial_result
    decisions: list[str] = []
    chunks = []
    for i in range(0, len(order), CHUNK):
        start = time.thread_time()
        for trial, result in order[i : i + CHUNK]:
            decisions.append(on_result(None, trial, result.copy()))  # type: ignore[arg-type]
        chunks.append(time.thread_time() - start)
    return chunks, decisions


def copy_cost(order: list[tuple[Trial, dict]]) -> list[float]:
    chunks = []
    for i in range(0, len(order), CHUNK):
        start = time.thread_time()
        for _trial, result in order[i : i + CHUNK]:
            result.copy()
        chunks.append(time.thread_time() - start)
    return chunks


def keep_best(best: list[float] | None, chunks: list[float]) -> list[float]:
    return chunks if best is None else [min(a, b) for a, b in zip(best, chunks, strict=True)]


NUM_DISTINCT_RESULTS = 10_000


class FlatBench:
    """NeVe alone: one scheduler with ``num_trials`` live trials and a fixed stream of results."""

    def __init__(self, num_trials: int, num_results: int) -> None:
        self.scheduler = NeVeScheduler(grace_period=5, max_t=10**9)
        trials = [Trial("train_fn", stub=True) for _ in range(num_trials)]
        for trial in trials:
            self.scheduler.on_trial_add(None, trial)
        # No stop flag set: every decision is CONTINUE, every trial stays live.
        results = [make_result(f"t{i}", 10, 0.1 + 1e-7 * i) for i in range(NUM_DISTINCT_RESULTS)]
        self.order = [(trials[i % num_trials], results[i % NUM_DISTINCT_RESULTS]) for i in range(num_results)]
        self.num_trials = len({trial.trial_id for trial in trials})  # Tune's 8-hex-digit ids may collide
        self.best: list[float] | None = None
        self.copies: list[float] | None = None

    def run(self) -> None:
        chunks, _ = timed(self.scheduler, self.order)
        assert self.scheduler.num_live_trials == self.num_trials
        self.best, self.copies = keep_best(self.best, chunks), keep_best(self.copies, copy_cost(self.order))

    def per_result(self) -> float:
        assert self.best is not None and self.copies is not None
        return (sum(self.best) - sum(self.copies)) / len(self.order)


def asha(max_t: int) -> ASHAScheduler:
    return ASHAScheduler(metric="train_loss", mode="min", max_t=max_t, grace_period=1, reduction_factor=2)


class ComposedBench:
    """ASHA alone vs NeVe composed with ASHA, on the same trials and the same experiment of results.

    ``num_trials`` trials report epochs 1 .. ``epochs - 1`` round by round (ASHA's ``max_t`` is
    ``epochs``: its rungs at 1, 2, 4, ...). Every trial has the same loss in a round, so ASHA ties them
    at every rung and cuts none; NeVe's flags are all 0. Both schedulers see every result.
    """

    def __init__(self, num_trials: int, epochs: int, storage: object) -> None:
        self.trials = [Trial("train_fn", stub=True, storage=storage) for _ in range(num_trials)]  # type: ignore[arg-type]
        self.epochs = epochs
        self.order = [
            (trial, make_result(trial.trial_id, it, 0.1, train_loss=1.0 / it))
            for it in range(1, epochs)
            for trial in self.trials
        ]
        self.best: dict[bool, list[float] | None] = {False: None, True: None}
        self.copies: list[float] | None = None
        self.writes = 0

    def fresh(self, composed: bool) -> TrialScheduler:
        base = asha(self.epochs)
        scheduler: TrialScheduler = NeVeScheduler(base_scheduler=base) if composed else base
        for trial in self.trials:
            scheduler.on_trial_add(None, trial)  # type: ignore[arg-type]
        return scheduler

    def run(self) -> None:
        """One pass of fresh schedulers, chunk by chunk in turn: both see the same load on the machine."""
        schedulers = {composed: self.fresh(composed) for composed in (False, True)}
        chunks: dict[bool, list[float]] = {False: [], True: []}
        for i in range(0, len(self.order), CHUNK):
            for composed, scheduler in schedulers.items():
                seconds, decisions = timed(scheduler, self.order[i : i + CHUNK])
                assert set(decisions) == {TrialScheduler.CONTINUE}, set(decisions)
                chunks[composed] += seconds
        for composed in (False, True):
            self.best[composed] = keep_best(self.best[composed], chunks[composed])
        link = schedulers[True]._base_link  # type: ignore[attr-defined]
        self.writes = max(self.writes, link.writes)
        self.copies = keep_best(self.copies, copy_cost(self.order))

    def per_result(self, composed: bool) -> float:
        best, copies = self.best[composed], self.copies
        assert best is not None and copies is not None
        return (sum(best) - sum(copies)) / len(self.order)


def persist_cost(bench: ComposedBench) -> tuple[float, int]:
    """Seconds for one ``save`` of ASHA's state (what a persist writes) with every rung recorded, and its size."""
    scheduler = bench.fresh(composed=False)
    timed(scheduler, bench.order)
    path = Path(tempfile.mkdtemp(), "state.pkl")
    start = time.perf_counter()
    scheduler.save(str(path))
    return time.perf_counter() - start, path.stat().st_size


def flat_case(results: int, repeats: int) -> None:
    benches = {n: FlatBench(n, results) for n in (10, 10_000)}
    for _ in range(repeats):
        for bench in benches.values():
            bench.run()
    small, large = (benches[n].per_result() for n in (10, 10_000))
    print(f"NeVeScheduler.on_trial_result alone, best of {repeats} x {results:,} results (per chunk of {CHUNK}):")
    print(f"  10 live trials:      {small * 1e6:.3f} us per result")
    print(f"  10,000 live trials:  {large * 1e6:.3f} us per result")
    print(f"  ratio (10,000 / 10): {large / small:.2f}x   (flat = about 1)")


def composed_case(sizes: tuple[int, int], epochs: int, repeats: int, min_results: int) -> None:
    import ray
    from ray.train._internal.storage import StorageContext

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        storage = StorageContext(storage_path=tempfile.mkdtemp(), experiment_dir_name="bench")
        benches = {n: ComposedBench(n, epochs, storage) for n in sizes}
        started = time.perf_counter()
        for bench in benches.values():
            # The small experiment is short: repeat it more, so each chunk's best is as well sampled.
            for _ in range(max(repeats, min_results // len(bench.order))):
                bench.run()
        print(
            f"\nNeVeScheduler(base_scheduler=ASHAScheduler(...)) vs ASHAScheduler alone, epochs 1..{epochs - 1},"
            f" ASHA max_t={epochs}, grace_period=1, reduction_factor=2; best of >= {repeats} per chunk:"
        )
        print(f"  {'live trials':>11}  {'results':>8}  {'ASHA us':>9}  {'NeVe+ASHA us':>12}  {'ratio':>6}  writes")
        for n, bench in benches.items():
            alone, composed = bench.per_result(False), bench.per_result(True)
            ratio = composed / alone
            print(
                f"  {n:>11,}  {len(bench.order):>8,}  {alone * 1e6:>9.2f}  {composed * 1e6:>12.2f}  {ratio:>5.2f}x"
                f"  {bench.writes}"
            )
        seconds, size = persist_cost(benches[sizes[1]])
        print(
            f"  one persist of ASHA's state at {sizes[1]:,} trials ({size / 1e3:.0f} kB): {seconds * 1e3:.2f} ms;"
            f" the composed scheduler writes it at most once every {PERSIST_EVERY_S:g} s, on a step of Tune's"
            " controller (never on a result: the column above counts the write at the first add)"
            f" (this run: {time.perf_counter() - started:.0f} s)"
        )
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=int, default=200_000, help="on_trial_result calls per repeat (NeVe alone)")
    parser.add_argument("--epochs", type=int, default=100, help="ASHA's max_t in the composed case")
    parser.add_argument("--large", type=int, default=3_000, help="live trials of the large composed case")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--min-results", type=int, default=200_000, help="composed case: repeat a size until it timed this many"
    )
    parser.add_argument("--quick", action="store_true", help="a short smoke run: few results and epochs, 2 repeats")
    args = parser.parse_args()
    if args.quick:
        args.results, args.epochs, args.large, args.repeats = 20_000, 20, 300, 2
    flat_case(args.results, args.repeats)
    composed_case((10, args.large), args.epochs, args.repeats, args.min_results)


if __name__ == "__main__":
    main()
