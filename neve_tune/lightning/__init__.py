"""NeVe for PyTorch Lightning: a ``Callback`` that measures, decays the LR and stops the ``Trainer``.

* :class:`NeVeCallback` builds one ``neve_tune.NeVe`` at the start of the fit, measures after every
  training epoch (with the epoch's training loss), decays the LR of the Trainer's optimizers, stops the
  fit on converged/stalled/collapsed/diverged, logs ``neve/*`` and keeps its state in checkpoints;
* :class:`JointOptimizer` is the view of several optimizers that one NeVe decays together.

Example:
    >>> import lightning.pytorch as pl  # doctest: +SKIP
    >>> from neve_tune import noise_aux
    >>> from neve_tune.lightning import NeVeCallback
    >>> neve = NeVeCallback(noise_aux((1, 8, 8), n=64))  # doctest: +SKIP
    >>> pl.Trainer(max_epochs=100, callbacks=[neve]).fit(module, loader)  # doctest: +SKIP
    >>> neve.stop_reason  # doctest: +SKIP
    <StopReason.CONVERGED: 'converged'>
"""

from __future__ import annotations

try:
    import lightning.pytorch  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised only without lightning installed
    raise ImportError(
        "neve_tune.lightning needs PyTorch Lightning (the `lightning` package): pip install 'neve_tune[lightning]'"
    ) from err

from ._callback import AUTO, NeVeCallback
from ._optimizers import JointOptimizer

__all__ = ["AUTO", "JointOptimizer", "NeVeCallback"]
