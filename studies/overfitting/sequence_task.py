"""A char-level sequence classifier with 20% flipped labels, for ``plain_loop.py`` (task ``gru-noisy``/``gru``).

8,000 generated training strings of 32 characters over a 20-letter alphabet, 5 classes: a sample of class
k holds its class's 3-letter motif with probability 0.85 and a motif of another class with probability
0.5, at random places; the rest is random letters. Embedding(20, 32) + bidirectional GRU(64) + linear
head, AdamW lr 3e-3, batches of 64. The test split (2,000 strings) keeps its true labels.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from neve_tune import token_aux

VOCAB, LENGTH, CLASSES, MOTIF = 20, 32, 5, 3


def make_strings(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    motifs = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(7))[: CLASSES * MOTIF].view(CLASSES, MOTIF)
    x = torch.randint(0, VOCAB, (n, LENGTH), generator=g)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    for i in range(n):
        if float(torch.rand((), generator=g)) < 0.85:
            at = int(torch.randint(0, LENGTH - MOTIF, (), generator=g))
            x[i, at : at + MOTIF] = motifs[y[i]]
        if float(torch.rand((), generator=g)) < 0.5:
            other = (int(y[i]) + int(torch.randint(1, CLASSES, (), generator=g))) % CLASSES
            at = int(torch.randint(0, LENGTH - MOTIF, (), generator=g))
            x[i, at : at + MOTIF] = motifs[other]
    return x, y


class GRUClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 32)
        self.gru = nn.GRU(32, 64, batch_first=True, bidirectional=True)
        self.head = nn.Linear(128, CLASSES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(self.embed(ids))
        return self.head(out.mean(dim=1))


def gru_task(noise: float, seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(1000 + seed)
    x, y = make_strings(8000, g)
    x_te, y_te = make_strings(2000, g)
    flip = torch.rand(len(y), generator=g) < noise
    y = y.clone()
    y[flip] = (y[flip] + torch.randint(1, CLASSES, (int(flip.sum()),), generator=g)) % CLASSES
    torch.manual_seed(seed)
    model = GRUClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    aux = token_aux(VOCAB, LENGTH, n=100, seed=seed)
    return dict(model=model, opt=opt, x=x, y=y, x_te=x_te, y_te=y_te, aux=aux, batch=64, shuffle=True, seed=seed)
