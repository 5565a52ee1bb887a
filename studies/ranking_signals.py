"""Which validation-free signal ranks trials like test accuracy, and which in-trial LR policy (issue 14).

For each study (``digits``, ``mnist1d`` and ``mnist1d-noisy``: MNIST-1D with 20% of the training labels
flipped by a fixed seed, test labels clean) the script trains every configuration the study samples (its
``Budget.trials``, study seed 0) with the studies' own model, data, optimizer and seeds
(:func:`neve_tune.studies._trial.trial_seed`, ``train_epoch``), on 100% of the training split, under
each policy:

* ``fifo``: the baselines' cosine schedule to the cap (velocity only monitored);
* ``pure``: ``NeVe`` with the paper's rule (the study's ``budget.neve``), stopped where NeVe says;
* ``anneal-<shape>-<fraction>``: ``NeVe(anneal=Anneal(shape, fraction, max_epochs=cap))`` (its default
  ``cap_fraction``), the anneal-on-convergence policy (see :class:`neve_tune.Anneal`).

It records per epoch: train loss, train acc, V, D, LR and test acc (test accuracy only to score the
signals, never to decide anything), caching every run as JSON under ``--cache``. Then it reports, per
study: each policy's test accuracy and epochs (the in-trial comparison), and for every candidate signal
its Spearman rank correlation with final test accuracy (of the same trial under the same policy, and of
the trial under ``fifo``) and the regret of the trial it picks (best test accuracy minus the picked
one's), at full and at partial fidelity (after ``grace``, ``3 grace`` and ``9 grace`` epochs, what an ASHA
rung sees).

Run (one thread; a few minutes per study and policy)::

    OMP_NUM_THREADS=1 .venv/bin/python studies/ranking_signals.py --studies digits,mnist1d,mnist1d-noisy \\
        --policies fifo,pure,anneal-linear-0.1 --out studies/ranking_signals.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from neve_tune import NeVe, VelocityMonitor, noise_aux
from neve_tune.studies import DataRequest, StudyDefinition, TensorData, get_study
from neve_tune.studies._policy import fixed_lr_schedule
from neve_tune.studies._trial import evaluate, train_epoch, trial_seed

NOISE_FRACTION = 0.2
NOISE_SEED = 1234


# ---------------------------------------------------------------------------- studies


def _noisy_mnist1d() -> StudyDefinition:
    base = get_study("mnist1d")

    def load(request: DataRequest) -> TensorData:
        data = base.load_data(request)
        assert isinstance(data, TensorData)
        g = torch.Generator().manual_seed(NOISE_SEED)
        y = data.y_train.clone()
        flip = torch.rand(len(y), generator=g) < NOISE_FRACTION
        # a flipped label is another class, uniformly
        y[flip] = (y[flip] + torch.randint(1, 10, (int(flip.sum()),), generator=g)) % 10
        return replace(data, y_train=y)

    return replace(base, name="mnist1d-noisy", load_data=load)


def study(name: str) -> StudyDefinition:
    return _noisy_mnist1d() if name == "mnist1d-noisy" else get_study(name)


# ---------------------------------------------------------------------------- training


def _controller(policy: str, model: torch.nn.Module, opt: torch.optim.Optimizer, aux: torch.Tensor, d: StudyDefinition):
    s = d.budget.neve
    kw: dict[str, Any] = dict(
        momentum=s.momentum, factor=s.factor, patience=s.patience, stop_threshold=s.stop_threshold
    )
    if policy.startswith("anneal-"):
        from neve_tune import Anneal

        _, shape, fraction = policy.split("-")
        kw["anneal"] = Anneal(shape=shape, fraction=float(fraction), max_epochs=d.budget.max_epochs)  # type: ignore[arg-type]
    return NeVe(model, opt, aux, **kw)


def run_one(d: StudyDefinition, config: dict[str, Any], policy: str, seed: int = 0) -> dict[str, Any]:
    """Train one configuration under one policy, as the study trial loop does; every epoch's numbers."""
    b = d.budget
    data = d.load_data(DataRequest(val_fraction=0.0, seed=seed, batch_size=b.batch_size))
    tseed = trial_seed(seed, int(config["config_id"]))
    torch.manual_seed(tseed)
    model = d.build_model(config)
    opt = torch.optim.SGD(
        model.parameters(),
        lr=float(config["lr"]),
        momentum=b.momentum,
        weight_decay=float(config.get("weight_decay", 0)),
    )
    aux = noise_aux(d.input_shape, n=b.neve.aux_samples, seed=seed)
    gen = torch.Generator().manual_seed(tseed)
    dev = torch.device("cpu")
    rows: list[dict[str, Any]] = []
    reason = "max_t"
    t0 = time.perf_counter()
    if policy == "fifo":
        sched = fixed_lr_schedule(b, opt)
        mon = VelocityMonitor(model, aux, momentum=b.neve.momentum)
        mon.measure()
        for epoch in range(1, b.max_epochs + 1):
            loss, acc = train_epoch(model, opt, data.train_batches(gen), dev)
            m = mon.measure()
            sched.step()
            _, test = evaluate(model, data.eval_batches("test"), dev)
            v = None if m is None else m.model_velocity
            dd = None if m is None else m.velocity_change
            rows.append(dict(epoch=epoch, loss=loss, acc=acc, V=v, D=dd, lr=opt.param_groups[0]["lr"], test=test))
            if not math.isfinite(loss):
                reason = "diverged"
                break
        mon.close()
    else:
        neve = _controller(policy, model, opt, aux, d)
        for epoch in range(1, b.max_epochs + 1):
            loss, acc = train_epoch(model, opt, data.train_batches(gen), dev)
            step = neve.step(loss)
            _, test = evaluate(model, data.eval_batches("test"), dev)
            rows.append(
                dict(epoch=epoch, loss=loss, acc=acc, V=step.model_velocity, D=step.velocity_change,
                     lr=opt.param_groups[0]["lr"], test=test)
            )  # fmt: skip
            if step.stop_reason is not None:
                reason = str(step.stop_reason)
                break
            if not math.isfinite(loss):
                reason = "diverged"
                break
        neve.close()
    return {"config": config, "policy": policy, "reason": reason, "rows": rows, "wall_s": time.perf_counter() - t0}


def runs(name: str, policy: str, cache: Path) -> list[dict[str, Any]]:
    """Every configuration of the study under ``policy`` (cached as JSON)."""
    path = cache / f"{name}__{policy}.json"
    if path.exists():
        return json.loads(path.read_text())
    from tqdm import tqdm

    d = study(name)
    out = [run_one(d, c, policy) for c in tqdm(d.configs(seed=0), desc=f"{name} {policy}")]
    cache.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out))
    return out


# ---------------------------------------------------------------------------- signals


def _f(x: Any) -> float:
    return math.nan if x is None else float(x)


def _upto(run: dict[str, Any], r: int | None) -> list[dict[str, Any]]:
    rows = run["rows"]
    return rows if r is None else rows[:r]


def tse(rows: list[dict[str, Any]], last: int | None = None) -> float:
    """TSE (Lyle et al. 2020): the sum of the epochs' training losses (``last``: of the last ``last`` only)."""
    xs = [_f(x["loss"]) for x in rows][-last:] if last else [_f(x["loss"]) for x in rows]
    return sum(xs)


def tse_ema(rows: list[dict[str, Any]], gamma: float = 0.9) -> float:
    """TSE-EMA (Ru et al. 2021): sum_t gamma^(T-t) L_t, the recent epochs' losses weighted most."""
    total = 0.0
    for x in rows:
        total = gamma * total + _f(x["loss"])
    return total


# name -> (function of the rows seen so far, "min" or "max"). Lower is better for "min".
SIGNALS: dict[str, tuple[Callable[[list[dict[str, Any]]], float], str]] = {
    "final train loss": (lambda rows: _f(rows[-1]["loss"]), "min"),
    "final train acc": (lambda rows: _f(rows[-1]["acc"]), "max"),
    "TSE (sum of losses)": (lambda rows: tse(rows), "min"),
    "TSE / epochs (mean loss)": (lambda rows: tse(rows) / len(rows), "min"),
    "TSE-E (last 5 epochs)": (lambda rows: tse(rows, 5), "min"),
    "TSE-EMA (gamma 0.9)": (lambda rows: tse_ema(rows, 0.9), "min"),
    "TSE-EMA (gamma 0.5)": (lambda rows: tse_ema(rows, 0.5), "min"),
    "final V": (lambda rows: _f(rows[-1]["V"]), "min"),
    "sum of V": (lambda rows: sum(_f(x["V"]) for x in rows), "min"),
    "epochs run": (lambda rows: float(len(rows)), "min"),
}
PARTIAL = ("final train loss", "final train acc", "TSE (sum of losses)", "TSE-EMA (gamma 0.9)", "final V")


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Spearman's rho over the pairs where both are finite (average ranks for ties)."""
    pairs = [(x, y) for x, y in zip(xs, ys, strict=True) if math.isfinite(x) and math.isfinite(y)]
    if len(pairs) < 3:
        return math.nan

    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks([p[0] for p in pairs]), ranks([p[1] for p in pairs])
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sx = math.sqrt(sum((a - mx) ** 2 for a in rx))
    sy = math.sqrt(sum((b - my) ** 2 for b in ry))
    return cov / (sx * sy) if sx and sy else math.nan


_NEVER = ("stalled", "collapsed", "diverged")


def score(
    policy_runs: list[dict[str, Any]], fifo_runs: list[dict[str, Any]], name: str, r: int | None
) -> tuple[float, float, float, float]:
    """(rho vs own test acc, rho vs FIFO test acc, regret of the pick vs own, regret vs FIFO best)."""
    fn, mode = SIGNALS[name]
    sign = 1.0 if mode == "min" else -1.0
    vals = [sign * fn(_upto(run, r)) for run in policy_runs]
    own = [_f(run["rows"][-1]["test"]) for run in policy_runs]
    fifo = [_f(run["rows"][-1]["test"]) for run in fifo_runs]
    # a higher test accuracy should come with a lower (sign-adjusted) signal: report -rho so that 1 is perfect
    rho_own = -spearman(vals, own)
    rho_fifo = -spearman(vals, fifo)
    # the pick: never a trial that stalled/collapsed/diverged (as the arm), nor a non-finite signal
    ok = [
        i
        for i, run in enumerate(policy_runs)
        if math.isfinite(vals[i]) and (r is not None or run["reason"] not in _NEVER)
    ]
    if not ok:
        return rho_own, rho_fifo, math.nan, math.nan
    pick = min(ok, key=lambda i: vals[i])
    best_own = max(x for x in own if math.isfinite(x))
    best_fifo = max(x for x in fifo if math.isfinite(x))
    return rho_own, rho_fifo, best_own - own[pick], best_fifo - fifo[pick]


# ---------------------------------------------------------------------------- report


def policy_table(name: str, by_policy: dict[str, list[dict[str, Any]]]) -> list[str]:
    out = [
        f"#### {name}: in-trial policies on the same {len(by_policy['fifo'])} configurations",
        "",
        "| policy | mean test acc | best test acc | epochs (sum) | mean over fifo per config (pp) | stops |",
        "|---|---|---|---|---|---|",
    ]
    fifo = [_f(run["rows"][-1]["test"]) for run in by_policy["fifo"]]
    for policy, rs in by_policy.items():
        test = [_f(run["rows"][-1]["test"]) for run in rs]
        finite = [t for t in test if math.isfinite(t)]
        diff = [100 * (a - b) for a, b in zip(test, fifo, strict=True) if math.isfinite(a) and math.isfinite(b)]
        epochs = sum(len(run["rows"]) for run in rs)
        reasons: dict[str, int] = {}
        for run in rs:
            reasons[run["reason"]] = reasons.get(run["reason"], 0) + 1
        stops = ", ".join(f"{k} {v}" for k, v in sorted(reasons.items()))
        out.append(
            f"| {policy} | {sum(finite) / len(finite):.4f} | {max(finite):.4f} | {epochs} |"
            f" {sum(diff) / len(diff):+.2f} | {stops} |"
        )
    out += ["", "| config | lr | wd | width | " + " | ".join(by_policy) + " |", "|---" * (4 + len(by_policy)) + "|"]
    for i, run in enumerate(by_policy["fifo"]):
        c = run["config"]
        cells = [
            f"{_f(rs[i]['rows'][-1]['test']):.3f} ({len(rs[i]['rows'])}, {rs[i]['reason']})"
            for rs in by_policy.values()
        ]
        out.append(
            f"| {c['config_id']} | {c['lr']} | {c.get('weight_decay')} | {c.get('width')} | " + " | ".join(cells) + " |"
        )
    return [*out, ""]


def signal_table(name: str, by_policy: dict[str, list[dict[str, Any]]], grace: int) -> list[str]:
    out: list[str] = []
    fifo = by_policy["fifo"]
    for policy, rs in by_policy.items():
        out += [
            f"#### {name}: signals of the `{policy}` runs (full fidelity: each trial's whole run)",
            "",
            "| signal | rho vs own test acc | rho vs fifo test acc | regret (own) | regret (fifo) |",
            "|---|---|---|---|---|",
        ]
        for sig in SIGNALS:
            a, b, c, e = score(rs, fifo, sig, None)
            out.append(f"| {sig} | {a:+.2f} | {b:+.2f} | {100 * c:.1f} pp | {100 * e:.1f} pp |")
        out += [
            "",
            "Partial fidelity (the first r epochs; a trial that stopped earlier counts with its last epoch),"
            " rho vs fifo test acc / regret vs fifo best:",
            "",
            "| signal | " + " | ".join(f"r={r}" for r in (grace, 3 * grace, 9 * grace)) + " |",
            "|---|---|---|---|",
        ]
        for sig in PARTIAL:
            cells = []
            for r in (grace, 3 * grace, 9 * grace):
                _, b, _, e = score(rs, fifo, sig, r)
                cells.append(f"{b:+.2f} / {100 * e:.1f} pp")
            out.append(f"| {sig} | " + " | ".join(cells) + " |")
        out.append("")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--studies", default="digits,mnist1d,mnist1d-noisy")
    p.add_argument("--policies", default="fifo,pure,anneal-linear-0.1")
    p.add_argument("--cache", default="/tmp/ranking_cache")
    p.add_argument("--out", default=None, help="write the markdown tables here (default: print them)")
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    policies = args.policies.split(",")
    if "fifo" not in policies:
        policies.insert(0, "fifo")
    lines: list[str] = []
    for name in args.studies.split(","):
        by_policy = {pol: runs(name, pol, Path(args.cache)) for pol in policies}
        d = study(name)
        lines += [f"### {name} ({d.budget.trials} configurations, cap {d.budget.max_epochs})", ""]
        lines += policy_table(name, by_policy)
        lines += signal_table(name, by_policy, d.budget.grace_period)
    text = "\n".join(lines)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
