"""The fused CPU comparison kernel (``compare.c``): built once per machine, loaded with ctypes.

VelocityMonitor's CPU hot path reads each hooked output and its stored previous response once and
accumulates both per-neuron sums in double (see ``compare.c``). PyTorch has no single op for that, and
the eager equivalent makes five to seven passes over memory. The C source ships with the package and is
compiled on first use with the machine's C compiler (``$CC``, else ``cc``/``gcc``/``clang``) into a
per-user cache, ``$NEVE_TUNE_CACHE_DIR`` or ``~/.cache/neve_tune``. It links the OpenMP runtime that
PyTorch has already loaded, so it runs on PyTorch's own threads.

When there is no compiler, or ``NEVE_TUNE_KERNEL=0`` is set, :func:`get` returns ``None`` and the monitor
computes the same numbers with PyTorch ops (slower, never wrong). The reason is logged once at INFO.
Tests choose the path with :mod:`neve_tune.testing` (built on :func:`forced` and :func:`reloading`).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

ABI_VERSION = 5
SOURCE = Path(__file__).with_name("compare.c")
_lock = threading.Lock()
_loaded: tuple[bool, Kernel | None] = (False, None)
_forced: list[bool] = []  # innermost last: see forced()


def memory_order(t: Tensor) -> tuple[int, ...] | None:
    """The dims of ``t`` from outermost to innermost in memory, if ``t`` is dense (``t.permute(order)`` is
    contiguous: contiguous, channels_last, any permuted layout); ``None`` for gapped or overlapping views."""
    if t.is_contiguous():
        return tuple(range(t.ndim))
    return _dense_order(tuple(t.shape), t.stride())


@functools.lru_cache(maxsize=256)
def _dense_order(shape: tuple[int, ...], stride: tuple[int, ...]) -> tuple[int, ...] | None:
    """Cached per (shape, strides): the hot path asks for the same few layouts every measurement."""
    order = tuple(sorted(range(len(shape)), key=lambda d: -stride[d]))
    expected = 1
    for d in reversed(order):  # innermost first: each stride must be the product of the sizes inside it
        if shape[d] != 1 and stride[d] != expected:
            return None
        expected *= shape[d]
    return order


class Kernel:
    """ctypes wrapper of the compiled library: :meth:`compare` on dense CPU float tensors."""

    def __init__(self, lib: ctypes.CDLL, path: Path) -> None:
        self.path = path
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        args = [ptr, ptr, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ctypes.c_double, ptr, i64]
        args += [ptr, ptr, ctypes.c_int]
        self._fns: dict[torch.dtype, Any] = {}
        for dtype, name in ((torch.float32, "neve_compare_f32"), (torch.float64, "neve_compare_f64")):
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, ctypes.c_int
            self._fns[dtype] = fn

    def supports(self, out: Tensor, prev: Tensor) -> bool:
        """Whether :meth:`compare` can take this pair: CPU, float32/64, same dtype, shape and strides, and
        dense (contiguous or any permutation of it, such as channels_last)."""
        return (
            out.device.type == "cpu"
            and out.dtype in self._fns
            and prev.dtype == out.dtype
            and prev.shape == out.shape
            and prev.stride() == out.stride()
            and (out.is_contiguous() or memory_order(out) is not None)
        )

    def compare(
        self,
        out: Tensor,
        prev: Tensor,
        dim: int,
        scale: Tensor,
        cur_sq: Tensor,
        diff_sq: Tensor,
        bn: nn.Module | None = None,
        affine: Tensor | None = None,
        bn_cur_sq: Tensor | None = None,
        bn_diff_sq: Tensor | None = None,
    ) -> None:
        """Per neuron: ``cur_sq += sum out^2``, ``diff_sq += sum (out - scale*prev)^2``; then ``prev <- out``.

        With ``bn``, an eval-mode BatchNorm that takes ``out`` as its input (parameters in ``out``'s dtype),
        also its sums: its outputs are ``alpha*out + beta`` now and ``alpha'*prev + beta'`` before, with
        alpha, beta written to rows 0-1 of ``affine`` (4 x neurons, float64; rows 2-3 hold alpha', beta'):
        ``bn_cur_sq += sum y^2`` and ``bn_diff_sq += sum (y - y')^2``. The per-neuron vectors are contiguous
        CPU float64 tensors.
        """
        if not out.is_contiguous():  # a permuted dense layout: walk it in memory order, neurons where they lie
            order = memory_order(out)
            assert order is not None and prev.stride() == out.stride()
            out, prev, dim = out.permute(order), prev.permute(order), order.index(dim)
        shape = out.shape
        outer = 1
        for size in shape[:dim]:
            outer *= size
        inner = 1
        for size in shape[dim + 1 :]:
            inner *= size
        bn_args: list[Any] = [None, None, None, None, 0.0, None, 0, None, None]
        if bn is not None and affine is not None and bn_cur_sq is not None and bn_diff_sq is not None:
            assert isinstance(bn, nn.modules.batchnorm._BatchNorm)
            mean, var = bn.running_mean, bn.running_var
            assert isinstance(mean, Tensor) and isinstance(var, Tensor)
            weight, bias = bn.weight, bn.bias
            bn_args = [
                mean.data_ptr(),
                var.data_ptr(),
                weight.data_ptr() if isinstance(weight, Tensor) else None,
                bias.data_ptr() if isinstance(bias, Tensor) else None,
                float(bn.eps),
                affine.data_ptr(),
                affine.stride(0),
                bn_cur_sq.data_ptr(),
                bn_diff_sq.data_ptr(),
            ]
        status = self._fns[out.dtype](
            out.data_ptr(),
            prev.data_ptr(),
            outer,
            shape[dim],
            inner,
            scale.data_ptr(),
            cur_sq.data_ptr(),
            diff_sq.data_ptr(),
            *bn_args,
            torch.get_num_threads(),
        )
        if status != 0:
            raise MemoryError("neve_tune's comparison kernel could not allocate its per-neuron partial sums.")


def get() -> Kernel | None:
    """The compiled kernel, building it on first use; ``None`` when disabled or it cannot be built."""
    global _loaded
    if _forced and not _forced[-1]:
        return None
    if _loaded[0]:
        return _loaded[1]
    with _lock:
        if not _loaded[0]:
            kernel = None
            if os.environ.get("NEVE_TUNE_KERNEL", "1").strip().lower() in ("0", "false", "no", "off"):
                log.info("NEVE_TUNE_KERNEL=0: velocity comparisons use PyTorch ops.")
            else:
                try:
                    kernel = _load()
                except Exception as exc:  # any build or load failure falls back to PyTorch ops
                    log.info(
                        "neve_tune could not build its C comparison kernel (%s); velocity measurements use"
                        " PyTorch ops instead: same numbers, slower. Install a C compiler with OpenMP (gcc) to"
                        " get the fast path.",
                        exc,
                    )
            _loaded = (True, kernel)
    return _loaded[1]


@contextlib.contextmanager
def forced(enabled: bool) -> Iterator[None]:
    """Inside the block, :func:`get` returns ``None`` (``enabled=False``: PyTorch ops, as without a
    compiler) or behaves as usual (``enabled=True``, also inside an outer disabling block). Process-wide,
    for tests and benchmarks; blocks nest."""
    _forced.append(enabled)
    try:
        yield
    finally:
        _forced.pop()


@contextlib.contextmanager
def reloading() -> Iterator[None]:
    """Inside the block, the next :func:`get` builds or loads the kernel again, reading ``$CC``,
    ``$NEVE_TUNE_KERNEL`` and the cache folder then; afterwards the kernel loaded before is back."""
    global _loaded
    with _lock:
        saved, _loaded = _loaded, (False, None)
    try:
        yield
    finally:
        with _lock:
            _loaded = saved


def cache_dir() -> Path:
    """Where built kernels are kept: ``$NEVE_TUNE_CACHE_DIR``, else ``$XDG_CACHE_HOME/neve_tune``."""
    if os.environ.get("NEVE_TUNE_CACHE_DIR"):
        return Path(os.environ["NEVE_TUNE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "neve_tune"


def _cpu_signature() -> str:
    """Tells CPUs apart, since the library is built with -march=native (shared home directories)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _compiler() -> str:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name) or name
    raise RuntimeError("no C compiler found (set $CC, or install gcc)")


FLAG_SETS = (
    ["-O3", "-march=native", "-fopenmp"],
    ["-O3", "-fopenmp"],
)


def _load() -> Kernel:
    compiler = _compiler()
    source = SOURCE.read_bytes()
    errors = []
    for flags in FLAG_SETS:
        key = hashlib.sha256(
            b"\0".join([source, compiler.encode(), " ".join(flags).encode(), _cpu_signature().encode()])
        ).hexdigest()[:16]
        path = cache_dir() / f"compare-{ABI_VERSION}-{key}.so"
        try:
            if not path.exists():
                _build(compiler, flags, path)
            lib = ctypes.CDLL(str(path))
            if lib.neve_abi_version() != ABI_VERSION:
                raise RuntimeError(f"{path} has ABI {lib.neve_abi_version()}, expected {ABI_VERSION}")
            return Kernel(lib, path)
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            errors.append(f"{' '.join(flags)}: {exc}")
    raise RuntimeError("; ".join(errors))


def _build(compiler: str, flags: list[str], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Build under a unique name, then rename: concurrent processes (Ray trials) never see half a file.
    fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        cmd = [compiler, *flags, "-shared", "-fPIC", "-std=c99", str(SOURCE), "-o", tmp, "-lm"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed: {proc.stderr.strip()[-400:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
