"""Pull the runnable examples out of README.md and the docs pages, so tests run exactly what users read.

An example is the fenced python block that follows ``<!-- example: NAME -->`` in README.md or in a page
under docs/; each name appears once across all of them.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
_EXAMPLE = re.compile(r"<!-- example: ([\w-]+) -->\s*```python\n(.*?)```", re.S)


def example_pages() -> list[Path]:
    """README.md and every Markdown page of the docs site."""
    return [README, *sorted((ROOT / "docs").rglob("*.md"))]


def all_examples() -> dict[str, tuple[Path, str]]:
    """Every named example: name -> (the page it is on, its code). A name used twice raises."""
    found: dict[str, tuple[Path, str]] = {}
    for page in example_pages():
        for name, code in _EXAMPLE.findall(page.read_text()):
            if name in found:
                raise LookupError(f"example '{name}' is on both {found[name][0]} and {page}: rename one")
            found[name] = (page, code)
    return found


def readme_example(name: str) -> str:
    """The fenced python block that follows ``<!-- example: NAME -->`` in README.md or a docs page."""
    examples = all_examples()
    if name not in examples:
        known = ", ".join(sorted(examples))
        raise LookupError(f"no python block after '<!-- example: {name} -->' in README.md or docs/ (known: {known})")
    return examples[name][1]
