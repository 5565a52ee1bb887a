"""Plain-loop NeVe on noisy and clean data: does the memorisation watch stop near the best test epoch?

For each task and seed, one training run with NeVe's defaults and ``neve.observe(outputs, indices)`` fed
from every training batch. Recorded per epoch: training loss, test accuracy, the flip fraction and its
smoothed value. Reported per run:

* the best test epoch and accuracy of the run (the oracle: a validation split could at best find it);
* **before** (NeVe as on main without ``observe``): NeVe's stop epoch, reason and test accuracy. The run feeds
  ``observe`` to a watch that never decides (``NEVER``), which records the flip curve of the whole run and
  changes none of NeVe's decisions;
* **after** (with ``observe``, NeVe defaults): the stop epoch and reason, and the accuracy of the model NeVe
  ends with (on ``memorizing``: the weights of the flip minimum, then a short linear cooldown from them);
* **restore only** (``Memorization(anneal=False)``): the same stop without the cooldown;
* **unguarded** (``Memorization(learned=0.0)``): the watch without its warm-up guard (as before the guard).

The "before" numbers come from the same run continued past the memorisation stop (NeVe's decisions until
then are the same: observe() changes nothing else), so both sides share one trajectory.

Run: ``nice -n 10 env OMP_NUM_THREADS=1 PYTHONPATH=. python studies/overfitting/plain_loop.py [task ...]``
(tasks: the keys of ``TASKS``; seeds as numbers; ``MAX_EPOCHS`` (100), ``VARIANTS`` (``before,after,restore``)
and ``OUT_DIR`` (this folder) from the environment); it writes ``OUT_DIR/results_<task>.json``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from neve_tune import Memorization, NeVe, noise_aux

HERE = Path(__file__).resolve().parent
MAX_EPOCHS = int(os.environ.get("MAX_EPOCHS", "100"))
OUT_DIR = Path(os.environ.get("OUT_DIR", HERE))
SLOW_LR = 0.005  # the slow-LR trials of memorization_signals.md finding 2 (lr 0.0044 and 0.0064)
#: ``before``: the watch is fed but never decides (its minimum can never be this old), so NeVe's decisions are
#: main's without observe() and the flip curve of the whole run is recorded for offline replays.
NEVER = Memorization(patience=10**6)


def mnist1d_task(noise: float, seed: int, lr: float = 0.05) -> dict[str, Any]:
    from neve_tune.studies import DataRequest
    from neve_tune.studies.builtin.mnist1d import MNIST1DCNN, NOISE_FRACTION, load_data

    data = load_data(DataRequest(val_fraction=0.0, seed=seed, batch_size=64), label_noise=NOISE_FRACTION * noise)
    torch.manual_seed(seed)
    model = MNIST1DCNN()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    return dict(
        model=model,
        opt=opt,
        x=data.x_train,
        y=data.y_train,
        x_te=data.x_test,
        y_te=data.y_test,
        aux=noise_aux((1, 40), n=100, seed=seed),
        batch=64,
        shuffle=True,
        seed=seed,
    )


def digits_task(noise: float, seed: int) -> dict[str, Any]:
    """The README's loop: digits, the small CNN, SGD 0.1 momentum 0.9, batches in order (``noise``: that share
    of the training labels flipped, symmetric, with the noisy study's generator seed)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from neve_tune.studies.builtin.mnist1d import NOISE_SEED, flip_labels

    torch.manual_seed(seed)
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16
    y = torch.tensor(digits.target)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, stratify=y, random_state=0)
    if noise:
        y_tr = flip_labels(y_tr, noise, seed=NOISE_SEED)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return dict(
        model=model,
        opt=opt,
        x=x_tr,
        y=y_tr,
        x_te=x_te,
        y_te=y_te,
        aux=noise_aux((1, 8, 8), n=100),
        batch=64,
        shuffle=False,
        seed=seed,
    )


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was = model.training
    model.eval()
    with torch.no_grad():
        batches = zip(x.split(1024), y.split(1024), strict=True)
        correct = sum(int((model(xb).argmax(-1) == yb).sum()) for xb, yb in batches)
    model.train(was)
    return correct / len(y)


def train_epoch(t: dict[str, Any], neve: NeVe | None, gen: torch.Generator) -> tuple[float, list[int]]:
    """One epoch; its mean training loss and the histogram of the training pass's predicted classes."""
    model, opt, x, y = t["model"], t["opt"], t["x"], t["y"]
    model.train()
    order = torch.randperm(len(y), generator=gen) if t["shuffle"] else torch.arange(len(y))
    total = 0.0
    hist = torch.zeros(0, dtype=torch.long)
    for i in range(0, len(y), t["batch"]):
        idx = order[i : i + t["batch"]]
        opt.zero_grad()
        out = model(x[idx])
        loss = nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y[idx].reshape(-1))
        loss.backward()
        opt.step()
        if neve is not None:
            neve.observe(out, idx)  # the outputs of the forward that trained on the batch
        total += float(loss.detach()) * len(idx)
        counts = torch.bincount(out.detach().argmax(-1).reshape(-1), minlength=out.shape[-1])
        hist = counts if not len(hist) else hist + counts
    return total / len(y), hist.tolist()


def gru_task(noise: float, seed: int) -> dict[str, Any]:
    from sequence_task import gru_task as make

    return make(noise, seed)


TASKS = {
    "gru-noisy": lambda seed: gru_task(0.2, seed),
    "gru": lambda seed: gru_task(0.0, seed),
    "mnist1d-noisy": lambda seed: mnist1d_task(1.0, seed),
    "mnist1d": lambda seed: mnist1d_task(0.0, seed),
    "mnist1d-slow": lambda seed: mnist1d_task(0.0, seed, lr=SLOW_LR),
    "mnist1d-noisy-slow": lambda seed: mnist1d_task(1.0, seed, lr=SLOW_LR),
    "digits": lambda seed: digits_task(0.0, seed),
    "digits-noisy": lambda seed: digits_task(0.2, seed),
}


def run(task: str, seed: int, variant: str) -> dict[str, Any]:
    """One run. ``before``: NeVe defaults, a watch that never decides (main's decisions). ``after``: NeVe
    defaults. ``restore``: ``Memorization(anneal=False)``. ``unguarded``: ``Memorization(learned=0.0)``, the
    watch without its warm-up guard."""
    t = TASKS[task](seed)
    kw: dict[str, Any] = {
        "before": {"memorization": NEVER},
        "restore": {"memorization": Memorization(anneal=False)},
        "unguarded": {"memorization": Memorization(learned=0.0)},
    }.get(variant, {})
    neve = NeVe(t["model"], t["opt"], t["aux"], **kw)
    gen = torch.Generator().manual_seed(seed)
    rows: list[dict[str, Any]] = []
    restored_acc = None
    t0 = time.perf_counter()
    for epoch in range(1, MAX_EPOCHS + 1):
        loss, hist = train_epoch(t, neve, gen)
        r = neve.step(loss)
        acc = accuracy(t["model"], t["x_te"], t["y_te"])
        if r.restored_epoch is not None:
            restored_acc = acc
        rows.append(
            dict(
                epoch=epoch,
                loss=loss,
                test_acc=acc,
                lr=r.lrs[0],
                flips=r.flip_fraction,
                smoothed=r.flip_fraction_smoothed,
                min_epoch=r.flip_min_epoch,
                restored=r.restored_epoch,
                reason=None if r.stop_reason is None else str(r.stop_reason),
                hist=hist,
            )
        )
        if neve.should_stop:
            break
    last = rows[-1]
    return dict(
        task=task,
        seed=seed,
        variant=variant,
        rows=rows,
        stop_epoch=last["epoch"],
        stop_reason=last["reason"] or "cap",
        final_acc=last["test_acc"],
        restored_acc=restored_acc,
        restored_epoch=next((r["restored"] for r in rows if r["restored"] is not None), None),
        seconds=time.perf_counter() - t0,
    )


def main(tasks: list[str], seeds: list[int], variants: tuple[str, ...] = ("before", "after", "restore")) -> None:
    for task in tasks:
        out = []
        for seed in seeds:
            runs = {v: run(task, seed, v) for v in variants}
            best = max(runs.get("before", next(iter(runs.values())))["rows"], key=lambda r: r["test_acc"])
            summary = dict(
                seed=seed,
                best_epoch=best["epoch"],
                best_acc=best["test_acc"],
                **{
                    f"{v}_{k}": r[k]
                    for v, r in runs.items()
                    for k in ("stop_epoch", "stop_reason", "final_acc", "restored_epoch", "restored_acc")
                },
            )
            print(json.dumps(summary), flush=True)
            out.append(dict(summary=summary, runs=runs))
        (OUT_DIR / f"results_{task}.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    args = sys.argv[1:] or ["mnist1d-noisy", "mnist1d", "digits"]
    variants = tuple(os.environ.get("VARIANTS", "before,after,restore").split(","))
    main([a for a in args if not a.isdigit()], [int(a) for a in args if a.isdigit()] or [0, 1, 2], variants)
