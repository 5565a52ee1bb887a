"""Scoring functions of ``memorization_signals.py``: the LabelWave detector and the cross-trial signals (issue 22).

Everything here is a pure function of the JSON rows that ``memorization_signals.py`` records per trial, so the
signals can be re-scored (and tested on synthetic rows) without training anything.

A trial record (``dict``) holds:

* ``rows``: one dict per epoch of the NeVe anneal run (``anneal-linear-0.1``, today's ``neve`` arm): ``epoch``,
  ``loss`` and ``acc`` (running means of the training pass), ``flips`` (the fraction of training samples whose
  training-pass predicted class changed since the previous epoch; ``None`` at epoch 1), ``test``, ``lr``,
  ``susc`` (the susceptibility step with the trial's own optimizer) and ``susc_probe`` (with a fixed plain-SGD
  probe LR);
* ``reason``: how today's policy ended the run (``converged``, ``max_t``, ``stalled``, ...);
* ``wave``: the LabelWave stop, ``None`` when it never fired, else ``{"min_epoch", "stop_epoch", "anneal": rows
  of the cooldown after the restore, "susc_probe_restored", "susc_probe_final", ...}``;
* ``preds``: eval-mode predictions on the training inputs (``"4"``, ``"12"``, ``"restored"``, ``"final"`` of
  the new policy, ``"today"``: today's final model) and ``labels``: the (possibly noisy) training labels.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

Row = dict[str, Any]
Trial = dict[str, Any]

K_SMOOTH = 3
PATIENCE = 5
PICKABLE = ("converged", "max_t")


# ---------------------------------------------------------------------------- LabelWave


def smoothed(flips: Sequence[float | None], k: int = K_SMOOTH) -> list[float | None]:
    """Moving average of the last ``k`` flip fractions; ``None`` until ``k`` defined values are there."""
    out: list[float | None] = []
    for i in range(len(flips)):
        window = [x for x in flips[max(0, i - k + 1) : i + 1] if x is not None]
        out.append(sum(window) / k if len(window) == k else None)
    return out


def labelwave(
    flips: Sequence[float | None], k: int = K_SMOOTH, patience: int = PATIENCE
) -> tuple[int | None, int | None]:
    """(epoch of the running minimum of the smoothed count, epoch the stop fires) over 1-based epochs.

    Algorithm 1 of LabelWave (Yuan, Feng, Liu, ICLR 2024): the smoothed count's running minimum; the stop fires
    ``patience`` epochs after the last new minimum. ``(m, None)`` when it has not fired (yet), ``(None, None)``
    while no smoothed value exists.
    """
    best, best_epoch, wait = math.inf, None, 0
    for i, s in enumerate(smoothed(flips, k)):
        if s is None:
            continue
        if s < best:
            best, best_epoch, wait = s, i + 1, 0
        else:
            wait += 1
            if wait >= patience:
                return best_epoch, i + 1
    return best_epoch, None


def memorization_point(trial: Trial) -> int:
    """The epoch the new policy restores (the LabelWave minimum) or, when it never fired, the run's last."""
    wave = trial.get("wave")
    return int(wave["min_epoch"]) if wave else len(trial["rows"])


def constant_phase(trial: Trial) -> list[Row]:
    """The rows trained at the initial LR (before any cooldown of today's policy)."""
    rows = trial["rows"]
    lr0 = float(rows[0]["lr"])
    n = next((i for i, r in enumerate(rows) if float(r["lr"]) < lr0 * (1 - 1e-9)), len(rows))
    return rows[:n]


def min_smoothed(trial: Trial) -> float:
    """The minimum of the smoothed flip fraction over the constant-LR phase (NaN when it is too short)."""
    return min((x for x in smoothed([r["flips"] for r in constant_phase(trial)]) if x is not None), default=math.nan)


def rise(trial: Trial) -> float:
    """How far the smoothed flip curve climbs after its minimum within the constant-LR phase: max(after) / min - 1
    (0 when it never turns up or is too short)."""
    s = [x for x in smoothed([r["flips"] for r in constant_phase(trial)]) if x is not None]
    if not s:
        return 0.0
    i = min(range(len(s)), key=lambda j: s[j])
    return max(s[i:]) / s[i] - 1 if s[i] > 0 else 0.0


# ---------------------------------------------------------------------------- the new policy's outcome


def outcome(trial: Trial, variant: str) -> tuple[float, int]:
    """(test accuracy, epochs trained) of ``variant``: ``today`` (the anneal run's final model), ``restore``
    (LabelWave stop, weights of its minimum) or ``restore+anneal`` (then a linear cooldown)."""
    rows, wave = trial["rows"], trial.get("wave")
    if variant == "today" or not wave:
        return float(rows[-1]["test"]), len(rows)
    m, s = int(wave["min_epoch"]), int(wave["stop_epoch"])
    if variant == "restore":
        return float(rows[m - 1]["test"]), s
    assert variant == "restore+anneal", variant
    return float(wave["anneal"][-1]["test"]), s + len(wave["anneal"])


# ---------------------------------------------------------------------------- signals (higher is better)


def agreement(a: Sequence[int], b: Sequence[int]) -> float:
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


def vote(predictions: Sequence[Sequence[int]]) -> list[int]:
    """Per-sample majority vote (ties: the class seen first)."""
    return [Counter(column).most_common(1)[0][0] for column in zip(*predictions, strict=True)]


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def zeta(trial: Trial) -> float:
    """Forouzesh et al.'s susceptibility zeta(t): the running mean over epochs 1..t of the one-step loss drop on
    randomly labelled training inputs (own optimizer), at t = the memorisation point."""
    m = memorization_point(trial)
    return _mean([float(r["susc"]) for r in trial["rows"][:m]])


def final_preds(trial: Trial, variant: str) -> list[int]:
    if variant == "today" or not trial.get("wave"):
        return trial["preds"]["today"]
    return trial["preds"]["restored" if variant == "restore" else "final"]


def last_row(trial: Trial, variant: str) -> Row:
    """The last training row of the variant's run (the cooldown's last for ``restore+anneal``)."""
    wave = trial.get("wave")
    if variant == "today" or not wave:
        return trial["rows"][-1]
    return trial["rows"][int(wave["min_epoch"]) - 1] if variant == "restore" else wave["anneal"][-1]


def trained_rows(trial: Trial, variant: str) -> list[Row]:
    """Every epoch the variant trained: today's whole run; or epochs 1..stop (then the cooldown's)."""
    wave = trial.get("wave")
    if variant == "today" or not wave:
        return list(trial["rows"])
    rows = list(trial["rows"][: int(wave["stop_epoch"])])
    return rows + list(wave["anneal"]) if variant == "restore+anneal" else rows


def final_probe(trial: Trial, variant: str) -> float:
    """Susceptibility with the fixed probe LR at the variant's final weights."""
    wave = trial.get("wave")
    if variant == "today" or not wave:
        return float(trial["rows"][-1]["susc_probe"])
    return float(wave["susc_probe_restored" if variant == "restore" else "susc_probe_final"])


def stable_fitted(trial: Trial, span: int = 3) -> float:
    """Fraction of training samples whose training-pass prediction was the same over the ``span`` epochs ending
    at the memorisation point and equals the given label (needs ``pass_preds``)."""
    m = memorization_point(trial)
    seq = trial["pass_preds"][max(0, m - span) : m]
    labels = trial["labels"]
    return _mean([float(all(p[i] == seq[0][i] for p in seq) and seq[0][i] == y) for i, y in enumerate(labels)])


def pool_signals(trials: Sequence[Trial], variant: str) -> dict[str, list[float]]:
    """Every candidate signal of every trial of the pool, oriented so that higher is better."""
    upto = [t["rows"][: memorization_point(t)] for t in trials]
    out: dict[str, list[float]] = {
        "(a) mean train loss to the memorisation point": [-_mean([r["loss"] for r in u]) for u in upto],
        "today: mean train loss of the whole run (shipped pick)": [
            -_mean([r["loss"] for r in t["rows"]]) for t in trials
        ],
        "shipped rule on the variant's run: mean train loss over every epoch it trained": [
            -_mean([r["loss"] for r in trained_rows(t, variant)]) for t in trials
        ],
        "train loss at the memorisation point": [-float(u[-1]["loss"]) for u in upto],
        "train acc at the memorisation point": [float(u[-1]["acc"]) for u in upto],
        "final train loss of the variant's run": [-float(last_row(t, variant)["loss"]) for t in trials],
    }
    finals = [final_preds(t, variant) for t in trials]
    votes = {
        "epoch-12 consensus": vote([t["preds"].get("12") or t["preds"]["today"] for t in trials]),
        "consensus of the restored models": vote([final_preds(t, "restore") for t in trials]),
        "consensus of the variant's final models": vote(finals),
    }
    for label, v in votes.items():
        out[f"(b) agreement with the {label}"] = [agreement(f, v) for f in finals]
    out["(b) agreement with the final models' consensus, ties by the mean loss"] = [
        agreement(f, votes["consensus of the variant's final models"]) + 1e-6 * loss_signal(t, variant)
        for f, t in zip(finals, trials, strict=True)
    ]
    out["(c) susceptibility zeta to the memorisation point (low)"] = [-zeta(t) for t in trials]
    out["(c) zeta / LR (low)"] = [-_mean([r["susc"] / r["lr"] for r in u]) for u in upto]
    out["(c) susceptibility, probe LR, final weights (low)"] = [-final_probe(t, variant) for t in trials]
    z = [zeta(t) for t in trials]
    acc = [float(u[-1]["acc"]) for u in upto]
    zm, am = _mean(z), _mean(acc)
    # the paper's selection: the quadrant of high train accuracy and low susceptibility first, then low zeta
    out["(c) quadrant: acc >= mean and zeta <= mean, then low zeta"] = [
        (1.0 if (a >= am and zz <= zm) else 0.0) * 1e6 - zz for a, zz in zip(acc, z, strict=True)
    ]
    probe = [final_probe(t, variant) for t in trials]
    facc = [float(last_row(t, variant)["acc"]) for t in trials]
    fm, pm = _mean(facc), _mean(probe)
    out["(c) quadrant with the probe LR: final train acc >= mean and probe <= mean, then low probe"] = [
        (1.0 if (a >= fm and q <= pm) else 0.0) * 1e6 - q for a, q in zip(facc, probe, strict=True)
    ]
    out["(d) min smoothed flip fraction, constant-LR phase (low)"] = [-min_smoothed(t) for t in trials]
    out["(d) mean flip fraction to the memorisation point (low)"] = [
        -_mean([float(r["flips"]) for r in u if r["flips"] is not None]) for u in upto
    ]
    if all("pass_preds" in t for t in trials):
        out["(d) stable-and-fitted fraction at the memorisation point"] = [stable_fitted(t) for t in trials]
    out["(d) flip curve rise after its minimum (low)"] = [-rise(t) for t in trials]
    out["switch: (b) final consensus if the flip level > 0.1, else mean loss"] = switch_values(trials, variant)[2]
    out["switch: (b) final consensus if the vote's noise estimate > 0.05, else mean loss"] = switch_values(
        trials, variant, detector="vote"
    )[2]
    return out


# ---------------------------------------------------------------------------- rank correlation, regret


def ranking_signals() -> Any:
    """``studies/ranking_signals.py`` as a module (its studies, controller and Spearman rho)."""
    if "ranking_signals" not in sys.modules:
        spec = importlib.util.spec_from_file_location("ranking_signals", Path(__file__).with_name("ranking_signals.py"))
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["ranking_signals"] = module
        spec.loader.exec_module(module)
    return sys.modules["ranking_signals"]


def rho_and_regret(values: Sequence[float], tests: Sequence[float]) -> tuple[float, float, int]:
    """(Spearman rho, regret of the highest value's pick = best test - picked test, index picked)."""
    ok = [i for i, v in enumerate(values) if math.isfinite(v)]
    pick = max(ok, key=lambda i: values[i])
    return ranking_signals().spearman(values, tests), max(tests) - tests[pick], pick


def pool(trials: Sequence[Trial]) -> list[Trial]:
    """The trials the arm may pick: today's run ended converged or at the cap (never stalled/collapsed/diverged)."""
    return [t for t in trials if t["reason"] in PICKABLE]


def score_table(trials: Sequence[Trial], variant: str) -> list[tuple[str, float, float, float]]:
    """Per signal: (name, rho with the variant's test accuracy over the pool, regret, picked test accuracy)."""
    p = pool(trials)
    tests = [outcome(t, variant)[0] for t in p]
    rows = []
    for name, values in pool_signals(p, variant).items():
        rho, regret, i = rho_and_regret(values, tests)
        rows.append((name, rho, regret, tests[i]))
    return rows


# ---------------------------------------------------------------------------- stop rules and the switch


def guarded(trial: Trial, delta: float, k: int = K_SMOOTH, patience: int = PATIENCE) -> tuple[int | None, int | None]:
    """LabelWave with a rise gate: fire only when, ``patience`` or more epochs after the minimum, the smoothed count
    is at least ``(1 + delta)`` times its minimum (the curve turned up, not a plateau)."""
    best, best_epoch, wait = math.inf, None, 0
    for i, s in enumerate(smoothed([r["flips"] for r in trial["rows"]], k)):
        if s is None:
            continue
        if s < best:
            best, best_epoch, wait = s, i + 1, 0
            continue
        wait += 1
        if wait >= patience and s >= (1 + delta) * best:
            return best_epoch, i + 1
    return best_epoch, None


NOISE_THRESHOLD = 0.05
FLIP_THRESHOLD = 0.1


def loss_signal(trial: Trial, variant: str) -> float:
    """Minus the mean training loss over the epochs the variant's model saw: the whole run for ``today`` (the
    shipped pick), else up to the memorisation point (signal (a))."""
    rows = trial["rows"] if variant == "today" else trial["rows"][: memorization_point(trial)]
    return -_mean([r["loss"] for r in rows])


def noise_estimate(trials: Sequence[Trial], variant: str, samples: Sequence[int] | None = None) -> float:
    """1 - agreement of the given training labels with the majority vote of the trials' final predictions on the
    training inputs (``samples``: only those indices): an estimate of the label-noise rate."""
    finals = [final_preds(t, variant) for t in trials]
    idx = range(len(finals[0])) if samples is None else samples
    v = vote([[f[i] for i in idx] for f in finals])
    return 1 - agreement(v, [trials[0]["labels"][i] for i in idx])


def flip_level(trials: Sequence[Trial]) -> float:
    """The lowest, over ``trials``, of each one's minimum smoothed flip fraction at its initial LR: how stable the
    best-settled trial's training-pass predictions ever got (label noise keeps it high)."""
    return min(min_smoothed(t) for t in trials)


def switch_values(
    trials: Sequence[Trial], variant: str, samples: Sequence[int] | None = None, detector: str = "flips"
) -> tuple[bool, str, list[float]]:
    """The shipped-candidate rule: (labels look noisy, the signal used, its values over ``trials``, higher better).

    The labels look noisy when ``detector="flips"``: :func:`flip_level` > ``FLIP_THRESHOLD``; ``"vote"``:
    :func:`noise_estimate` > ``NOISE_THRESHOLD``. Then: agreement of each trial's final predictions with the
    trials' majority vote (on ``samples``), equal agreement broken by :func:`loss_signal`; else :func:`loss_signal`
    (the lowest mean training loss)."""
    if detector == "flips":
        noisy = flip_level(trials) > FLIP_THRESHOLD
    else:
        noisy = noise_estimate(trials, variant, samples) > NOISE_THRESHOLD
    if noisy:
        finals = [final_preds(t, variant) for t in trials]
        idx = list(range(len(finals[0]))) if samples is None else list(samples)
        v = vote([[f[i] for i in idx] for f in finals])
        # equal agreement (common on clean data, where many trials fit the vote exactly): the lower mean loss first;
        # 1e-6 x loss stays below one sample's 1 / len(idx) for any idx under 100,000 samples
        return (
            True,
            "consensus agreement",
            [
                agreement([f[i] for i in idx], v) + 1e-6 * loss_signal(t, variant)
                for f, t in zip(finals, trials, strict=True)
            ],
        )
    return False, "mean train loss", [loss_signal(t, variant) for t in trials]
