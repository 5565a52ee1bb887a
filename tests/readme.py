"""Pull the runnable examples out of README.md, so tests run exactly what users read."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example(name: str) -> str:
    """The fenced python block that follows ``<!-- example: NAME -->`` in README.md."""
    text = README.read_text()
    match = re.search(rf"<!-- example: {re.escape(name)} -->\s*```python\n(.*?)```", text, re.S)
    if match is None:
        raise LookupError(f"README.md has no python block after '<!-- example: {name} -->'")
    return match.group(1)
