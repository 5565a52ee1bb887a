"""Cross-trial signals once each trial stops at its memorisation point (issue 22, item 4).

Every configuration of a study's own sample (study seed 0; ``digits``, ``mnist1d`` and ``mnist1d-noisy`` of
``ranking_signals.py``) is trained once under today's ``neve`` arm policy (``anneal-linear-0.1``: NeVe with
``Anneal(fraction=0.1)``), in a loop of its own that also counts, per epoch, the training samples whose
predicted class in the training pass (the forward that trains on them, before the batch's update; stored by
dataset index; no label used) changed since the previous epoch. A LabelWave detector (moving average over
``k = 3`` epochs, running minimum, patience 5) watches that count; when it fires at epoch ``s`` with its
minimum at ``m``, a branch restores the weights (and optimizer state) of epoch ``m`` and anneals the LR
linearly to zero over ``max(3, ceil(m / 10))`` epochs (``Anneal``'s linear multipliers), while the main run
goes on to today's end. So one run gives three in-trial policies: ``today`` (the anneal run's final model),
``restore`` (LabelWave stop, weights of the minimum), ``restore+anneal``.

Per epoch it records the training pass's loss, accuracy, flip fraction and predictions, the test accuracy
(only to score), the LR, V, and the susceptibility to random labels (Forouzesh, Sedghi, Thiran, ICLR 2023):
the loss drop of one SGD step on a fixed batch of training inputs with uniformly random labels,
``L(w) - L(w')``, ``w'`` one step from ``w``, with the trial's own optimizer state (``susc``) and with a fixed
plain-SGD probe LR (``susc_probe``); mean over ``PROBE_BATCHES`` fixed batches, the weights put back after.
Scoring lives in ``memorization_scoring.py``. Run (one thread; each configuration cached as JSON)::

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python studies/memorization_signals.py \\
        --studies mnist1d-noisy,mnist1d,digits --out /tmp/memorization.md
"""

from __future__ import annotations

import argparse
import base64
import copy
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import memorization_scoring as ms
from memorization_report import report

from neve_tune import noise_aux
from neve_tune.studies import DataRequest, StudyDefinition, TensorData
from neve_tune.studies._trial import evaluate, trial_seed

POLICY = "anneal-linear-0.1"
PROBE_LR = 0.01
PROBE_BATCHES = 2
PROBE_SEED = 777
PRED_EPOCHS = (4, 12)


# ---------------------------------------------------------------------------- measurement


def train_pass(
    model: nn.Module, opt: torch.optim.Optimizer, data: TensorData, gen: torch.Generator, preds: torch.Tensor
) -> tuple[float, float, float | None]:
    """One epoch of SGD in the order ``TensorData.train_batches`` draws; fills ``preds`` (by dataset index) with
    the training pass's predicted classes. Returns (mean loss, accuracy, flip fraction vs the previous ``preds``;
    None when there were none)."""
    model.train()
    n = data.num_train
    before = preds.clone()
    order = torch.randperm(n, generator=gen)
    total, loss_sum, correct = 0, 0.0, 0
    for i in range(0, n, data.batch_size):
        idx = order[i : i + data.batch_size]
        x, y = data.x_train[idx], data.y_train[idx]
        opt.zero_grad(set_to_none=True)
        out = model(x)
        loss = nn.functional.cross_entropy(out, y)
        loss.backward()
        opt.step()
        p = out.detach().argmax(1)
        preds[idx] = p
        loss_sum += float(loss.detach()) * len(y)
        correct += int((p == y).sum())
        total += len(y)
    flips = None if bool((before < 0).any()) else float((before != preds).float().mean())
    return loss_sum / total, correct / total, flips


def susceptibility(
    model: nn.Module, opt: torch.optim.Optimizer, probe: list[tuple[torch.Tensor, torch.Tensor]], lr: float | None
) -> float:
    """Mean over the probe batches of L(w) - L(w') on random labels, w' one SGD step from w; ``lr=None``: with
    the trial's own optimizer (LR, momentum buffers, weight decay), else plain SGD at ``lr``. Weights, buffers
    and the optimizer's state tensors are put back in place (the optimizer object and its groups are kept)."""
    state = copy.deepcopy(model.state_dict())
    saved = {p: {k: v.clone() for k, v in st.items() if torch.is_tensor(v)} for p, st in opt.state.items()}
    model.train()
    drops = []
    for x, y in probe:
        step = opt if lr is None else torch.optim.SGD(model.parameters(), lr=lr)
        step.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        step.step()
        with torch.no_grad():
            after = float(nn.functional.cross_entropy(model(x), y))
        drops.append(float(loss.detach()) - after)
        model.load_state_dict(state)
        with torch.no_grad():
            for p, st in saved.items():
                for k, v in st.items():
                    opt.state[p][k].copy_(v)
    opt.zero_grad(set_to_none=True)
    return sum(drops) / len(drops)


@torch.no_grad()
def eval_preds(model: nn.Module, x: torch.Tensor) -> list[int]:
    was = model.training
    model.eval()
    out = torch.cat([model(xb).argmax(1) for xb in x.split(1024)]).tolist()
    model.train(was)
    return out


def _probe(data: TensorData, num_classes: int, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(PROBE_SEED)
    idx = torch.randperm(data.num_train, generator=g)[: PROBE_BATCHES * size]
    y = torch.randint(0, num_classes, (len(idx),), generator=g)
    return [(data.x_train[i], y[j]) for i, j in zip(idx.split(size), torch.arange(len(idx)).split(size), strict=True)]


def _anneal_branch(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    snap: dict[str, Any],
    data: TensorData,
    gen_state: torch.Tensor,
    m: int,
    probe: list[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[list[dict[str, Any]], nn.Module, float]:
    """Restore epoch ``m``'s weights and optimizer, then a linear cooldown of max(3, ceil(m/10)) epochs."""
    b_model = copy.deepcopy(model)
    b_model.load_state_dict(snap["model"])
    b_opt = type(opt)(b_model.parameters(), **opt.defaults)
    b_opt.load_state_dict(snap["opt"])
    gen = torch.Generator()
    gen.set_state(gen_state)
    length = max(3, math.ceil(m / 10))
    base = [g["lr"] for g in b_opt.param_groups]
    preds = torch.full((data.num_train,), -1, dtype=torch.long)
    rows = []
    for j in range(1, length + 1):
        for g, lr in zip(b_opt.param_groups, base, strict=True):
            g["lr"] = lr * (1.0 - j / (length + 1))
        loss, acc, flips = train_pass(b_model, b_opt, data, gen, preds)
        _, test = evaluate(b_model, data.eval_batches("test"), torch.device("cpu"))
        rows.append(dict(epoch=m + j, loss=loss, acc=acc, flips=flips, test=test, lr=b_opt.param_groups[0]["lr"]))
    return rows, b_model, susceptibility(b_model, b_opt, probe, PROBE_LR)


def run_config(d: StudyDefinition, config: dict[str, Any]) -> dict[str, Any]:
    """One configuration: today's anneal run with flip counts, susceptibility and the LabelWave branch."""
    rs = ms.ranking_signals()
    b = d.budget
    data = d.load_data(DataRequest(val_fraction=0.0, seed=0, batch_size=b.batch_size))
    assert isinstance(data, TensorData)
    tseed = trial_seed(0, int(config["config_id"]))
    torch.manual_seed(tseed)
    model = d.build_model(config)
    opt = torch.optim.SGD(
        model.parameters(),
        lr=float(config["lr"]),
        momentum=b.momentum,
        weight_decay=float(config.get("weight_decay", 0)),
    )
    neve = rs._controller(POLICY, model, opt, noise_aux(d.input_shape, n=b.neve.aux_samples, seed=0), d)
    gen = torch.Generator().manual_seed(tseed)
    probe = _probe(data, d.num_classes, b.batch_size)
    preds = torch.full((data.num_train,), -1, dtype=torch.long)
    rows: list[dict[str, Any]] = []
    pass_preds: list[str] = []
    out: dict[str, Any] = {"config": config, "reason": "max_t", "wave": None, "preds": {}}
    snap: dict[str, Any] | None = None
    t0 = time.perf_counter()
    for epoch in range(1, b.max_epochs + 1):
        lr_used = opt.param_groups[0]["lr"]
        loss, acc, flips = train_pass(model, opt, data, gen, preds)
        step = neve.step(loss)
        _, test = evaluate(model, data.eval_batches("test"), torch.device("cpu"))
        rows.append(
            dict(
                epoch=epoch,
                loss=loss,
                acc=acc,
                flips=flips,
                test=test,
                lr=lr_used,
                V=step.model_velocity,
                susc=susceptibility(model, opt, probe, None),
                susc_probe=susceptibility(model, opt, probe, PROBE_LR),
            )
        )
        pass_preds.append(base64.b64encode(bytes(preds.to(torch.uint8).tolist())).decode())
        if epoch in PRED_EPOCHS:
            out["preds"][str(epoch)] = eval_preds(model, data.x_train)
        if out["wave"] is None:
            m, s = ms.labelwave([r["flips"] for r in rows])
            if m == epoch:
                snap = {"model": copy.deepcopy(model.state_dict()), "opt": copy.deepcopy(opt.state_dict())}
            if s is not None and m is not None and snap is not None:
                restored = copy.deepcopy(model)
                restored.load_state_dict(snap["model"])
                out["preds"]["restored"] = eval_preds(restored, data.x_train)
                arows, b_model, probe_final = _anneal_branch(model, opt, snap, data, gen.get_state(), m, probe)
                out["preds"]["final"] = eval_preds(b_model, data.x_train)
                out["wave"] = dict(
                    min_epoch=m,
                    stop_epoch=s,
                    anneal=arows,
                    susc_probe_final=probe_final,
                    susc_probe_restored=rows[m - 1]["susc_probe"],
                )
        if step.stop_reason is not None or not math.isfinite(loss):
            out["reason"] = str(step.stop_reason) if step.stop_reason is not None else "diverged"
            break
    neve.close()
    out["preds"]["today"] = eval_preds(model, data.x_train)
    out.update(rows=rows, pass_preds=pass_preds, labels=data.y_train.tolist(), wall_s=time.perf_counter() - t0)
    return out


def trials(name: str, cache: Path) -> list[dict[str, Any]]:
    """Every configuration of ``name`` (each cached as JSON as soon as it is done); predictions decoded."""
    rs = ms.ranking_signals()
    d = rs.study(name)
    out = []
    for config in d.configs(seed=0):
        path = cache / name / f"{config['config_id']}.json"
        if not path.exists():
            run = run_config(d, config)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(run))
            w = run["wave"]
            fired = w and (w["min_epoch"], w["stop_epoch"], w["anneal"][-1]["test"])
            print(
                f"{name} {config['config_id']}: {run['reason']} at {len(run['rows'])}, test "
                f"{run['rows'][-1]['test']:.3f}; wave {fired}"
                f" ({run['wall_s']:.0f} s)",
                flush=True,
            )
        run = json.loads(path.read_text())
        run["pass_preds"] = [list(base64.b64decode(p)) for p in run["pass_preds"]]
        out.append(run)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--studies", default="mnist1d-noisy,mnist1d,digits")
    p.add_argument("--cache", default="/tmp/h8_cache")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    lines: list[str] = []
    for name in args.studies.split(","):
        lines += report(name, trials(name, Path(args.cache)))
    text = "\n".join(lines)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
