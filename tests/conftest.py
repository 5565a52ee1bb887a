"""What the tests share: one Ray per session, real `mlflow server`s, the compute-path fixtures, and the markers.

Markers (``make test-fast`` deselects ``slow``, ``ray`` and ``server``). ``make test`` runs pytest-xdist
workers (``WORKERS``, 2 by default); each worker starts its own session Ray when it first runs a ``ray`` test,
so two Rays can run at once (each with 2 CPUs; they share nothing but the machine).

* ``ray``: the test runs Ray. A test that requests :func:`ray_session` gets the marker by itself; one that
  starts Ray another way (a subprocess) sets it. A test without it that calls ``ray.init`` (directly, or
  through ``Tuner.fit`` or a study) fails at once, and one that leaves Ray started fails at its end.
* ``server``: the test starts an `mlflow server` (:class:`MlflowServer`); its ``start`` fails in a test
  without the marker. Every such server here is the test's own: the outage tests stop and restart it, and
  the docker test runs the image's entrypoint.

New SQLite MLflow stores made in this process start as a copy of the first one MLflow migrated in the
session (:func:`_new_sqlite_stores_from_one_migration`).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from neve_tune._measure import kernel as _kernel
from neve_tune.testing import compute_path as use_compute_path

MLFLOW = str(Path(sys.executable).with_name("mlflow"))

#: The test running now (set by an autouse fixture), so helpers can check its markers.
_current: dict[str, pytest.Item | None] = {"item": None}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        names = getattr(item, "fixturenames", ())
        if "ray_session" in names:
            item.add_marker(pytest.mark.ray)


# ------------------------------------------------------------------------------------------------ Ray


@pytest.fixture(scope="session")
def ray_session() -> Iterator[Any]:
    """One local Ray for the whole session (2 CPUs), shut down at its end. Request it in every test that runs Ray."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


class RayWithoutMarker(RuntimeError):
    """A test without the ``ray`` marker tried to start Ray."""


@pytest.fixture(autouse=True)
def _ray_only_with_its_marker(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    _current["item"] = request.node
    if request.node.get_closest_marker("ray") is not None:
        yield
        return
    ray = sys.modules.get("ray")
    was_up = ray is not None and ray.is_initialized()
    if ray is not None and not was_up:

        def refuse(*args: Any, **kwargs: Any) -> None:
            raise RayWithoutMarker(
                f"{request.node.nodeid} starts Ray but is not marked: request the `ray_session` fixture "
                "(or mark it `@pytest.mark.ray`), so that `make test-fast` leaves it out"
            )

        monkeypatch.setattr(ray, "init", refuse)
    yield
    ray = sys.modules.get("ray")
    if ray is not None and not was_up and ray.is_initialized():
        ray.shutdown()
        pytest.fail(f"{request.node.nodeid} left Ray started without the `ray` marker: request `ray_session`")


# ---------------------------------------------------------------------------------------------- MLflow


def free_port() -> int:
    """A TCP port nothing listens on now, on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 (its own process group, so `stop` ends all its processes)."""

    def __init__(self, folder: Path, port: int | None = None) -> None:
        self.folder = folder
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90) -> MlflowServer:
        item = _current["item"]
        if item is not None and item.get_closest_marker("server") is None:
            raise RuntimeError(
                f"{item.nodeid} starts an mlflow server but is not marked: mark it `@pytest.mark.server`, "
                "so that `make test-fast` leaves it out"
            )
        self.folder.mkdir(parents=True, exist_ok=True)
        if not (self.folder / "server.db").exists():
            _seed_new_sqlite_store(self.folder / "server.db")
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        cmd = [
            MLFLOW, "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{self.folder / 'server.db'}",
            "--artifacts-destination", str(self.folder / "artifacts"),
        ]  # fmt: skip
        log = open(self.folder / "server.log", "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env, start_new_session=True)
        import requests

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.folder / 'server.log').read_text()[-2000:]}")
            try:
                if requests.get(f"{self.uri}/health", timeout=1).status_code == 200:
                    return self
            except requests.RequestException:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer within {timeout} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the group of the server this object started
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None


# ------------------------------------------------------------------------------------ velocity compute


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


# --------------------------------------------------------------------------------- new SQLite stores


def _copy_sqlite(source: str | Path, target: str | Path) -> None:
    """SQLite's online backup of ``source`` into ``target`` (safe while others hold ``target`` open)."""
    with closing(sqlite3.connect(source)) as src, closing(sqlite3.connect(target)) as dst:
        src.backup(dst)


def _from_template(original: Callable[[Any], None], folder: Path) -> Callable[[Any], None]:
    template = folder / "migrated.db"

    def initialize_tables(engine: Any) -> None:
        database = engine.url.database if engine.url.get_backend_name() == "sqlite" else None
        if not database or database == ":memory:":
            original(engine)
        elif template.exists():
            _copy_sqlite(template, database)
        else:
            original(engine)  # MLflow's own migrations, once per session
            _copy_sqlite(database, template)

    initialize_tables.neve_template = template  # type: ignore[attr-defined]
    return initialize_tables


#: The session's folder for the migrated template (set by the autouse fixture below).
_template_folder: dict[str, Path] = {}


def _use_template(utils: Any) -> None:
    if not hasattr(utils._initialize_tables, "neve_template"):
        utils._initialize_tables = _from_template(utils._initialize_tables, _template_folder["path"])


def _seed_new_sqlite_store(database: Path) -> None:
    """Give a new store that an `mlflow server` of this session will open the session's migrated tables."""
    import mlflow.store.db.utils as utils

    _use_template(utils)
    engine = utils.create_sqlalchemy_engine(f"sqlite:///{database}")
    try:
        utils._initialize_tables(engine)
    finally:
        engine.dispose()


@pytest.fixture(scope="session")
def _sqlite_template_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mlflow-sqlite-template")


@pytest.fixture(autouse=True)
def _new_sqlite_stores_from_one_migration(_sqlite_template_folder: Path) -> None:
    """A new SQLite MLflow store costs MLflow's ~50 schema migrations (seconds; dozens of tests make one).

    The first new store of the session is migrated by MLflow itself and kept; each later new store in this
    process receives that database through SQLite's backup API: the same tables, the same alembic version,
    written by the same MLflow. Nothing about MLflow's behaviour is replaced. A :class:`MlflowServer`'s new
    store gets the same tables before the server opens it (so the server finds a migrated store and migrates
    nothing). Stores made in other subprocesses (the CLI tests, Ray workers) migrate as a user's would.
    Applied once ``mlflow.store.db.utils`` is imported.
    """
    _template_folder["path"] = _sqlite_template_folder
    utils = sys.modules.get("mlflow.store.db.utils")
    if utils is not None:
        _use_template(utils)
