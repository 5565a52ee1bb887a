"""Test support: which way :class:`~neve_tune.VelocityMonitor` computes on CPU, and reloading the kernel.

On CPU the monitor compares float32/float64 outputs with a compiled C kernel where one can be built, and
with PyTorch ops otherwise (same numbers, slower; see ``neve_tune._measure.kernel``). Tests and benchmarks that
must run one path or the other, or that exercise the kernel's build, use these context managers instead of
touching the package's internals. They act process-wide (not per thread) and nest.

Example:
    >>> import torch
    >>> from neve_tune import VelocityMonitor
    >>> from neve_tune.testing import compute_path
    >>> monitor = VelocityMonitor(torch.nn.Linear(4, 2), torch.randn(8, 4))
    >>> with compute_path("torch_ops"):  # as on a machine without a C compiler
    ...     monitor.measure()
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

from ._measure import kernel as _kernel

#: The two ways of computing on CPU.
ComputePath = Literal["kernel", "torch_ops"]

__all__ = ["ComputePath", "compute_path", "reloaded_kernel"]


@contextlib.contextmanager
def compute_path(path: ComputePath) -> Iterator[None]:
    """Inside the block, CPU measurements use ``path``: ``"torch_ops"`` (as without a C compiler, or with
    ``NEVE_TUNE_KERNEL=0``) or ``"kernel"`` (the compiled kernel, also inside an outer ``"torch_ops"``
    block).

    The path is chosen when :meth:`~neve_tune.VelocityMonitor.measure` (and ``load_state_dict``) runs, so a
    monitor built outside the block measures inside it on the block's path.

    Raises:
        ValueError: ``path`` is neither of the two.
        RuntimeError: ``"kernel"`` where the kernel is unavailable (no C compiler, a failed build, or
            ``NEVE_TUNE_KERNEL=0``).
    """
    if path not in ("kernel", "torch_ops"):
        raise ValueError(f"path must be 'kernel' or 'torch_ops', but got {path=}.")
    with _kernel.forced(path == "kernel"):
        if path == "kernel" and _kernel.get() is None:
            raise RuntimeError(
                "compute_path('kernel'): neve_tune's C comparison kernel is not available here (no C compiler,"
                " a failed build, or NEVE_TUNE_KERNEL=0); see the INFO log of neve_tune._measure.kernel."
            )
        yield


@contextlib.contextmanager
def reloaded_kernel() -> Iterator[None]:
    """Inside the block, the next kernel lookup builds or loads the kernel again, reading ``$CC``,
    ``$NEVE_TUNE_KERNEL`` and ``$NEVE_TUNE_CACHE_DIR`` at that moment; after it, the kernel loaded before
    is back."""
    with _kernel.reloading():
        yield
