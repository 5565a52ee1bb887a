"""Fixtures shared by the velocity and kernel tests: which way VelocityMonitor computes on CPU."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from neve_tune._measure import kernel as _kernel
from neve_tune.testing import compute_path as use_compute_path


def _has_compiler() -> bool:
    return any(shutil.which(cc) for cc in ("cc", "gcc", "clang"))


def _require_kernel() -> _kernel.Kernel:
    if not _has_compiler():
        pytest.skip("no C compiler on this machine: only the PyTorch-ops path can run")
    k = _kernel.get()
    assert k is not None, "a C compiler exists but neve_tune's kernel did not build; see the INFO log"
    return k


@pytest.fixture
def kernel() -> _kernel.Kernel:
    """The compiled kernel; skips where the machine has no C compiler, fails where one exists but the build did not."""
    return _require_kernel()


@pytest.fixture(params=["kernel", "torch_ops"])
def compute_path(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run a test on both ways of computing: the compiled C kernel (CPU fast path) and PyTorch ops."""
    if request.param == "kernel":
        _require_kernel()
    with use_compute_path(request.param):
        yield request.param
