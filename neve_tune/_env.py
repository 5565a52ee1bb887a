"""Environment variables set for a while and put back afterwards: :func:`scoped_env` (standard library only)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping


@contextlib.contextmanager
def scoped_env(values: Mapping[str, str], *, override: bool = True) -> Iterator[None]:
    """Set ``values`` in ``os.environ`` while the block runs, then put back what was there (or unset them).

    With ``override=False`` a variable the caller set already keeps its value (as ``os.environ.setdefault``).
    The environment is the process's: use it where no other thread depends on these variables meanwhile.
    """
    saved = {name: os.environ.get(name) for name in values}
    for name, value in values.items():
        if override or saved[name] is None:
            os.environ[name] = value
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old
