"""The file of a run's unsent MLflow operations: JSON lines (a header, then one operation a line).

A file is always written whole and atomically (a temporary file in the same folder, then renamed over the
old one), so a process killed while writing it leaves the previous version, never half a file. Artifacts
to upload are copied into a folder next to it (``<file>.artifacts/<n>/<name>``, keeping the file's own
name, which is the artifact's name in MLflow), once each.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

#: The key of the first line of an unsent-operations file (its value: the format version, 1).
UNSENT_FORMAT = "neve_tune_unsent"


def artifacts_folder(path: Path) -> Path:
    """Where the artifacts of the file ``path`` are kept."""
    return path.with_suffix(".artifacts")


def keep_artifact(path: Path, local_path: str, number: int) -> str:
    """Copy ``local_path`` next to the file ``path`` (once) and return the copy's path.

    A file already there is returned as it is; a missing source is returned unchanged (its upload will
    fail and say so, as it would have without the outage).
    """
    folder = artifacts_folder(path)
    src = Path(local_path)
    if src.parent.parent == folder or not src.exists():
        return local_path
    dst = folder / f"{number:05d}" / src.name
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return str(dst)


def json_float(v: float) -> float | str:
    """A metric value as JSON: finite as it is, NaN and infinities as ``'nan'``, ``'inf'``, ``'-inf'``."""
    return v if math.isfinite(v) else repr(v)


def write_unsent(
    path: Path, header: Mapping[str, Any], ops: Iterable[tuple[str, Mapping[str, Any], str | None]]
) -> Path:
    """Write ``header`` and the operations ``(kind, data, handler module or None)`` to ``path`` atomically.

    NaN policy: non-finite metric values are written as ``'nan'``, ``'inf'`` or ``'-inf'`` (JSON has no
    such numbers); the replay reads them back as floats. Returns ``path``.
    """
    lines = [json.dumps(dict(header))]
    for kind, data, module in ops:
        data = dict(data)
        if kind == "batch" and "metrics" in data:
            data["metrics"] = [[k, json_float(v), ts, s] for k, v, ts, s in data["metrics"]]
        entry: dict[str, Any] = {"kind": kind, "data": data}
        if module is not None:
            entry["module"] = module
        lines.append(json.dumps(entry))
    return write_lines(path, lines)


def write_lines(path: Path, lines: Iterable[str]) -> Path:
    """Write ``lines`` to ``path`` whole and atomically (the folder is created); returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def remove_unsent(path: Path) -> None:
    """Delete the file ``path`` and its artifacts folder (everything in it was sent)."""
    path.unlink(missing_ok=True)
    shutil.rmtree(artifacts_folder(path), ignore_errors=True)
