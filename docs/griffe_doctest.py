"""A griffe extension for the API reference: a docstring's ``Example:`` section is read as ``Examples:``.

Google style makes ``Examples:`` a section of doctest blocks and any other title (``Example:``) an admonition
of Markdown text, where ``>>>`` lines would run together into one paragraph.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.M)


class ExampleSections(griffe.Extension):
    """Rename ``Example:`` to ``Examples:`` in every docstring before it is parsed."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
