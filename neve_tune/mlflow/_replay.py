"""Send later what a run could not send: the ``mlflow-unsent-*.jsonl`` files its outbox saved.

One file holds one run's operations, in order, after a header naming the store, experiment and run. A
folder of them (``neve_results/mlflow-unsent``) is replayed run by run, trial runs before the arm and study
runs that act on them; ``neve-tune mlflow replay FOLDER`` does the same from the command line.
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ._outbox import Op, RunOutbox, is_permanent, op_handler
from ._spool import UNSENT_FORMAT, remove_unsent, write_lines


@dataclass(frozen=True)
class UnsentFile:
    """What one saved file holds: where it goes, and how many operations and metric values wait in it."""

    path: Path
    tracking_uri: str
    experiment_id: str | None
    run_id: str | None
    label: str
    order: int
    operations: int
    metric_values: int

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> UnsentFile:
        """Read the header and count the operations of ``path``.

        Raises:
            ValueError: not a neve_tune unsent-operations file.
        """
        path = Path(path)
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        header = _header(path, lines)
        metrics = 0
        for line in lines[1:]:
            metrics += len(json.loads(line).get("data", {}).get("metrics", ()))
        return cls(
            path=path,
            tracking_uri=header["tracking_uri"],
            experiment_id=header.get("experiment_id"),
            run_id=header.get("run_id"),
            label=str(header.get("label", path.stem)),
            order=int(header.get("order", 0)),
            operations=len(lines) - 1,
            metric_values=metrics,
        )


def _header(path: Path, lines: list[str]) -> dict:
    try:
        header = json.loads(lines[0]) if lines else {}
    except json.JSONDecodeError:
        header = {}
    if not isinstance(header, dict) or header.get(UNSENT_FORMAT) != 1:
        raise ValueError(f"{path} is not a neve_tune unsent-operations file.")
    return header


def replay_unsent(
    path: str | os.PathLike[str], *, tracking_uri: str | None = None, remove: bool = False
) -> str | None:
    """Send the operations a logger saved to ``path`` when MLflow was unreachable at the end of its run.

    Operations go out in order. If one fails, the file is rewritten to hold only the ones not sent yet (and
    the run id, once created), so replaying it again later resumes where this attempt stopped.

    Args:
        path: the ``.jsonl`` file named in the warning.
        tracking_uri: override the store recorded in the file.
        remove: delete the file (and its ``.artifacts`` folder) once everything was sent.

    Returns:
        The run id the operations went to.

    Raises:
        ValueError: ``path`` is not such a file.
        Exception: whatever MLflow raises if the store is still unreachable (nothing is lost: the file stays).
    """
    path = Path(path)
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    header = _header(path, lines)
    outbox = RunOutbox(
        tracking_uri or header["tracking_uri"],
        header.get("experiment_id"),
        experiment_name=header.get("experiment_name"),
        run_id=header.get("run_id"),
        label=header.get("label", "run"),
        order=int(header.get("order", 0)),
        warn=False,
    )
    for i, line in enumerate(lines[1:]):
        entry = json.loads(line)
        data = entry["data"]
        if entry["kind"] == "batch" and "metrics" in data:
            data["metrics"] = [(k, float(v), ts, s) for k, v, ts, s in data["metrics"]]
        try:
            op_handler(entry["kind"], entry.get("module"))
            outbox.execute(Op(entry["kind"], data))
        except BaseException:
            if i > 0 or outbox.run_id != header.get("run_id"):
                rest = {**header, "run_id": outbox.run_id, "experiment_id": outbox.experiment_id}
                write_lines(path, [json.dumps(rest), *lines[1 + i :]])
            raise
    if remove:
        remove_unsent(path)
    return outbox.run_id


def unsent_files(folder: str | os.PathLike[str]) -> list[UnsentFile]:
    """The unsent-operations files in ``folder`` (or ``folder`` itself, a file), in replay order.

    Raises:
        ValueError: ``folder`` does not exist.
    """
    folder = Path(folder)
    if folder.is_file():
        return [UnsentFile.read(folder)]
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder of unsent MLflow records (it does not exist).")
    found = []
    for path in sorted(folder.glob("*.jsonl")):
        try:
            found.append(UnsentFile.read(path))
        except (ValueError, KeyError, OSError):
            continue  # not one of ours
    return sorted(found, key=lambda f: (f.order, f.path.name))


def describe_unsent(files: Sequence[UnsentFile]) -> str:
    """E.g. ``"3 run(s): 12 record batch(es), 340 metric value(s)"``."""
    ops = sum(f.operations for f in files)
    metrics = sum(f.metric_values for f in files)
    return f"{len(files)} run(s): {ops} record batch(es), {metrics} metric value(s)"


def replay_command(folder: str | os.PathLike[str], tracking_uri: str | None = None) -> str:
    """The shell command that replays ``folder`` later."""
    command = f"neve-tune mlflow replay {shlex.quote(str(folder))}"
    return command + (f" --tracking-uri {shlex.quote(tracking_uri)}" if tracking_uri else "")


@dataclass
class ReplayReport:
    """What :func:`replay_folder` sent, what is left and why.

    ``left`` holds the files still there (re-read: a file stopped half-way counts only what is left).
    ``errors`` maps a file to the error that stopped it: an outage (``outage`` is then True) stops the whole
    replay, the files after it are left untried; a permanent error (MLflow refused an operation, or the file
    is malformed) skips that file only (it is then in ``refused``).
    """

    folder: Path
    sent: list[UnsentFile] = field(default_factory=list)
    left: list[UnsentFile] = field(default_factory=list)
    errors: dict[Path, str] = field(default_factory=dict)
    refused: list[Path] = field(default_factory=list)
    outage: bool = False

    @property
    def complete(self) -> bool:
        """Everything was sent."""
        return not self.left

    def summary(self) -> str:
        """A few lines for people: what was sent, what is left, and the command to send the rest."""
        out = [f"Sent {describe_unsent(self.sent)} from {self.folder}."] if self.sent else []
        if not self.left:
            out.append(f"Nothing {'is left ' if self.sent else ''}to send in {self.folder}.")
            return "\n".join(out)
        out.append(f"Still unsent in {self.folder}: {describe_unsent(self.left)}.")
        out += [f"  {path.name}: {error}" for path, error in self.errors.items()]
        out.append(f"Send them when MLflow answers again: {replay_command(self.folder)}")
        return "\n".join(out)


def replay_files(
    files: Sequence[UnsentFile], *, folder: str | os.PathLike[str], tracking_uri: str | None = None
) -> ReplayReport:
    """Replay ``files`` in order (see :class:`ReplayReport`), deleting each one once it is sent."""
    report = ReplayReport(Path(folder))
    for unsent in files:
        try:
            replay_unsent(unsent.path, tracking_uri=tracking_uri, remove=True)
        except Exception as err:
            report.errors[unsent.path] = f"{type(err).__name__}: {str(err)[:300]}"
            if is_permanent(err) or isinstance(err, (ValueError, KeyError)):  # refused, or a malformed file
                report.refused.append(unsent.path)
                continue
            report.outage = True
            break  # an outage: the files after this one stay for a later try
        report.sent.append(unsent)
    report.left = sorted(
        [UnsentFile.read(f.path) for f in files if f.path.exists()], key=lambda f: (f.order, f.path.name)
    )
    return report


def replay_folder(folder: str | os.PathLike[str], *, tracking_uri: str | None = None) -> ReplayReport:
    """Send every unsent-operations file in ``folder`` (trial runs first), deleting each one once it is sent.

    Stops at the first outage (the rest stays for a later try); skips a file MLflow refuses. Files that are
    not neve_tune's are left alone.

    Args:
        folder: e.g. ``neve_results/mlflow-unsent`` (or one ``.jsonl`` file).
        tracking_uri: send to this store instead of the one each file records.

    Raises:
        ValueError: ``folder`` does not exist.
    """
    where = Path(folder)
    files = unsent_files(where)
    return replay_files(files, folder=where if where.is_dir() else where.parent, tracking_uri=tracking_uri)
