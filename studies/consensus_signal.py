"""A cross-trial signal on the *training inputs* against label noise: measured, not shipped (issue 14).

Every validation-free signal of one trial's own run (the training-loss family, velocity, flatness) picks a
memorising configuration under label noise (``studies/ranking_signals.md``). This script measures one
that pools the trials instead: each trial's predicted labels on the training inputs (eval mode) are kept at
epochs 4 and 12 (``grace`` and ``3 grace``, ASHA's first rungs) and at its end; the majority vote of the
pickable trials at epoch ``k`` is a set of proxy labels made before most trials memorise, and a trial scores
by how often its final predictions agree with them. No label of any held-out split is used; test accuracy
only scores the signals.

Every configuration of the study's own sample (study seed 0) is trained under the ``neve`` arm's in-trial
policy (``Anneal(fraction=0.1)``, ``anneal-linear-0.1`` in ``ranking_signals.py``), with that script's model,
data and seeds. Run (one thread, a few minutes per study)::

    OMP_NUM_THREADS=1 .venv/bin/python studies/consensus_signal.py --studies mnist1d-noisy,mnist1d,digits
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from scipy.stats import spearmanr

from neve_tune import noise_aux
from neve_tune.studies import DataRequest
from neve_tune.studies._trial import evaluate, train_epoch, trial_seed

SNAPSHOTS = (4, 12)
POLICY = "anneal-linear-0.1"
PICKABLE = ("converged", "max_t")


def _ranking_signals() -> Any:
    spec = importlib.util.spec_from_file_location("ranking_signals", Path(__file__).with_name("ranking_signals.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["ranking_signals"] = module
    spec.loader.exec_module(module)
    return module


@torch.no_grad()
def _predictions(model: torch.nn.Module, x: torch.Tensor) -> list[int]:
    model.eval()
    out = torch.cat([model(xb).argmax(1) for xb in x.split(512)]).tolist()
    model.train()
    return out


def train_all(name: str, cache: Path) -> dict[str, Any]:
    """Every configuration of ``name`` under the neve arm's policy, with its training-set predictions."""
    path = cache / f"{name}.json"
    if path.exists():
        return json.loads(path.read_text())
    rs = _ranking_signals()
    d = rs.study(name)
    b = d.budget
    data = d.load_data(DataRequest(val_fraction=0.0, seed=0, batch_size=b.batch_size))
    cpu = torch.device("cpu")
    runs = []
    for config in d.configs(seed=0):
        tseed = trial_seed(0, int(config["config_id"]))
        torch.manual_seed(tseed)
        model = d.build_model(config)
        opt = torch.optim.SGD(
            model.parameters(), lr=float(config["lr"]), momentum=b.momentum,
            weight_decay=float(config.get("weight_decay", 0)),
        )  # fmt: skip
        neve = rs._controller(POLICY, model, opt, noise_aux(d.input_shape, n=b.neve.aux_samples, seed=0), d)
        gen = torch.Generator().manual_seed(tseed)
        snapshots: dict[str, list[int]] = {}
        losses: list[float] = []
        reason = "max_t"
        for epoch in range(1, b.max_epochs + 1):
            loss, _ = train_epoch(model, opt, data.train_batches(gen), cpu)
            losses.append(loss)
            step = neve.step(loss)
            if epoch in SNAPSHOTS:
                snapshots[str(epoch)] = _predictions(model, data.x_train)
            if step.stop_reason is not None or not math.isfinite(loss):
                reason = str(step.stop_reason) if step.stop_reason is not None else "diverged"
                break
        neve.close()
        _, test = evaluate(model, data.eval_batches("test"), cpu)
        runs.append(dict(config=config, reason=reason, losses=losses, test=test, snapshots=snapshots,
                         final=_predictions(model, data.x_train)))  # fmt: skip
        print(f"{name} config {config['config_id']}: {reason} at {len(losses)}, test {test:.3f}", flush=True)
    out = {"labels": data.y_train.tolist(), "runs": runs}
    cache.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out))
    return out


def _vote(predictions: Sequence[Sequence[int]]) -> list[int]:
    return [Counter(column).most_common(1)[0][0] for column in zip(*predictions, strict=True)]


def _agreement(a: Sequence[int], b: Sequence[int]) -> float:
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


def report(name: str, measured: dict[str, Any]) -> list[str]:
    labels, runs = measured["labels"], measured["runs"]
    pool = [r for r in runs if r["reason"] in PICKABLE]
    tests = [r["test"] for r in pool]
    best = max(tests)

    def ema(losses: Sequence[float]) -> float:
        e = 0.0
        for x in losses:
            e = 0.9 * e + x
        return e

    signals: dict[str, Callable[[dict[str, Any]], float]] = {
        "mean train loss (the neve pick)": lambda r: -sum(r["losses"]) / len(r["losses"]),
        "TSE-EMA": lambda r: -ema(r["losses"]),
        "final train loss": lambda r: -r["losses"][-1],
        "train accuracy (given labels)": lambda r: _agreement(r["final"], labels),
    }
    lines = [f"#### {name}: {len(pool)} pickable trials, best test accuracy {best:.3f}", ""]
    for k in (*[str(s) for s in SNAPSHOTS], "final"):
        have = [r for r in pool if k == "final" or k in r["snapshots"]]
        votes = _vote([r["final"] if k == "final" else r["snapshots"][k] for r in have])
        lines.append(f"- consensus at epoch {k}: agrees with the given labels on {_agreement(votes, labels):.3f}")
        signals[f"agreement with the epoch-{k} consensus"] = lambda r, v=votes: _agreement(r["final"], v)
    lines += ["", "| signal (higher is better) | rho vs test acc (pickable trials) | pick | regret |"]
    lines.append("|---|---|---|---|")
    for label, signal in signals.items():
        values = [signal(r) for r in pool]
        rho = spearmanr(values, tests).statistic
        picked = tests[max(range(len(pool)), key=lambda i: values[i])]
        lines.append(f"| {label} | {rho:+.2f} | {picked:.3f} | {100 * (best - picked):.1f} pp |")
    return [*lines, ""]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--studies", default="mnist1d-noisy,mnist1d,digits")
    p.add_argument("--cache", default="/tmp/consensus_cache")
    args = p.parse_args()
    for name in args.studies.split(","):
        print("\n".join(report(name, train_all(name, Path(args.cache)))))


if __name__ == "__main__":
    main()
