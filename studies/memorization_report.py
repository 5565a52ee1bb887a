"""The markdown report of ``memorization_signals.py``: per study, the in-trial effect, every signal's rank
correlation and regret, flip-curve features, the switch rule on small pools, and the rise-gated stop (offline)."""

from __future__ import annotations

import random
from collections.abc import Sequence

from memorization_scoring import (
    PICKABLE,
    Trial,
    _mean,
    agreement,
    final_preds,
    flip_level,
    guarded,
    loss_signal,
    min_smoothed,
    noise_estimate,
    outcome,
    pool,
    rise,
    score_table,
    switch_values,
    vote,
)

VARIANTS = ("today", "restore", "restore+anneal")


def policy_lines(name: str, trials: Sequence[Trial]) -> list[str]:
    """The in-trial effect: each variant's mean/best test accuracy and epochs, and the per-configuration rows."""
    p = pool(trials)
    out = [
        f"#### {name}: in-trial policies ({len(trials)} configurations, {len(p)} pickable;"
        f" LabelWave fired in {sum(1 for t in trials if t.get('wave'))}, in {sum(1 for t in p if t.get('wave'))}"
        " pickable)",
        "",
        "| policy | mean test acc (all) | mean test acc (pickable) | best | epochs (sum) | epochs (pickable) |",
        "|---|---|---|---|---|---|",
    ]
    for v in VARIANTS:
        res = [outcome(t, v) for t in trials]
        resp = [outcome(t, v) for t in p]
        out.append(
            f"| {v} | {_mean([r[0] for r in res]):.4f} | {_mean([r[0] for r in resp]):.4f} |"
            f" {max(r[0] for r in res):.4f} | {sum(r[1] for r in res)} | {sum(r[1] for r in resp)} |"
        )
    out += [
        "",
        "| config | lr | wd | width | today (epochs, reason) | LabelWave min / stop | restore | restore+anneal (epochs)"
        " | flip rise after min |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for t in trials:
        c, w = t["config"], t.get("wave")
        today, _ = outcome(t, "today")
        ra, ra_e = outcome(t, "restore+anneal")
        cells = [
            f"{c['config_id']}",
            f"{c['lr']:.3g}",
            f"{c.get('weight_decay', 0):.3g}",
            f"{c.get('width', '')}",
            f"{today:.3f} ({len(t['rows'])}, {t['reason']})",
            f"{w['min_epoch']} / {w['stop_epoch']}" if w else "-",
            f"{outcome(t, 'restore')[0]:.3f}" if w else "-",
            f"{ra:.3f} ({ra_e})" if w else "-",
            f"{rise(t):.2f}",
        ]
        out.append("| " + " | ".join(cells) + " |")
    return [*out, ""]


def signal_lines(name: str, trials: Sequence[Trial]) -> list[str]:
    """rho / regret (picked test accuracy) of every signal against each variant's test accuracy (pickable pool)."""
    tables = {v: score_table(trials, v) for v in VARIANTS}
    out = [
        f"#### {name}: signals over the {len(pool(trials))} pickable trials: rho / regret (picked test acc)",
        "",
        "| signal (higher is better unless marked low) | " + " | ".join(f"vs `{v}` test acc" for v in VARIANTS) + " |",
        "|---|---|---|---|",
    ]
    for i, (sig, *_) in enumerate(tables[VARIANTS[0]]):
        cells = []
        for v in VARIANTS:
            _, rho, regret, picked = tables[v][i]
            cells.append(f"{rho:+.2f} / {100 * regret:.1f} pp ({picked:.3f})")
        out.append(f"| {sig} | " + " | ".join(cells) + " |")
    return [*out, ""]


def noise_features(trials: Sequence[Trial]) -> dict[str, float]:
    """Study-level features of the pickable trials' flip curves, candidates to detect label noise."""
    p = pool(trials)
    rises = sorted(rise(t) for t in p)
    mins = sorted(min_smoothed(t) for t in p)
    fitted = max(p, key=lambda t: min(r["loss"] for r in t["rows"]))
    return {
        "fired (share of pickable)": sum(1 for t in p if t.get("wave")) / len(p),
        "median rise after the minimum": rises[len(rises) // 2],
        "max rise after the minimum": rises[-1],
        "median min smoothed flips": mins[len(mins) // 2],
        "min smoothed flips of the lowest-loss trial": min_smoothed(min(p, key=lambda t: t["rows"][-1]["loss"])),
        "lowest min smoothed flips": mins[0],
        "highest-loss trial's min smoothed flips": min_smoothed(fitted),
    }


def guard_lines(name: str, trials: Sequence[Trial], deltas: Sequence[float] = (0.0, 0.1, 0.2, 0.3)) -> list[str]:
    """Offline: the restore-only outcome of the rise-gated stop (delta 0 = LabelWave as run) over all trials."""
    out = [
        f"#### {name}: the stop with a rise gate (offline, restore only: the weights of the minimum, no cooldown)",
        "",
        "| delta | fired | mean test acc (all) | vs today (pp) | mean test acc (pickable) | epochs (sum) |",
        "|---|---|---|---|---|---|",
    ]
    today = [outcome(t, "today")[0] for t in trials]
    for delta in deltas:
        tests, epochs, fired = [], 0, 0
        for t in trials:
            m, s = guarded(t, delta)
            if s is None or m is None:
                tests.append(float(t["rows"][-1]["test"]))
                epochs += len(t["rows"])
            else:
                tests.append(float(t["rows"][m - 1]["test"]))
                epochs += s
                fired += 1
        pk = [x for x, t in zip(tests, trials, strict=True) if t["reason"] in PICKABLE]
        gain = 100 * (_mean(tests) - _mean(today))
        out.append(f"| {delta} | {fired} | {_mean(tests):.4f} | {gain:+.2f} | {_mean(pk):.4f} | {epochs} |")
    return [*out, ""]


def subpool_lines(
    name: str, trials: Sequence[Trial], variant: str, sizes: Sequence[int] = (3, 5, 8), draws: int = 300
) -> list[str]:
    """Robustness: random pools of a few pickable trials (what survives pruning); mean regret of each rule and how
    often each detector calls the labels noisy."""
    p = pool(trials)
    rng = random.Random(0)
    out = [
        f"#### {name}: pools of a few pickable trials ({draws} random draws each, `{variant}` test acc;"
        " consensus on a random 1,000 training inputs): mean regret, and the share of pools called noisy",
        "",
        "| pool size | mean train loss (`today`: whole run; else to the memorisation point) | agreement with the final"
        " consensus (ties by the mean loss) | switch, flip detector | switch, vote detector | noisy by flips |"
        " noisy by vote |",
        "|---|---|---|---|---|---|---|",
    ]
    n = len(p[0]["labels"])
    for k in sizes:
        if k > len(p):
            continue
        regrets: dict[str, list[float]] = {"loss": [], "cons": [], "flips": [], "vote": []}
        called = {"flips": 0, "vote": 0}
        for _ in range(draws):
            sub = rng.sample(p, k)
            samples = rng.sample(range(n), min(1000, n))
            tests = [outcome(t, variant)[0] for t in sub]
            finals = [final_preds(t, variant) for t in sub]
            v = vote([[f[i] for i in samples] for f in finals])
            values = {
                "cons": [
                    agreement([f[i] for i in samples], v) + 1e-6 * loss_signal(t, variant)
                    for f, t in zip(finals, sub, strict=True)
                ],
                "loss": [loss_signal(t, variant) for t in sub],
            }
            for det in ("flips", "vote"):
                noisy, _, values[det] = switch_values(sub, variant, samples, detector=det)
                called[det] += noisy
            for key, vals in values.items():
                regrets[key].append(max(tests) - tests[max(range(k), key=lambda i: vals[i])])
        cells = [f"{100 * _mean(regrets[key]):.2f} pp" for key in ("loss", "cons", "flips", "vote")]
        cells += [f"{100 * called[d] / draws:.0f}%" for d in ("flips", "vote")]
        out.append(f"| {k} | " + " | ".join(cells) + " |")
    return [*out, ""]


def report(name: str, trials: Sequence[Trial]) -> list[str]:
    """The markdown section of one study."""
    feats = noise_features(trials)
    lines = [f"#### {name}: flip-curve features of the pickable trials", ""]
    lines += [f"- {k}: {v:.3f}" for k, v in feats.items()]
    lines.append(
        f"- flip level (the lowest minimum smoothed flip fraction at the initial LR): {flip_level(pool(trials)):.3f}"
    )
    for v in VARIANTS:
        est = noise_estimate(pool(trials), v)
        lines.append(f"- noise estimate (1 - agreement of the `{v}` final models' vote with the labels): {est:.3f}")
    return [
        f"### {name}",
        "",
        *policy_lines(name, trials),
        *signal_lines(name, trials),
        *lines,
        "",
        *subpool_lines(name, trials, "today"),
        *subpool_lines(name, trials, "restore+anneal"),
        *guard_lines(name, trials),
    ]
