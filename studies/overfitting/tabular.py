"""Tabular data with 5% flipped training labels: does anything label-free see memorisation there?

Data (``DATA``): ``make`` is ``sklearn.datasets.make_classification(n_samples=4000, n_features=20,
n_informative=8, n_redundant=4, n_classes=4, n_clusters_per_class=2, class_sep=1.0, flip_y=0,
random_state=0)``, standardised, split 3,000 train / 1,000 test (stratified, ``random_state=0``);
``digits`` is ``sklearn.datasets.load_digits`` as 64 flat features / 16 (1,347 train / 450 test, the
README's split). 5% of the training labels are flipped to another class, uniformly (seed 1234, the noisy
study's generator); the test labels stay clean. Model: an MLP (features -> 256 -> 256 -> classes, ReLU),
AdamW lr ``LR`` (1e-3) weight decay 1e-4, batches of 64 shuffled by the run's seed, up to ``MAX_EPOCHS`` (100).

Three runs per seed, sharing their trajectory until NeVe acts:

* ``const``: no decision at all (``min_epochs`` beyond the cap, a watch that never decides): the constant-LR
  curve to the cap, with NeVe's velocity and the flip curve measured at every epoch;
* ``before``: NeVe's defaults with a watch that never decides (main's decisions);
* ``after``: NeVe's defaults with ``observe()`` fed (the ``memorizing`` stop).

Recorded per epoch: test accuracy, training loss, the training pass's flip fraction and its smoothed value,
the model velocity V, the learning rate and NeVe's stop reason. Test accuracy never decides anything.

Run: ``nice -n 10 env OMP_NUM_THREADS=1 PYTHONPATH=. python studies/overfitting/tabular.py [make|digits] [seed ...]``
(``LRS``: comma-separated learning rates for the cross-trial pick table, e.g. ``LRS=3e-4,1e-3,3e-3,1e-2``);
it writes ``OUT_DIR/tabular_<data>.json`` (``OUT_DIR``: this folder).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from neve_tune import Memorization, NeVe, noise_aux

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from plain_loop import NEVER, accuracy  # noqa: E402

MAX_EPOCHS = int(os.environ.get("MAX_EPOCHS", "100"))
OUT_DIR = Path(os.environ.get("OUT_DIR", HERE))
VARIANTS = tuple(os.environ.get("VARIANTS", "const,before,after").split(","))
NOISE = float(os.environ.get("NOISE", "0.05"))
SETTLED = 5  # epochs a prediction must have held to count in ``flips_settled``


def name(data: str) -> str:
    """The results file's stem: the data, and the noise level when it is not the 5% of the report."""
    return data if NOISE == 0.05 else f"{data}_noise{NOISE:g}"


def load(data: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """Train inputs, noisy train labels, test inputs, test labels, the class count, which labels were flipped."""
    from sklearn.datasets import load_digits, make_classification
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    from neve_tune.studies.builtin.mnist1d import NOISE_SEED, flip_labels

    if data == "make":
        x, y = make_classification(
            n_samples=4000,
            n_features=20,
            n_informative=8,
            n_redundant=4,
            n_classes=4,
            n_clusters_per_class=2,
            class_sep=1.0,
            flip_y=0.0,
            random_state=0,
        )
        x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=1000, stratify=y, random_state=0)
        scaler = StandardScaler().fit(x_tr)
        x_tr, x_te = scaler.transform(x_tr), scaler.transform(x_te)
    else:
        digits = load_digits()
        x_tr, x_te, y_tr, y_te = train_test_split(
            digits.data / 16, digits.target, test_size=0.25, stratify=digits.target, random_state=0
        )
    classes = int(y_tr.max()) + 1
    xt, xe = torch.tensor(x_tr, dtype=torch.float32), torch.tensor(x_te, dtype=torch.float32)
    clean = torch.tensor(y_tr)
    yt = flip_labels(clean, NOISE, seed=NOISE_SEED, num_classes=classes)
    return xt, yt, xe, torch.tensor(y_te), classes, yt != clean


def task(data: str, seed: int, lr: float) -> dict[str, Any]:
    x, y, x_te, y_te, classes, flipped = load(data)
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(x.shape[1], 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, classes)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    aux = noise_aux((x.shape[1],), n=100, seed=seed)
    return dict(model=model, opt=opt, x=x, y=y, x_te=x_te, y_te=y_te, aux=aux, batch=64, seed=seed, flipped=flipped)


def train_epoch(t: dict[str, Any], neve: NeVe, gen: torch.Generator) -> tuple[float, torch.Tensor]:
    """One shuffled epoch feeding ``observe()``; its mean training loss and the training pass's predicted
    class of every sample, by index (for the analysis by label: no decision reads them)."""
    model, opt, x, y = t["model"], t["opt"], t["x"], t["y"]
    model.train()
    preds = torch.empty(len(y), dtype=torch.long)
    total = 0.0
    for idx in torch.randperm(len(y), generator=gen).split(t["batch"]):
        opt.zero_grad()
        out = model(x[idx])
        loss = nn.functional.cross_entropy(out, y[idx])
        loss.backward()
        opt.step()
        neve.observe(out, idx)
        preds[idx] = out.detach().argmax(-1)
        total += float(loss.detach()) * len(idx)
    return total / len(y), preds


def run(data: str, seed: int, variant: str, lr: float) -> dict[str, Any]:
    t = task(data, seed, lr)
    settings: dict[str, dict[str, Any]] = {
        "const": {"memorization": NEVER, "min_epochs": 10**6},
        "before": {"memorization": NEVER},
        "after": {"memorization": Memorization()},
    }
    kw = settings[variant]
    neve = NeVe(t["model"], t["opt"], t["aux"], **kw)
    gen = torch.Generator().manual_seed(seed)
    rows: list[dict[str, Any]] = []
    flipped, previous = t["flipped"], None
    stable = torch.zeros(len(t["y"]), dtype=torch.long)  # epochs each sample's prediction has not changed
    for epoch in range(1, MAX_EPOCHS + 1):
        loss, preds = train_epoch(t, neve, gen)
        r = neve.step(loss)
        changed: torch.Tensor | None = None if previous is None else preds != previous
        previous = preds
        # a label-free candidate: flips among the samples whose prediction had held for SETTLED epochs
        settled = stable >= SETTLED
        late: float | None = None if changed is None or not settled.any() else float(changed[settled].float().mean())
        stable = torch.zeros_like(stable) if changed is None else torch.where(changed, 0, stable + 1)
        rows.append(
            dict(
                epoch=epoch,
                loss=loss,
                test_acc=accuracy(t["model"], t["x_te"], t["y_te"]),
                lr=r.lrs[0],
                v=r.model_velocity,
                flips=r.flip_fraction,
                # by label, for the analysis only: the share of flipped-label samples whose training-pass
                # prediction is their wrong label (memorised), and the flips among them and among the rest
                noisy_fit=float((preds[flipped] == t["y"][flipped]).float().mean()) if flipped.any() else None,
                clean_fit=float((preds[~flipped] == t["y"][~flipped]).float().mean()),
                flips_noisy=None if changed is None or not flipped.any() else float(changed[flipped].float().mean()),
                flips_clean=None if changed is None else float(changed[~flipped].float().mean()),
                flips_settled=late,
                settled=float(settled.float().mean()),
                smoothed=r.flip_fraction_smoothed,
                min_epoch=r.flip_min_epoch,
                restored=r.restored_epoch,
                reason=None if r.stop_reason is None else str(r.stop_reason),
            )
        )
        if neve.should_stop:
            break
    return dict(data=data, seed=seed, variant=variant, lr=lr, rows=rows)


def main(data: str, seeds: list[int]) -> None:
    lr = float(os.environ.get("LR", "1e-3"))
    lrs = [float(v) for v in os.environ.get("LRS", "").split(",") if v]
    out: dict[str, Any] = {"runs": [], "pick": []}
    for seed in seeds:
        for variant in VARIANTS:
            r = run(data, seed, variant, lr)
            last = r["rows"][-1]
            print(seed, variant, last["epoch"], last["reason"], f"{last['test_acc']:.3f}", flush=True)
            out["runs"].append(r)
        for other in lrs:  # the cross-trial pick: one ``after`` run per learning rate
            r = run(data, seed, "after", other)
            print(seed, "pick", other, r["rows"][-1]["epoch"], f"{r['rows'][-1]['test_acc']:.3f}", flush=True)
            out["pick"].append(r)
    (OUT_DIR / f"tabular_{name(data)}.json").write_text(json.dumps(out, indent=1))


def smooth(values: list[float | None], k: int = 3) -> list[float | None]:
    """The trailing moving average over ``k`` epochs (``None`` until ``k`` values are in)."""
    out: list[float | None] = []
    seen: list[float] = []
    for v in values:
        if v is not None:
            seen.append(v)
        out.append(sum(seen[-k:]) / k if v is not None and len(seen) >= k else None)
    return out


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One seed's numbers: the constant-LR curve's test peak and end, the label-free signals' extremes, and
    what NeVe did with and without observe()."""
    by = {r["variant"]: r["rows"] for r in runs}
    const = by["const"]
    best = max(const, key=lambda r: r["test_acc"])
    sm = smooth([r["flips"] for r in const])
    flip_min = min((e for e in range(len(const)) if sm[e] is not None), key=lambda e: (sm[e], -e))
    vs = [r["v"] for r in const]
    v_min = min(range(len(const)), key=lambda e: vs[e])
    out = dict(
        seed=runs[0]["seed"],
        best_epoch=best["epoch"],
        best_acc=best["test_acc"],
        end_acc=const[-1]["test_acc"],
        end_loss=const[-1]["loss"],
        flip_min_epoch=flip_min + 1,
        flip_min=sm[flip_min],
        flip_min_acc=const[flip_min]["test_acc"],
        flip_end=sm[-1],
        v_min_epoch=v_min + 1,
        v_min_acc=const[v_min]["test_acc"],
        early=sum(r["test_acc"] for r in const[10:30]) / len(const[10:30]),
        late=sum(r["test_acc"] for r in const[-20:]) / len(const[-20:]),
    )
    for v in ("before", "after"):
        if v not in by:
            continue
        last = by[v][-1]
        restored = next((r["restored"] for r in by[v] if r["restored"] is not None), None)
        out[v] = dict(stop=last["epoch"], reason=last["reason"] or "cap", acc=last["test_acc"], restored=restored)
    return out


def pick(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The neve arm's pick among one seed's ``after`` runs (one per LR): the lowest mean training loss up to
    the restored epoch (the whole run when none), against the best final test accuracy."""

    def mean_loss(rows: list[dict[str, Any]]) -> float:
        restored = next((r["restored"] for r in rows if r["restored"] is not None), None)
        upto = rows[: restored or len(rows)]
        return sum(r["loss"] for r in upto) / len(upto)

    scored = [(mean_loss(r["rows"]), r["rows"][-1]["test_acc"], r["lr"], r["rows"][-1]["reason"]) for r in runs]
    picked = min(scored)
    return dict(
        runs=[dict(lr=lr, mean_loss=m, acc=a, reason=why) for m, a, lr, why in sorted(scored, key=lambda s: s[2])],
        picked_lr=picked[2],
        picked_acc=picked[1],
        best_acc=max(s[1] for s in scored),
    )


def report(data: str, curve_epochs: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 15, 20, 30, 40, 60, 80, 100)) -> None:
    """Print the markdown tables of ``results.md`` from ``OUT_DIR/tabular_<data>.json``."""
    out = json.loads((OUT_DIR / f"tabular_{name(data)}.json").read_text())
    seeds = sorted({r["seed"] for r in out["runs"]})
    print(
        "| seed | test peak: epoch (acc) | mean test acc, epochs 11-30 / 81-100 | constant LR at the cap: acc,"
        " train loss | smoothed flips: min epoch (value), acc there | V: min epoch, acc there |"
        " NeVe before: stop, reason, acc | NeVe after: stop, reason, acc (restored) |"
    )
    print("|" + "---|" * 8)
    for seed in seeds:
        s = summarise([r for r in out["runs"] if r["seed"] == seed])
        neve = [
            "-"
            if v not in s
            else f"{s[v]['stop']}, {s[v]['reason']}, {s[v]['acc']:.3f}"
            + ("" if s[v]["restored"] is None else f" ({s[v]['restored']})")
            for v in ("before", "after")
        ]
        print(
            f"| {seed} | {s['best_epoch']} ({s['best_acc']:.3f}) | {s['early']:.3f} / {s['late']:.3f} |"
            f" {s['end_acc']:.3f}, {s['end_loss']:.4f} | {s['flip_min_epoch']} ({s['flip_min']:.4f}),"
            f" {s['flip_min_acc']:.3f} | {s['v_min_epoch']}, {s['v_min_acc']:.3f} | {neve[0]} | {neve[1]} |"
        )
    for seed in seeds:
        rows = next(r for r in out["runs"] if r["seed"] == seed and r["variant"] == "const")["rows"]
        sm = smooth([r["flips"] for r in rows])
        print(f"\nSeed {seed}, constant LR (by label: the share of the flipped-label samples predicted as their wrong")
        print("label, and the flip fraction among them and among the others; analysis only):\n")
        print(
            "| epoch | test acc | train loss | flip fraction | smoothed | V | flips among settled samples |"
            " wrong labels fit | flips: flipped-label / other samples |"
        )
        print("|---|---|---|---|---|---|---|---|---|")

        def cell(v: float | None, fmt: str = ".4f") -> str:
            return "" if v is None else format(v, fmt)

        for e in curve_epochs:
            if e <= len(rows):
                r = rows[e - 1]
                print(
                    f"| {e} | {r['test_acc']:.3f} | {r['loss']:.4f} | {cell(r['flips'])} | {cell(sm[e - 1])} |"
                    f" {r['v']:.4f} | {cell(r.get('flips_settled'))} | {cell(r.get('noisy_fit'), '.3f')} |"
                    f" {cell(r.get('flips_noisy'))} / {cell(r.get('flips_clean'))} |"
                )
    if out["pick"]:
        print(
            "\n| seed | per LR: final acc (mean train loss to the restored epoch), reason | picked LR, acc | best acc |"
        )
        print("|---|---|---|---|")
        for seed in seeds:
            runs = [r for r in out["runs"] if r["seed"] == seed and r["variant"] == "after"]
            runs += [r for r in out["pick"] if r["seed"] == seed]
            pk = pick(runs)
            cells = ", ".join(f"{r['lr']:g}: {r['acc']:.3f} ({r['mean_loss']:.3f}) {r['reason']}" for r in pk["runs"])
            print(f"| {seed} | {cells} | {pk['picked_lr']:g}, {pk['picked_acc']:.3f} | {pk['best_acc']:.3f} |")


if __name__ == "__main__":
    args = sys.argv[1:] or ["make"]
    if args[0] == "report":
        report(args[1] if len(args) > 1 else "make")
    else:
        main(args[0], [int(a) for a in args[1:]] or [0, 1, 2])
