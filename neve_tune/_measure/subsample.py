"""Bounded-memory mode (``max_positions``): each neuron keeps a fixed random subset of its positions.

For an output ``(N, C, *spatial)`` (neurons on dim 1) or ``(N, *seq, C)`` (neurons last) with more than
``max_positions`` positions per sample, only ``max_positions`` of them, chosen once per (module, call) and
kept for the monitor's life, enter the snapshot and the sums. Velocities are then estimates of the exact
ones; the snapshot shrinks by the ratio of kept to total positions. Outputs with no position dims (``(N,
C)``) are kept whole.

The choice draws from the sampler's own ``torch.Generator`` seeded from the monitor's seed, the module's
name and the call, so it is reproducible and the global RNG is untouched.
"""

from __future__ import annotations

import zlib

import torch
from torch import Tensor

from .layer import Layer


class PositionSampler:
    """Picks each (module, call)'s kept positions once, and selects them from every output.

    The chosen indices live in ``layer.sample_index`` (one entry per call), so they are saved and restored
    with the monitor's state.

    Args:
        max_positions: positions kept per neuron and aux sample (>= 1).
        seed: seed of the choice.
    """

    def __init__(self, max_positions: int, seed: int) -> None:
        self.max_positions = max_positions
        self.seed = seed

    def select(self, layer: Layer, call: int, out: Tensor) -> Tensor:
        """``out`` restricted to the kept positions, flattened to ``(N, C, P)`` or ``(N, P, C)``; outputs
        with at most ``max_positions`` positions are only flattened, 2-D outputs are returned as they are."""
        if out.ndim <= 2:
            return out
        dim = layer.dim % out.ndim
        # (N, C, *spatial) -> (N, C, P) or (N, *seq, C) -> (N, P, C)
        flat = out.flatten(2) if dim == 1 else out.flatten(1, -2)
        pos_dim = 2 if dim == 1 else 1
        n_pos = flat.shape[pos_dim]
        if n_pos <= self.max_positions:
            return flat
        while len(layer.sample_index) <= call:
            layer.sample_index.append(None)
        index = layer.sample_index[call]
        if index is None:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(layer.name.encode()) + call)
            index = torch.randperm(n_pos, generator=gen)[: self.max_positions].sort().values.to(out.device)
            layer.sample_index[call] = index
        return flat.index_select(pos_dim, index)
