"""An ordered outbox of MLflow operations for one run, that survives the tracking server going away.

Every write (create the run, log a batch, upload an artifact, end the run) is an :class:`Op`, queued and
sent in order. When a send fails for a transient reason (server down, database locked), the operation stays
queued, a :class:`MlflowUnavailableWarning` is issued once per outage, and sending is retried on the next
call after ``retry_interval_s``. Training never waits for MLflow longer than one failed request. With a
``spool`` file, whatever a send leaves queued is also written there at once (atomically, :mod:`._spool`)
and the file goes once everything was sent: a process killed mid-outage (a Ray worker torn down right
after its trial was stopped) leaves it, for :func:`~neve_tune.mlflow.replay_unsent` to send later.

An operation kind is a name with a registered handler (:func:`register_op`). This module registers the
four kinds every run needs (``create``, ``batch``, ``artifact``, ``terminate``); other packages register
their own (the study tree registers ``children``, an arm run acting on its trial runs). A saved file names
the module of each non-built-in handler, so a replay in a fresh process imports it first.
"""

from __future__ import annotations

import importlib
import os
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from ._deps import require_mlflow
from ._experiment import get_or_create_experiment
from ._spool import UNSENT_FORMAT, keep_artifact, remove_unsent, write_unsent
from ._uri import configure_client_env

# Error codes that will not go away by retrying: the operation is dropped (with a warning).
_PERMANENT = frozenset(
    {
        "INVALID_PARAMETER_VALUE",
        "RESOURCE_ALREADY_EXISTS",
        "RESOURCE_DOES_NOT_EXIST",
        "INVALID_STATE",
        "BAD_REQUEST",
        "MALFORMED_REQUEST",
        "NOT_FOUND",
    }
)


class MlflowUnavailableWarning(RuntimeWarning):
    """MLflow could not be reached; the study goes on and the records are buffered (or saved to a file)."""


@dataclass
class Op:
    """One queued MLflow write: a registered ``kind`` (see :func:`register_op`) and its JSON-able data."""

    kind: str
    data: dict[str, Any] = field(default_factory=dict)


#: ``handler(outbox, data)`` sends one operation of the outbox's run (``outbox.client``, ``outbox.run_id``).
OpHandler = Callable[["RunOutbox", dict[str, Any]], None]

_HANDLERS: dict[str, OpHandler] = {}


def register_op(kind: str, handler: OpHandler) -> None:
    """Make ``kind`` an operation that a :class:`RunOutbox` can queue, send, save and replay.

    The handler raises when the operation could not be sent: MLflow's permanent errors (invalid parameter,
    missing resource, ...) drop the operation, anything else keeps it queued for a retry. A handler must
    be idempotent enough to be replayed after a partial failure.

    Replay in another process: the handler's module is saved with each operation of this kind and is
    imported before the replay when it lies inside the ``neve_tune`` package; handlers from elsewhere must
    be registered (their module imported) before calling :func:`~neve_tune.mlflow.replay_unsent`.

    Raises:
        ValueError: ``kind`` is already registered to a handler of another module.
    """
    old = _HANDLERS.get(kind)
    if old is not None and old is not handler and getattr(old, "__module__", None) != handler.__module__:
        raise ValueError(f"The MLflow operation {kind!r} is already registered by {old.__module__}.")
    _HANDLERS[kind] = handler


def op_handler(kind: str, module: str | None = None) -> OpHandler:
    """The handler of ``kind``; imports ``module`` first (a ``neve_tune`` module only) when it is unknown."""
    if kind not in _HANDLERS and module and module.startswith("neve_tune."):
        importlib.import_module(module)
    try:
        return _HANDLERS[kind]
    except KeyError:
        hint = f" ({module} did not register it)" if module else ""
        raise ValueError(f"unknown MLflow operation {kind!r}{hint}") from None


def _handler_module(kind: str) -> str | None:
    module = getattr(_HANDLERS.get(kind), "__module__", None)
    return None if module == __name__ else module


def is_permanent(err: BaseException) -> bool:
    """True for an MLflow error that retrying cannot fix (the operation is dropped)."""
    code = getattr(err, "error_code", None)
    return isinstance(code, str) and code in _PERMANENT


def millis(when: datetime | None = None) -> int:
    """MLflow's timestamps: milliseconds since the epoch, of ``when`` (``None``: now)."""
    return int((when.timestamp() if when is not None else time.time()) * 1000)


def chunk_batch(
    metrics: Iterable[tuple[str, float, int, int]] = (),
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, Any] | None = None,
) -> list[Op]:
    """Split metrics ``(key, value, timestamp_ms, step)``, params and tags into ``batch`` ops within MLflow's limits.

    The limits are MLflow's own (``mlflow.utils.validation``: 1,000 metrics and 100 params or tags per request,
    params cut at 6,000 characters and tags at 8,000 in MLflow 3). NaN and infinite metric values are kept
    (MLflow stores them); values are made ``float``, params and tags ``str``.
    """
    require_mlflow("log to MLflow")
    from mlflow.utils.validation import (
        MAX_METRICS_PER_BATCH,
        MAX_PARAM_VAL_LENGTH,
        MAX_PARAMS_TAGS_PER_BATCH,
        MAX_TAG_VAL_LENGTH,
    )

    ops: list[Op] = []
    metric_list = [(str(k), float(v), int(ts), int(s)) for k, v, ts, s in metrics]
    for i in range(0, len(metric_list), MAX_METRICS_PER_BATCH):
        ops.append(Op("batch", {"metrics": metric_list[i : i + MAX_METRICS_PER_BATCH]}))
    for name, mapping, max_length in (("params", params, MAX_PARAM_VAL_LENGTH), ("tags", tags, MAX_TAG_VAL_LENGTH)):
        items = [(str(k), str(v)[:max_length]) for k, v in (mapping or {}).items()]
        for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            ops.append(Op("batch", {name: dict(items[i : i + MAX_PARAMS_TAGS_PER_BATCH])}))
    return ops


class RunOutbox:
    """The queued writes of one MLflow run (see the module docstring). Thread-safe.

    NaN policy: NaN/inf metric values are sent as they are (and written as ``"nan"``/``"inf"`` in a dump).
    State: the queue lives in memory; :meth:`dump` writes what is left to a JSON-lines file and
    :func:`~neve_tune.mlflow.replay_unsent` sends it later, in the same order.

    Args:
        tracking_uri: where to send.
        experiment_id: the run's experiment; ``None`` with ``experiment_name``: found or created (tagged as
            model training) when the run is created, so that creating it can wait for an outage too.
        run_id: the run, when it exists already; otherwise queue a ``create`` op first.
        label: names the run in warnings.
        retry_interval_s: after a failure, wait this long before trying again.
        experiment_name: see ``experiment_id``.
        order: where a saved file goes when a folder is replayed (lowest first): runs whose operations act
            on other runs (an arm run ending its trials) come after those runs.
        warn: issue :class:`MlflowUnavailableWarning` on outages (off where the caller reports them).
        spool: the file that holds what could not be sent (see the module docstring); ``None``: memory only,
            until :meth:`dump`.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment_id: str | None,
        *,
        run_id: str | None = None,
        label: str = "run",
        retry_interval_s: float = 10.0,
        experiment_name: str | None = None,
        order: int = 0,
        warn: bool = True,
        spool: str | os.PathLike[str] | None = None,
    ) -> None:
        require_mlflow()
        configure_client_env()  # a few quick HTTP retries: the outbox retries itself
        from mlflow import MlflowClient

        if experiment_id is None and not experiment_name:
            raise ValueError("RunOutbox needs an experiment_id or an experiment_name.")
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.experiment_name = experiment_name
        self.run_id = run_id
        self.label = label
        self.retry_interval_s = float(retry_interval_s)
        self.order = int(order)
        self.warn = warn
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.dropped: list[tuple[Op, str]] = []
        self.last_error: BaseException | None = None
        self.spool = Path(spool) if spool is not None else None
        self._ops: deque[Op] = deque()
        self._next_try = 0.0
        self._down_since: float | None = None
        self._lock = threading.RLock()
        self._spooled = False  # the spool file exists
        self._changed = False  # the queue changed since the spool file was written
        self._kept = 0  # artifacts copied next to the spool file
        self._spool_error: OSError | None = None

    # ------------------------------------------------------------------ queueing
    @property
    def pending(self) -> int:
        """How many operations wait to be sent."""
        return len(self._ops)

    @property
    def down(self) -> bool:
        """True while the last send failed for a transient reason (until one succeeds)."""
        return self._down_since is not None

    def require_run(self) -> str:
        """The run id, or a (transient) error while the run was not created yet."""
        if self.run_id is None:
            raise RuntimeError("the run was not created yet")
        return self.run_id

    def require_experiment(self) -> str:
        """The experiment id; finds or creates ``experiment_name`` the first time (see the class docstring)."""
        if self.experiment_id is None:
            assert self.experiment_name is not None
            self.experiment_id = get_or_create_experiment(self.client, self.experiment_name)
        return self.experiment_id

    def put(self, ops: Op | Iterable[Op], *, send: bool = True) -> bool:
        """Queue operations, then try to send (unless ``send=False``). Returns True when nothing waits."""
        with self._lock:
            self._ops.extend([ops] if isinstance(ops, Op) else ops)
            self._changed = True
        return self.send() if send else not self._ops

    def send(self, *, force: bool = False) -> bool:
        """Send what is queued, in order. ``force`` ignores the retry interval. True when nothing waits.

        What is still queued afterwards is written to the spool file (if any); once nothing waits, the file
        is deleted.
        """
        with self._lock:
            if not self._ops:
                self._unspool()
                return True
            if not force and time.monotonic() < self._next_try:
                self._spool_quietly()
                return False
            sent = 0
            while self._ops:
                op = self._ops[0]
                try:
                    self.execute(op)
                except Exception as err:
                    if is_permanent(err):
                        self._ops.popleft()
                        self._changed = True
                        self.dropped.append((op, f"{type(err).__name__}: {err}"))
                        self._warn(f"MLflow rejected a '{op.kind}' operation of {self.label} and it was dropped: {err}")
                        continue
                    self._on_failure(err)
                    self._spool_quietly()
                    return False
                self._ops.popleft()
                self._changed = True
                sent += 1
            self._unspool()
            if self._down_since is not None:
                down = time.monotonic() - self._down_since
                self._down_since = None
                self._warn(
                    f"MLflow at {self.tracking_uri} is reachable again after {down:.0f} s; sent {sent} buffered "
                    f"operation(s) of {self.label}."
                )
            return True

    def execute(self, op: Op) -> None:
        """Send one operation now, through its registered handler (errors propagate)."""
        op_handler(op.kind)(self, op.data)

    def _warn(self, message: str) -> None:
        if self.warn:
            warnings.warn(message, MlflowUnavailableWarning, stacklevel=4)

    def _on_failure(self, err: BaseException) -> None:
        now = time.monotonic()
        self.last_error = err
        self._next_try = now + self.retry_interval_s
        if self._down_since is None:
            self._down_since = now
            self._warn(
                f"MLflow at {self.tracking_uri} is unavailable ({type(err).__name__}: {str(err)[:300]}). "
                f"Training goes on; {self.label} buffers its records and retries every "
                f"{self.retry_interval_s:g} s."
            )

    # ------------------------------------------------------------------ what could not be sent
    def header(self) -> dict[str, Any]:
        """The first line of a saved file: where its operations go."""
        return {
            UNSENT_FORMAT: 1,
            "tracking_uri": self.tracking_uri,
            "experiment_id": self.experiment_id,
            "experiment_name": self.experiment_name,
            "run_id": self.run_id,
            "label": self.label,
            "order": self.order,
        }

    def dump(self, path: str | os.PathLike[str]) -> Path | None:
        """Write the unsent operations to a JSON-lines file (artifacts copied next to it); None if none."""
        with self._lock:
            if not self._ops:
                return None
            path = Path(path)
            for op in self._ops:
                if op.kind == "artifact":  # the queued op points at the copy too: the original may go first
                    self._kept += 1
                    op.data["local_path"] = keep_artifact(path, op.data["local_path"], self._kept)
            return write_unsent(path, self.header(), [(op.kind, op.data, _handler_module(op.kind)) for op in self._ops])

    def save(self) -> Path | None:
        """Write what waits to the spool file now (when it changed); the file, or None when nothing waits.

        Raises:
            OSError: the file could not be written (the operations stay queued in memory).
        """
        with self._lock:
            if self.spool is None or not self._ops:
                return None
            if self._changed or not self._spooled:
                self.dump(self.spool)
                self._spooled, self._changed = True, False
            return self.spool

    def _spool_quietly(self) -> None:  # training must go on: a failure to write is one warning
        try:
            self.save()
        except OSError as err:
            if self._spool_error is None:
                warnings.warn(
                    f"Could not save the unsent MLflow records of {self.label} to {self.spool}: {err}. They stay "
                    "in memory and are sent if MLflow answers again before the run ends.",
                    MlflowUnavailableWarning,
                    stacklevel=4,
                )
            self._spool_error = err

    def _unspool(self) -> None:
        if self.spool is not None and self._spooled:
            remove_unsent(self.spool)
            self._spooled = False


# ---------------------------------------------------------------------- the built-in operations
def _create(outbox: RunOutbox, data: dict[str, Any]) -> None:
    client = outbox.client
    experiment_id = outbox.require_experiment()
    reuse = data.get("reuse_filter")
    if reuse:
        found = client.search_runs([experiment_id], filter_string=reuse, max_results=1)
        if found:
            # A restarted trial: reopen its run, drop the failed attempt's error, count the restart.
            run = found[0]
            outbox.run_id = run_id = run.info.run_id
            client.update_run(run_id, status="RUNNING")
            if "error" in run.data.tags:
                client.delete_tag(run_id, "error")
            client.set_tag(run_id, "restarts", str(int(run.data.tags.get("restarts", "0")) + 1))
            return
    run = client.create_run(
        experiment_id, start_time=data.get("start_time"), tags=data.get("tags"), run_name=data.get("run_name")
    )
    outbox.run_id = run.info.run_id


def _batch(outbox: RunOutbox, data: dict[str, Any]) -> None:
    from mlflow.entities import Metric, Param, RunTag

    outbox.client.log_batch(
        outbox.require_run(),
        metrics=[Metric(k, v, ts, s) for k, v, ts, s in data.get("metrics", ())],
        params=[Param(k, v) for k, v in data.get("params", {}).items()],
        tags=[RunTag(k, v) for k, v in data.get("tags", {}).items()],
        synchronous=True,
    )


def _artifact(outbox: RunOutbox, data: dict[str, Any]) -> None:
    outbox.client.log_artifact(outbox.require_run(), data["local_path"], data.get("artifact_path"))


def _terminate(outbox: RunOutbox, data: dict[str, Any]) -> None:
    outbox.client.set_terminated(outbox.require_run(), data["status"], data.get("end_time"))


for _kind, _fn in (("create", _create), ("batch", _batch), ("artifact", _artifact), ("terminate", _terminate)):
    register_op(_kind, _fn)
