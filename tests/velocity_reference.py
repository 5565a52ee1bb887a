"""An independent float64 implementation of SPEC §1, written from the formulas (no package code).

It keeps full float64 copies of every response and computes cosines directly; slow and memory-hungry
on purpose, so it shares nothing with the optimised implementation it checks.
"""

from __future__ import annotations

import math

import torch
from torch import nn

CHANNELS_LAST = (nn.Linear, nn.LayerNorm)


def capture_responses(model: nn.Module, names: list[str], batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """name -> (neurons, all outputs) float64 matrix, from an eval/no_grad pass over the batches."""
    modules = dict(model.named_modules())
    parts: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = []
    for name in names:
        module = modules[name]
        dim = -1 if isinstance(module, CHANNELS_LAST) else 1

        def hook(mod, inputs, out, name=name, dim=dim):
            y = out.detach().to(torch.float64).movedim(dim, 0)
            parts[name].append(y.reshape(y.shape[0], -1).clone())

        handles.append(module.register_forward_hook(hook))
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                model(batch)
    finally:
        for h in handles:
            h.remove()
        for m, t in modes:
            m.training = t
    return {n: torch.cat(p, dim=1) for n, p in parts.items()}


class ReferenceVelocity:
    """v_i^t = (1 - cos(y_i^t, y_i^{t-1})) - mu * v_i^{t-1}; V = mean |v|; D = mean_modules mean (dv)^2."""

    def __init__(self, momentum: float = 0.5) -> None:
        self.mu = momentum
        self.prev: dict[str, torch.Tensor] | None = None
        self.v: dict[str, torch.Tensor] | None = None
        self.t = 0

    @staticmethod
    def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        rho = torch.empty(a.shape[0], dtype=torch.float64)
        for i in range(a.shape[0]):
            x, y = a[i], b[i]
            if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
                rho[i] = math.nan
                continue
            nx, ny = x.norm(), y.norm()
            if nx == 0 and ny == 0:
                rho[i] = 1.0
            elif nx == 0 or ny == 0:
                rho[i] = 0.0
            else:
                rho[i] = float(torch.clamp(x @ y / (nx * ny), -1.0, 1.0))
        return rho

    def update(self, responses: dict[str, torch.Tensor]):
        """None for the baseline, else (V, D or None, {name: per-neuron v})."""
        if self.prev is None:
            self.prev = responses
            return None
        v_old = self.v or {n: torch.zeros(r.shape[0], dtype=torch.float64) for n, r in responses.items()}
        v_new = {n: (1 - self.cosine(r, self.prev[n])) - self.mu * v_old[n] for n, r in responses.items()}
        V = float(torch.cat([v.abs() for v in v_new.values()]).mean())
        D = None
        if self.t >= 1:
            D = float(torch.stack([((v_new[n] - v_old[n]) ** 2).mean() for n in v_new]).mean())
        self.prev, self.v = responses, v_new
        self.t += 1
        return V, D, v_new
