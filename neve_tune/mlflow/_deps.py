"""Lazy import of MLflow, with an actionable message when it is missing."""

from __future__ import annotations

from types import ModuleType


def require_mlflow(purpose: str | None = None) -> ModuleType:
    """The ``mlflow`` module, or an ``ImportError`` that says how to install it (and, if given, what for)."""
    try:
        import mlflow
    except ImportError as err:
        raise ImportError(
            "mlflow was not found - please install with `pip install neve_tune[mlflow]` (or `pip install mlflow`)"
            + (f" to {purpose}." if purpose else ".")
        ) from err
    return mlflow
