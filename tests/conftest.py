"""Fixtures shared by the velocity and kernel tests: which way VelocityMonitor computes on CPU."""

from __future__ import annotations

import shutil

import pytest

from neve_tune import _kernel


def _has_compiler() -> bool:
    return any(shutil.which(cc) for cc in ("cc", "gcc", "clang"))


@pytest.fixture
def kernel() -> _kernel.Kernel:
    """The compiled kernel; skips where the machine has no C compiler, fails where one exists but the build did not."""
    if not _has_compiler():
        pytest.skip("no C compiler on this machine: only the PyTorch-ops path can run")
    k = _kernel.get()
    assert k is not None, "a C compiler exists but neve_tune's kernel did not build; see the INFO log"
    return k


@pytest.fixture(params=["kernel", "torch_ops"])
def compute_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test on both ways of computing: the compiled C kernel (CPU fast path) and PyTorch ops."""
    if request.param == "torch_ops":
        monkeypatch.setattr(_kernel, "_loaded", (True, None))
    elif not _has_compiler():
        pytest.skip("no C compiler on this machine: only the PyTorch-ops path can run")
    elif _kernel.get() is None:
        pytest.fail("a C compiler exists but neve_tune's kernel did not build; see its INFO log line")
    return request.param
