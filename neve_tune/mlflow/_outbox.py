"""An ordered outbox of MLflow operations for one run, that survives the tracking server going away.

Every write (create the run, log a batch, upload an artifact, end the run) is queued and sent in order.
When a send fails for a transient reason (server down, database locked), the operation stays queued, a
:class:`MlflowUnavailableWarning` is issued once per outage, and sending is retried on the next call
after ``retry_interval_s``. Training never waits for MLflow longer than one failed request. What is still
queued when the run ends is written to a JSON-lines file that :func:`replay_unsent` sends later.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
import time
import warnings
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._deps import require_mlflow

#: MLflow's per-request limits for ``log_batch``.
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_PARAM_LENGTH = 6000

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
    """One queued MLflow write: ``create``, ``batch``, ``artifact``, ``terminate`` or ``children`` (JSON-able data)."""

    kind: str
    data: dict[str, Any] = field(default_factory=dict)


def _is_permanent(err: BaseException) -> bool:
    code = getattr(err, "error_code", None)
    return isinstance(code, str) and code in _PERMANENT


def _metric_value(value: Any) -> float:
    v = float(value)
    return v  # NaN and +-inf are valid MLflow metric values


def chunk_batch(
    metrics: Iterable[tuple[str, float, int, int]] = (),
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, Any] | None = None,
) -> list[Op]:
    """Split metrics ``(key, value, timestamp_ms, step)``, params and tags into ``batch`` ops within MLflow's limits."""
    ops: list[Op] = []
    metric_list = [(str(k), _metric_value(v), int(ts), int(s)) for k, v, ts, s in metrics]
    for i in range(0, len(metric_list), MAX_METRICS_PER_BATCH):
        ops.append(Op("batch", {"metrics": metric_list[i : i + MAX_METRICS_PER_BATCH]}))
    for name, mapping in (("params", params), ("tags", tags)):
        items = [(str(k), str(v)[:MAX_PARAM_LENGTH]) for k, v in (mapping or {}).items()]
        for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            ops.append(Op("batch", {name: dict(items[i : i + MAX_PARAMS_TAGS_PER_BATCH])}))
    return ops


class RunOutbox:
    """The queued writes of one MLflow run (see the module docstring). Thread-safe.

    NaN policy: NaN/inf metric values are sent as they are (and written as ``"nan"``/``"inf"`` in a dump).
    State: the queue lives in memory; :meth:`dump` writes what is left to a JSON-lines file and
    :func:`replay_unsent` sends it later, in the same order.

    Args:
        tracking_uri: where to send.
        experiment_id: the run's experiment.
        run_id: the run, when it exists already; otherwise queue a ``create`` op first.
        label: names the run in warnings.
        retry_interval_s: after a failure, wait this long before trying again.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment_id: str,
        *,
        run_id: str | None = None,
        label: str = "run",
        retry_interval_s: float = 10.0,
    ) -> None:
        require_mlflow()
        from mlflow import MlflowClient

        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.run_id = run_id
        self.label = label
        self.retry_interval_s = float(retry_interval_s)
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.dropped: list[tuple[Op, str]] = []
        self._ops: deque[Op] = deque()
        self._next_try = 0.0
        self._down_since: float | None = None
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ queueing
    @property
    def pending(self) -> int:
        """How many operations wait to be sent."""
        return len(self._ops)

    @property
    def healthy(self) -> bool:
        """False while the last attempt to send failed."""
        return self._down_since is None

    def put(self, ops: Op | Iterable[Op], *, send: bool = True) -> bool:
        """Queue operations, then try to send (unless ``send=False``). Returns True when nothing waits."""
        with self._lock:
            self._ops.extend([ops] if isinstance(ops, Op) else ops)
        return self.send() if send else not self._ops

    def send(self, *, force: bool = False) -> bool:
        """Send what is queued, in order. ``force`` ignores the retry interval. True when nothing waits."""
        with self._lock:
            if not self._ops:
                return True
            if not force and time.monotonic() < self._next_try:
                return False
            sent = 0
            while self._ops:
                op = self._ops[0]
                try:
                    self._run(op)
                except Exception as err:
                    if _is_permanent(err):
                        self._ops.popleft()
                        self.dropped.append((op, f"{type(err).__name__}: {err}"))
                        warnings.warn(
                            f"MLflow rejected a '{op.kind}' operation of {self.label} and it was dropped: {err}",
                            MlflowUnavailableWarning,
                            stacklevel=2,
                        )
                        continue
                    self._on_failure(err)
                    return False
                self._ops.popleft()
                sent += 1
            if self._down_since is not None:
                down = time.monotonic() - self._down_since
                self._down_since = None
                warnings.warn(
                    f"MLflow at {self.tracking_uri} is reachable again after {down:.0f} s; sent {sent} buffered "
                    f"operation(s) of {self.label}.",
                    MlflowUnavailableWarning,
                    stacklevel=2,
                )
            return True

    def _on_failure(self, err: BaseException) -> None:
        now = time.monotonic()
        self._next_try = now + self.retry_interval_s
        if self._down_since is None:
            self._down_since = now
            warnings.warn(
                f"MLflow at {self.tracking_uri} is unavailable ({type(err).__name__}: {str(err)[:300]}). "
                f"Training goes on; {self.label} buffers its records and retries every "
                f"{self.retry_interval_s:g} s.",
                MlflowUnavailableWarning,
                stacklevel=3,
            )

    # ------------------------------------------------------------------ execution
    def _run(self, op: Op) -> None:
        from mlflow.entities import Metric, Param, RunTag

        client, data = self.client, op.data
        if op.kind == "create":
            self._create(data)
            return
        if self.run_id is None:
            raise RuntimeError("the run was not created yet")
        if op.kind == "batch":
            client.log_batch(
                self.run_id,
                metrics=[Metric(k, v, ts, s) for k, v, ts, s in data.get("metrics", ())],
                params=[Param(k, v) for k, v in data.get("params", {}).items()],
                tags=[RunTag(k, v) for k, v in data.get("tags", {}).items()],
                synchronous=True,
            )
        elif op.kind == "artifact":
            client.log_artifact(self.run_id, data["local_path"], data.get("artifact_path"))
        elif op.kind == "terminate":
            client.set_terminated(self.run_id, data["status"], data.get("end_time"))
        elif op.kind == "children":  # an arm run acting on its trial runs (see ArmRun.finalize_trial)
            from ._tracker import run_children_op

            run_children_op(client, self.experiment_id, self.run_id, data)
        else:
            raise ValueError(f"unknown MLflow operation {op.kind!r}")

    def _create(self, data: Mapping[str, Any]) -> None:
        client = self.client
        reuse = data.get("reuse_filter")
        if reuse:
            found = client.search_runs([self.experiment_id], filter_string=reuse, max_results=1)
            if found:
                # A restarted trial: reopen its run, drop the failed attempt's error, count the restart.
                run = found[0]
                self.run_id = run.info.run_id
                client.update_run(self.run_id, status="RUNNING")
                if "error" in run.data.tags:
                    client.delete_tag(self.run_id, "error")
                client.set_tag(self.run_id, "restarts", str(int(run.data.tags.get("restarts", "0")) + 1))
                return
        run = client.create_run(
            self.experiment_id, start_time=data.get("start_time"), tags=data.get("tags"), run_name=data.get("run_name")
        )
        self.run_id = run.info.run_id

    # ------------------------------------------------------------------ what could not be sent
    def dump(self, path: str | os.PathLike[str]) -> Path | None:
        """Write the unsent operations to a JSON-lines file (artifacts copied next to it); None if none."""
        with self._lock:
            ops = list(self._ops)
            if not ops:
                return None
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            files = path.with_suffix(".artifacts")
            lines = [
                json.dumps(
                    {
                        "neve_tune_unsent": 1,
                        "tracking_uri": self.tracking_uri,
                        "experiment_id": self.experiment_id,
                        "run_id": self.run_id,
                        "label": self.label,
                    }
                )
            ]
            for op in ops:
                data = dict(op.data)
                if op.kind == "artifact":
                    files.mkdir(parents=True, exist_ok=True)
                    src = Path(data["local_path"])
                    dst = files / f"{len(lines):04d}_{src.name}"
                    if src.exists():
                        shutil.copyfile(src, dst)
                    data["local_path"] = str(dst)
                if op.kind == "batch" and "metrics" in data:
                    data["metrics"] = [[k, _json_float(v), ts, s] for k, v, ts, s in data["metrics"]]
                lines.append(json.dumps({"kind": op.kind, "data": data}))
            path.write_text("\n".join(lines) + "\n")
            return path


def _json_float(v: float) -> float | str:
    return v if math.isfinite(v) else repr(v)  # 'nan', 'inf', '-inf'


def replay_unsent(path: str | os.PathLike[str], *, tracking_uri: str | None = None) -> str | None:
    """Send the operations a logger saved to ``path`` when MLflow was unreachable at the end of its run.

    Args:
        path: the ``.jsonl`` file named in the warning.
        tracking_uri: override the store recorded in the file.

    Returns:
        The run id the operations went to.

    Raises:
        Exception: whatever MLflow raises if the store is still unreachable (nothing is lost: the file stays).
    """
    lines = Path(path).read_text().splitlines()
    header = json.loads(lines[0])
    if header.get("neve_tune_unsent") != 1:
        raise ValueError(f"{path} is not a neve_tune unsent-operations file.")
    outbox = RunOutbox(
        tracking_uri or header["tracking_uri"], header["experiment_id"], run_id=header["run_id"], label=header["label"]
    )
    for line in lines[1:]:
        entry = json.loads(line)
        data = entry["data"]
        if entry["kind"] == "batch" and "metrics" in data:
            data["metrics"] = [(k, float(v), ts, s) for k, v, ts, s in data["metrics"]]
        outbox._run(Op(entry["kind"], data))
    return outbox.run_id
