"""Tracking URIs: the embedded default, making local paths absolute, and checking a store before a study."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from .._env import scoped_env
from ._deps import require_mlflow

#: The embedded default store: a SQLite file ``mlflow.db`` in the working directory (MLflow 3's own default).
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"

#: MLflow retries a failed HTTP request 7 times with exponential backoff (minutes in all) by default. A
#: study must not stall for minutes when its server goes away, so neve_tune lowers these, unless the
#: user set the environment variables themselves.
CLIENT_ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.2",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
    # MLflow prints a "View run ... at: <url>" line for every run it ends against a server: one per trial.
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}


class TrackingUnavailableError(RuntimeError):
    """The MLflow tracking store cannot be used (unreachable server, unwritable path, unknown scheme)."""


def resolve_tracking_uri(uri: str | os.PathLike[str] | None = None) -> str:
    """The tracking URI to use, with local paths made absolute.

    ``None`` means ``$MLFLOW_TRACKING_URI`` when set, else :data:`DEFAULT_TRACKING_URI`. A relative SQLite
    path (``sqlite:///mlflow.db``) or a bare folder path is resolved against the current working directory
    now, so that Ray trials, which run in their own working directories, write to the same store.
    """
    if uri is None or str(uri) == "":
        uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    uri = str(uri)
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///") :]
        if path and path != ":memory:" and not os.path.isabs(path):
            return "sqlite:///" + os.path.abspath(path)
        return uri
    if "://" not in uri and not uri.startswith(("databricks", "file:")):
        return Path(uri).resolve().as_uri()
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else uri


def configure_client_env() -> None:
    """Lower MLflow's HTTP retry/backoff/timeout in this process (only where the user did not set them).

    With MLflow's defaults, every request to a server that went away retries for minutes. neve_tune's
    loggers buffer and retry themselves, so a few quick retries are enough. Also silences the per-run
    "View run at" lines MLflow prints to stdout (one per trial would flood a study's output).
    """
    for name, value in CLIENT_ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)


@contextlib.contextmanager
def fail_fast_http(retries: int = 0, timeout: float = 10) -> Iterator[None]:
    """Temporarily make MLflow's HTTP client fail fast: ``retries`` retries, ``timeout`` seconds a request.

    For checks and retry loops that bound their own time (the pre-flight check, the end-of-study wait). It
    changes this process's environment while it is active, so use it where no other thread logs to MLflow.
    """
    wanted = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries), "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(timeout))}
    with scoped_env(wanted):
        yield


def check_tracking_uri(uri: str | os.PathLike[str] | None = None, *, timeout: float = 10.0) -> str:
    """Check that MLflow can read and write the tracking store, before any training starts.

    Resolves the URI (see :func:`resolve_tracking_uri`), then talks to the store: a SQLite file is
    created (its folder must exist), a server must answer ``/health`` and the tracking API within
    ``timeout`` seconds.

    Returns:
        The resolved URI.

    Raises:
        TrackingUnavailableError: with the reason and what to do instead.
        ImportError: mlflow is not installed.
    """
    resolved = resolve_tracking_uri(uri)
    require_mlflow()
    from mlflow import MlflowClient

    hint = (
        "Pass a reachable server (e.g. --tracking-uri http://127.0.0.1:5000 after "
        "`mlflow server --host 127.0.0.1 --port 5000`) or a local store (--tracking-uri sqlite:///mlflow.db)."
    )
    if resolved.startswith("sqlite:///"):
        path = resolved[len("sqlite:///") :]
        if path != ":memory:":
            folder = os.path.dirname(path) or "."
            if not os.path.isdir(folder):
                raise TrackingUnavailableError(
                    f"Cannot use the MLflow tracking URI {resolved!r}: the folder {folder!r} does not exist. "
                    f"Create it first, or {hint[0].lower()}{hint[1:]}"
                )
            if not os.access(folder, os.W_OK):
                raise TrackingUnavailableError(
                    f"Cannot use the MLflow tracking URI {resolved!r}: the folder {folder!r} is not writable. {hint}"
                )
    elif resolved.startswith(("http://", "https://")):
        import requests

        try:
            response = requests.get(f"{resolved}/health", timeout=timeout)
        except requests.RequestException as err:
            raise TrackingUnavailableError(
                f"No MLflow server answers at {resolved!r} ({type(err).__name__}: {err}). {hint}"
            ) from err
        if response.status_code != 200:
            raise TrackingUnavailableError(
                f"{resolved!r} answered /health with HTTP {response.status_code}; it does not look like a "
                f"running MLflow server. {hint}"
            )
    try:
        with fail_fast_http(timeout=timeout):
            MlflowClient(tracking_uri=resolved).search_experiments(max_results=1)
    except Exception as err:
        raise TrackingUnavailableError(
            f"Cannot use the MLflow tracking URI {resolved!r}: {type(err).__name__}: {err}. {hint}"
        ) from err
    return resolved
