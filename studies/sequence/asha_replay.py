"""How many trial-epochs asynchronous successive halving spends, whatever signal ranks the trials.

    PYTHONPATH=. python studies/sequence/asha_replay.py                      # any signal, random arrivals
    PYTHONPATH=. python studies/sequence/asha_replay.py --mlflow sqlite:///mlflow.db --experiment E \
        --ranked neve-pure:train/tse_ema:min --ranked fifo:val/acc:max      # replay measured curves

Ray's ``ASHAScheduler`` (the ``asha`` arm, and the pruner inside the ``neve`` arm) promotes a trial at a rung
when its value beats the ``1 - 1/rf`` percentile of the values recorded there *before* it; the first trial
at a rung always goes on. How many trials go on therefore depends only on the order of the values in the
order the trials arrive, not on which signal made them. Over random arrival orders (the configurations are
sampled at random), every signal spends the same trial-epochs on average: only a trial that ends by itself
before the cap (NeVe's converged / stalled / memorizing stops) saves epochs against the ``asha`` arm.

The simulation: ``--workers`` slots take the trials in configuration order; an epoch lasts
``1 +- --jitter`` time units (uniform); at each rung (``grace * rf^k`` below the cap) the trial is stopped
when its value is below Ray's cutoff (``numpy.nanpercentile``, as Ray computes it). ``--end E`` stops every
trial at epoch ``E`` at the latest, as if its own rule ended it there.
"""

from __future__ import annotations

import argparse
import heapq
import random
import statistics
from collections.abc import Mapping

import numpy as np

Curves = Mapping[int, Mapping[int, float]]  # config id -> epoch -> value (higher is better)


def rungs(grace: int, rf: int, cap: int) -> list[int]:
    """Ray's rung epochs for one bracket: ``grace * rf^k`` for the ``k`` that fit (as ``_Bracket``)."""
    count = int(np.log(cap / grace) / np.log(rf) + 1)
    return [grace * rf**k for k in range(count)]


def trial_epochs(
    curves: Curves,
    *,
    grace: int = 3,
    rf: int = 3,
    cap: int = 16,
    workers: int = 2,
    jitter: float = 0.0,
    end: int | None = None,
    rng: random.Random | None = None,
) -> int:
    """The trial-epochs of one asynchronous successive-halving run over ``curves`` (see the module docstring)."""
    rng = rng or random.Random(0)
    recorded: dict[int, dict[int, float]] = {r: {} for r in rungs(grace, rf, cap)}
    queue = sorted(curves)
    last = min(cap, end or cap)
    heap: list[tuple[float, int, int]] = []  # (time the epoch ends, config, epoch)

    def start(at: float, config: int, epoch: int) -> None:
        heapq.heappush(heap, (at + rng.uniform(1 - jitter, 1 + jitter), config, epoch))

    for _ in range(min(workers, len(queue))):
        start(0.0, queue.pop(0), 1)
    total = 0
    while heap:
        now, config, epoch = heapq.heappop(heap)
        total += 1
        stop = epoch >= last
        if not stop and epoch in recorded:
            seen, value = recorded[epoch], curves[config][epoch]
            stop = bool(seen) and value < np.nanpercentile(list(seen.values()), (1 - 1 / rf) * 100)
            seen[config] = value
        if not stop:
            start(now, config, epoch + 1)
        elif queue:
            start(now, queue.pop(0), 1)
    return total


def random_curves(n: int, cap: int, rng: random.Random) -> dict[int, dict[int, float]]:
    """``n`` trials whose value at each epoch keeps most of its rank from the epoch before (a fixed order of
    quality plus noise): any signal, as far as successive halving can tell."""
    out: dict[int, dict[int, float]] = {}
    for config in range(n):
        quality = rng.random()
        out[config] = {e: 0.8 * quality + 0.2 * rng.random() for e in range(1, cap + 1)}
    return out


def load_curves(tracking_uri: str, experiment: str, arm: str, key: str, mode: str) -> dict[int, dict[int, float]]:
    """``key`` per epoch of every run named ``<arm>-NNN`` of the first study seed in ``experiment``; ``mode``
    ``"min"`` negates it (higher is better)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"No experiment {experiment!r} in {tracking_uri}.")
    sign = -1.0 if mode == "min" else 1.0
    out: dict[int, dict[int, float]] = {}
    for run in client.search_runs([exp.experiment_id], f"attributes.run_name LIKE '{arm}-%'", max_results=1000):
        config = int(run.info.run_name.rsplit("-", 1)[1])
        if config in out:
            continue  # a later seed's run of the same configuration number
        out[config] = {int(m.step): sign * m.value for m in client.get_metric_history(run.info.run_id, key)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--grace", type=int, default=3)
    p.add_argument("--rf", type=int, default=3)
    p.add_argument("--cap", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--jitter", type=float, default=0.3)
    p.add_argument("--draws", type=int, default=2000)
    p.add_argument("--mlflow", help="tracking URI of a study run whose arms trained every configuration to the cap")
    p.add_argument("--experiment", default="neve-tune-listops")
    p.add_argument("--ranked", action="append", default=[], help="ARM:METRIC:min|max (repeatable)")
    a = p.parse_args()
    rng = random.Random(0)
    kw = {"grace": a.grace, "rf": a.rf, "cap": a.cap, "workers": a.workers, "jitter": a.jitter}
    print(f"rungs {rungs(a.grace, a.rf, a.cap)}, cap {a.cap}, {a.trials} trials, {a.workers} workers")
    draws = [trial_epochs(random_curves(a.trials, a.cap, rng), rng=rng, **kw) for _ in range(a.draws)]
    print(f"any signal, random arrivals: {statistics.mean(draws):.1f} ± {statistics.stdev(draws):.1f} trial-epochs")
    ratios = sorted(sum(draws[i : i + 3]) / sum(draws[i + 3 : i + 6]) for i in range(0, len(draws) - 5, 6))
    share = sum(r <= 0.75 for r in ratios) / len(ratios)
    median = ratios[len(ratios) // 2]
    print(f"two arms that stop nothing themselves, 3-seed sums: ratio median {median:.2f}, <= 0.75 in {share:.1%}")
    for spec in a.ranked:
        arm, key, mode = spec.split(":")
        curves = load_curves(a.mlflow, a.experiment, arm, key, mode)
        for end in (None, 14, 12, 10):
            runs = [trial_epochs(curves, rng=rng, end=end, **kw) for _ in range(300)]
            label = "the cap" if end is None else f"epoch {end}"
            print(f"{arm} ranked by {key}, every trial ends by {label}: {statistics.mean(runs):.1f} trial-epochs")


if __name__ == "__main__":
    main()
