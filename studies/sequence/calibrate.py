"""Calibrate the ListOps study: one plain AdamW run (cosine schedule to 0 at --epochs, or NeVe with --neve).

    PYTHONPATH=. OMP_NUM_THREADS=1 python studies/sequence/calibrate.py --lr 1e-3 --wd 0.01 --width 64 --epochs 30

Prints train loss / accuracy, test accuracy and seconds per epoch. Not a study: a sanity check of the
data sizes, the model and the LR range before the study's budget is fixed.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from neve_tune import Anneal, NeVe, token_aux
from neve_tune.studies.builtin import listops as lo


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--wd", type=float, default=0.01)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--patience", type=int, default=10)
    p.add_argument("--threshold", type=float, default=1e-3, help="NeVe stop_threshold")
    p.add_argument("--neve", action="store_true", help="NeVe with Anneal(max_epochs=epochs) instead of cosine")
    p.add_argument("--max-depth", type=int, default=lo.MAX_DEPTH)
    p.add_argument("--max-args", type=int, default=lo.MAX_ARGS)
    p.add_argument("--branch-p", type=float, default=lo.BRANCH_P)
    p.add_argument("--max-len", type=int, default=lo.MAX_LEN)
    p.add_argument("--train", type=int, default=lo.NUM_TRAIN)
    p.add_argument("--test", type=int, default=lo.NUM_TEST)
    a = p.parse_args()

    gen = dict(max_len=a.max_len, max_depth=a.max_depth, max_args=a.max_args, branch_p=a.branch_p)
    x, y = lo.generate_listops(a.train, seed=lo.DATA_SEED, **gen)
    seen = frozenset(tuple(int(t) for t in row if t) for row in x)
    xt, yt = lo.generate_listops(a.test, seed=lo.DATA_SEED + 1, exclude=seen, **gen)
    print(f"mean length {(x != 0).sum(1).float().mean():.1f}, max {(x != 0).sum(1).max()}")
    torch.manual_seed(a.seed)
    model = lo.ListOpsGRU(width=a.width)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=a.wd)
    neve = sched = None
    if a.neve:
        aux = token_aux(lo.VOCAB_SIZE, a.max_len, n=100, seed=a.seed, special_ids=[lo.PAD])
        neve = NeVe(
            model, opt, aux, patience=a.patience, stop_threshold=a.threshold, anneal=Anneal(max_epochs=a.epochs)
        )
    else:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=a.epochs)
    g = torch.Generator().manual_seed(a.seed)
    for epoch in range(1, a.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        order = torch.randperm(len(y), generator=g)
        tot = correct = 0
        loss_sum = 0.0
        for i in range(0, len(y), a.batch):
            idx = order[i : i + a.batch]
            out = model(x[idx])
            loss = nn.functional.cross_entropy(out, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((out.argmax(1) == y[idx]).sum())
            tot += len(idx)
        train_loss = loss_sum / tot
        extra = ""
        if neve is not None:
            step = neve.step(train_loss)
            extra = f" v={step.model_velocity:.4f} stop={step.stop_reason}"
        elif sched is not None:
            sched.step()
        dt = time.perf_counter() - t0
        model.eval()
        with torch.no_grad():
            acc = float((model(xt).argmax(1) == yt).float().mean())
        lr = opt.param_groups[0]["lr"]
        print(
            f"ep {epoch:2d} loss {train_loss:.3f} train {correct / tot:.3f} test {acc:.3f} lr {lr:.2e} "
            f"{dt:.2f}s{extra}",
            flush=True,
        )
        if neve is not None and step.stop_reason is not None:
            break


if __name__ == "__main__":
    main()
