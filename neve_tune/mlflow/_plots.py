"""Per-trial velocity plots: the model-velocity curve and the per-layer velocity heatmap.

Figures are built with ``matplotlib.figure.Figure`` on the Agg canvas (no pyplot global state, safe in
Ray worker threads). Non-finite values (a diverged epoch) are drawn as gaps and marked in red.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: Hold it while building and saving a figure: matplotlib (e.g. its mathtext parser) is not thread-safe.
PLOT_LOCK = threading.RLock()

#: Metric-name prefix of the per-layer velocities (``layer_velocity/<module name>``).
LAYER_PREFIX = "layer_velocity/"
#: Where the model velocity is logged: by NeVe (it acts on it), or by a monitor only (baseline arms).
VELOCITY_KEYS = ("neve/model_velocity", "monitor/model_velocity")


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "matplotlib was not found - please install with `pip install neve_tune[studies]` (or `pip install "
            "matplotlib`) to draw velocity plots."
        ) from err


@dataclass
class VelocityHistory:
    """Per-epoch velocity record of one trial, for its plots.

    ``append`` once per epoch. ``layers`` maps a module name to one value per recorded epoch (NaN when
    that layer was not measured at that epoch).

    NaN policy: ``None`` becomes NaN; non-finite velocities are kept, and drawn as red "diverged" markers.
    State: plain lists (``VelocityHistory(**history.__dict__)`` rebuilds it, e.g. from a checkpoint).
    """

    epochs: list[int] = field(default_factory=list)
    model_velocity: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    lr_decayed: list[bool] = field(default_factory=list)
    layers: dict[str, list[float]] = field(default_factory=dict)

    def append(
        self,
        epoch: int,
        model_velocity: float | None,
        lr: float | None = None,
        *,
        lr_decayed: bool = False,
        layer_velocity: Mapping[str, float] | None = None,
    ) -> None:
        """Record one epoch (``None`` values become NaN)."""
        n = len(self.epochs)
        self.epochs.append(int(epoch))
        self.model_velocity.append(math.nan if model_velocity is None else float(model_velocity))
        self.lr.append(math.nan if lr is None else float(lr))
        self.lr_decayed.append(bool(lr_decayed))
        for name, value in (layer_velocity or {}).items():
            self.layers.setdefault(name, [math.nan] * n).append(float(value))
        for values in self.layers.values():
            if len(values) < n + 1:
                values.append(math.nan)

    def __len__(self) -> int:
        return len(self.epochs)

    @property
    def decay_epochs(self) -> list[int]:
        """Epochs at which the learning rate was lowered."""
        return [e for e, d in zip(self.epochs, self.lr_decayed, strict=True) if d]

    @classmethod
    def from_metrics(
        cls,
        history: Mapping[str, Sequence[tuple[int, float]]],
        *,
        velocity_keys: Sequence[str] = VELOCITY_KEYS,
        lr_key: str = "lr",
        decay_key: str = "neve/lr_decayed",
    ) -> VelocityHistory:
        """Rebuild from metric histories ``key -> [(step, value), ...]`` (e.g. read back from MLflow).

        The model velocity is the first of ``velocity_keys`` present. Without ``decay_key`` (a fixed LR
        schedule) no decay markers are drawn; the LR curve shows the schedule.
        """
        steps: set[int] = set()
        for points in history.values():
            steps.update(int(s) for s, _ in points)
        by_key = {k: {int(s): float(v) for s, v in points} for k, points in history.items()}
        out = cls()
        velocity = next((by_key[k] for k in velocity_keys if k in by_key), {})
        lrs = by_key.get(lr_key, {})
        decays = by_key.get(decay_key)
        layer_keys = sorted(k for k in by_key if k.startswith(LAYER_PREFIX))
        for step in sorted(steps):
            if step not in velocity and not any(step in by_key[k] for k in layer_keys):
                continue
            out.append(
                step,
                velocity.get(step),
                lrs.get(step),
                lr_decayed=bool(decays.get(step, 0.0)) if decays is not None else False,
                layer_velocity={k[len(LAYER_PREFIX) :]: by_key[k][step] for k in layer_keys if step in by_key[k]},
            )
        return out


def plot_velocity_curve(
    history: VelocityHistory,
    *,
    stop_epoch: int | None = None,
    stop_reason: str | None = None,
    stop_threshold: float | None = None,
    title: str | None = None,
) -> Figure:
    """Model velocity per epoch (log scale) with the LR on a second axis, LR-decay and stop markers."""
    _require_matplotlib()
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    epochs = history.epochs
    finite = [(e, v) for e, v in zip(epochs, history.model_velocity, strict=True) if math.isfinite(v) and v > 0]
    if finite:
        ax.plot([e for e, _ in finite], [v for _, v in finite], "o-", ms=3, color="C0", label="model velocity V")
        ax.set_yscale("log")
    bad = [e for e, v in zip(epochs, history.model_velocity, strict=True) if not math.isfinite(v)]
    for i, e in enumerate(bad):
        ax.axvline(e, color="red", lw=1.5, label="non-finite V (diverged)" if i == 0 else None)
    if stop_threshold is not None:
        ax.axhline(stop_threshold, color="grey", ls=":", lw=1, label=f"stop threshold {stop_threshold:g}")
    for i, e in enumerate(history.decay_epochs):
        ax.axvline(e, color="C2", ls="--", lw=1, label="LR decay" if i == 0 else None)
    if stop_epoch is not None:
        ax.axvline(stop_epoch, color="C3", lw=2, alpha=0.7, label=f"stop ({stop_reason or 'stopped'}) @ {stop_epoch}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("model velocity")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if any(math.isfinite(x) for x in history.lr):
        ax2 = ax.twinx()
        ax2.step(epochs, history.lr, where="post", color="C1", alpha=0.6, label="learning rate")
        ax2.set_ylabel("learning rate", color="C1")
        ax2.tick_params(axis="y", colors="C1")
        h2, l2 = ax2.get_legend_handles_labels()
    else:
        h2, l2 = [], []
    h1, l1 = ax.get_legend_handles_labels()
    if h1 or h2:
        ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper right")
    ax.set_title(title or "Neural velocity")
    fig.tight_layout()
    return fig


def plot_layer_heatmap(history: VelocityHistory, *, title: str | None = None) -> Figure:
    """Per-layer velocity (mean ``|v_i|`` of each hooked module) per epoch, log colour scale."""
    _require_matplotlib()
    import numpy as np
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    names = list(history.layers)
    fig = Figure(figsize=(max(5.0, 0.25 * len(history) + 3), max(3.0, 0.3 * len(names) + 1.5)), dpi=100)
    ax = fig.add_subplot()
    if not names or not len(history):
        ax.text(0.5, 0.5, "no per-layer velocity recorded", ha="center", va="center")
        ax.set_axis_off()
        return fig
    data = np.array([history.layers[n] for n in names], dtype=float)
    masked = np.ma.masked_where(~np.isfinite(data) | (data <= 0), data)
    positive = masked.compressed()
    norm: Any = LogNorm(vmin=float(positive.min()), vmax=float(positive.max())) if positive.size else None
    image = ax.imshow(masked, aspect="auto", interpolation="nearest", cmap="viridis", norm=norm)
    ax.set_yticks(range(len(names)), labels=names, fontsize=7)
    step = max(1, len(history) // 15)
    ticks = list(range(0, len(history), step))
    ax.set_xticks(ticks, labels=[str(history.epochs[i]) for i in ticks], fontsize=7)
    ax.set_xlabel("epoch")
    fig.colorbar(image, ax=ax, label="layer velocity (mean |v|)")
    ax.set_title(title or "Per-layer velocity")
    fig.tight_layout()
    return fig
