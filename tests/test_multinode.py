"""A real two-node Ray cluster on this machine, started with ``ray start``, running a tiny NeVe study.

How the cluster is built (Ray 2.60):

* ``ray start --head --block`` and ``ray start --address=HEAD --block`` run as two child processes of
  this test, each in its own process session, on free ports, sharing one fresh ``--temp-dir``. Each node
  gets ``--num-cpus=1`` and one custom resource (``neve_head`` / ``neve_worker``), so the placement of
  every trial is known in advance.
* Token authentication stays on. The test generates a token and gives every node and the client the same
  ``RAY_AUTH_TOKEN``, plus ``RAY_AUTH_MODE=token``: without that variable a joining node or a client
  runs in mode "disabled" and is refused with ``InvalidAuthToken``. A client holding the wrong token is
  shown to be refused as well. Nothing is written to ``~/.ray``.
* ``ray start`` resolves a loopback ``--node-ip-address`` to the machine's own address
  (``services.resolve_ip_for_localhost``), so the nodes register under that address; the client still
  connects with ``127.0.0.1:PORT``.
* The study's driver (``ray.init(address=...)`` then ``tune.Tuner``) runs in a child Python process, so
  the token and Ray's process-wide client state never leak into the pytest process or other tests.
* Teardown never calls ``ray stop`` (it kills every Ray process of the machine by name). It sends
  SIGTERM to the two ``ray start --block`` processes, which shut down their own node processes; then it
  checks that no process referring to this test's temp dir is left, and kills any leftover by pid.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]  # its own Ray nodes, started with `ray start`

REPO = Path(__file__).resolve().parents[1]
HEAD_RESOURCE = "neve_head"
WORKER_RESOURCE = "neve_worker"
LRS = (0.1,)  # one trial per node: a single wave of training on the two 1-CPU nodes
MAX_EPOCHS = 12
STOP_THRESHOLD = 5e-3
START_TIMEOUT_S = 60.0


def _ray_cli() -> str:
    """The ``ray`` console script of the interpreter running the tests."""
    candidate = Path(sys.executable).with_name("ray")
    if candidate.exists():
        return str(candidate)
    found = shutil.which("ray")
    if found is None:
        pytest.fail("the `ray` command was not found - please install with `pip install neve_tune[ray]`")
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _pids_referring_to(text: str) -> list[int]:
    """Pids of live processes whose command line contains ``text`` (our temp dir: only our processes)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            pids.append(int(entry.name))
    return pids


@dataclass
class RayNodes:
    """The two ``ray start`` processes of the test cluster and how to reach them."""

    address: str
    env: dict[str, str]
    temp_dir: Path
    head: subprocess.Popen[bytes]
    worker: subprocess.Popen[bytes]
    head_log: Path
    worker_log: Path

    def logs(self) -> str:
        return f"--- head log ---\n{_tail(self.head_log)}\n--- worker log ---\n{_tail(self.worker_log)}"


def _stop(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """SIGTERM one ``ray start --block`` process (it stops its own node), then SIGKILL its group if stuck."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session (start_new_session): only this node
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def ray_nodes() -> Iterator[RayNodes]:
    ray = _ray_cli()
    temp_dir = Path(tempfile.mkdtemp(prefix="neve-mn-", dir="/tmp"))  # short: Ray's unix sockets live here
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
    )
    port = _free_port()
    address = f"127.0.0.1:{port}"
    common = ["--block", "--num-cpus=1", "--object-store-memory=100000000", f"--temp-dir={temp_dir}"]
    head_log, worker_log = temp_dir / "head.log", temp_dir / "worker.log"

    def start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            return subprocess.Popen(
                [ray, "start", *args, *common],
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    head = start(
        [
            "--head",
            f"--port={port}",
            "--include-dashboard=false",
            f"--dashboard-port={_free_port()}",
            f"--dashboard-agent-listen-port={_free_port()}",
            "--disable-usage-stats",
            f"--resources={json.dumps({HEAD_RESOURCE: 1})}",
        ],
        head_log,
    )
    worker = None
    try:
        # `ray start` writes the cluster address into the temp dir once the head is up.
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (temp_dir / "ray_current_cluster").exists():
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the Ray head did not start (rc={head.poll()}):\n{_tail(head_log)}")
            time.sleep(0.5)
        worker = start(
            [
                f"--address={address}",
                f"--dashboard-agent-listen-port={_free_port()}",
                f"--resources={json.dumps({WORKER_RESOURCE: 1})}",
            ],
            worker_log,
        )
        yield RayNodes(address, env, temp_dir, head, worker, head_log, worker_log)
    finally:
        if worker is not None:
            _stop(worker)
        _stop(head)
        deadline = time.monotonic() + 15
        while _pids_referring_to(str(temp_dir)) and time.monotonic() < deadline:
            time.sleep(0.5)
        leftover = _pids_referring_to(str(temp_dir))
        for pid in leftover:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not leftover, f"Ray processes outlived their `ray start` parent and were killed: {leftover}"


# ----------------------------------------------------------------------------------------------------------
# The tiny study. Both functions run in other processes: the driver in a child Python, the trainable in
# Ray workers on either node (they import this module by name; PYTHONPATH carries the repo root).


def train_digits(config: dict[str, Any]) -> None:
    """One trial: a small DigitsCNN trained on 100% of the digits training split, NeVe decides LR and stop."""
    import ray
    import torch
    from ray import tune

    from neve_tune import NeVe, noise_aux
    from neve_tune.studies.builtin.digits import INPUT_SHAPE, DigitsCNN, load_digits_splits

    torch.set_num_threads(1)
    torch.manual_seed(config["seed"])
    data = load_digits_splits(seed=0)
    model = DigitsCNN(width=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=0.9)
    neve = NeVe(model, optimizer, noise_aux(INPUT_SHAPE, n=100, seed=0), patience=2, stop_threshold=STOP_THRESHOLD)
    where = {
        "node_id": ray.get_runtime_context().get_node_id(),
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
    }
    gen = torch.Generator().manual_seed(config["seed"])
    for _ in range(MAX_EPOCHS):
        model.train()
        order = torch.randperm(len(data.y_train), generator=gen)
        total = 0.0
        for start in range(0, len(order), 64):
            batch = order[start : start + 64]
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(data.x_train[batch]), data.y_train[batch])
            loss.backward()
            optimizer.step()
            total += float(loss) * len(batch)
        step = neve.step()
        model.eval()
        with torch.no_grad():
            test_acc = float((model(data.x_test).argmax(1) == data.y_test).float().mean())
        tune.report({**neve.metrics(), "train_loss": total / len(order), "test_acc": test_acc, **where})
        if step.should_stop:
            break


def run_study(address: str, storage: str, out: str) -> None:
    """Driver: connect to the cluster, run one trial per LR and node, write what happened as JSON."""
    import ray
    from ray import tune

    ray.init(address=address, log_to_driver=False)
    deadline = time.monotonic() + START_TIMEOUT_S
    while len([n for n in ray.nodes() if n["Alive"]]) < 2:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(ray.nodes())} Ray node(s) joined in {START_TIMEOUT_S:.0f} s")
        time.sleep(0.5)
    nodes = {
        n["NodeID"]: sorted(k for k in n["Resources"] if k in (HEAD_RESOURCE, WORKER_RESOURCE))
        for n in ray.nodes()
        if n["Alive"]
    }
    trainable = tune.with_resources(
        train_digits, lambda config: tune.PlacementGroupFactory([{"CPU": 1, config["node"]: 1}])
    )
    tuner = tune.Tuner(
        trainable,
        param_space={
            "lr": tune.grid_search(list(LRS)),
            "node": tune.grid_search([HEAD_RESOURCE, WORKER_RESOURCE]),
            "seed": 0,
        },
        run_config=tune.RunConfig(storage_path=storage, name="multinode", verbose=0),
    )
    grid = tuner.fit()
    trials = []
    for result in grid:
        trial: dict[str, Any] = {
            "config": {k: result.config[k] for k in ("lr", "node")},
            "error": None if result.error is None else str(result.error)[-3000:],
        }
        if result.error is None:
            history = result.metrics_dataframe
            trial["last"] = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float, str))}
            trial["node_ids"] = sorted(set(history["node_id"]))
            trial["velocity"] = [float(v) for v in history["neve/model_velocity"]]
        trials.append(trial)
    Path(out).write_text(json.dumps({"nodes": nodes, "trials": trials}))
    ray.shutdown()


# ----------------------------------------------------------------------------------------------------------


def _ray_status(nodes: RayNodes, token: str) -> subprocess.CompletedProcess[str]:
    env = {**nodes.env, "RAY_AUTH_TOKEN": token}
    return subprocess.run(
        [_ray_cli(), "status", f"--address={nodes.address}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_wrong_token_is_refused(ray_nodes: RayNodes) -> None:
    refused = _ray_status(ray_nodes, secrets.token_hex(32))
    assert refused.returncode != 0, refused.stdout
    assert "InvalidAuthToken" in refused.stdout + refused.stderr


def test_neve_study_runs_on_both_nodes(ray_nodes: RayNodes) -> None:
    out = ray_nodes.temp_dir / "study.json"
    driver = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from tests.test_multinode import run_study; run_study(*sys.argv[1:])",
            ray_nodes.address,
            str(ray_nodes.temp_dir / "tune"),
            str(out),
        ],
        cwd=REPO,
        env=ray_nodes.env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert driver.returncode == 0, f"{driver.stderr[-4000:]}\n{ray_nodes.logs()}"
    report = json.loads(out.read_text())

    # Two live nodes, each holding exactly one of the placement resources.
    nodes: dict[str, list[str]] = report["nodes"]
    assert sorted(map(tuple, nodes.values())) == [(HEAD_RESOURCE,), (WORKER_RESOURCE,)]
    node_of = {resources[0]: node_id for node_id, resources in nodes.items()}

    trials = report["trials"]
    assert len(trials) == 2 * len(LRS)
    for trial in trials:
        assert trial["error"] is None, trial["error"]
        # Every epoch of the trial ran on the node that holds the resource it asked for.
        assert trial["node_ids"] == [node_of[trial["config"]["node"]]]
        last = trial["last"]
        # NeVe stopped the trial itself: velocity under the threshold before the epoch cap, no divergence.
        assert last["neve/converged"] == 1.0 and last["neve/diverged"] == 0.0
        assert last["neve/epoch"] < MAX_EPOCHS
        assert last["neve/model_velocity"] < STOP_THRESHOLD <= min(trial["velocity"][:-1])
        assert all(math.isfinite(v) and v > 0 for v in trial["velocity"])
        assert last["test_acc"] > 0.9
    # Trials really ran on both nodes (in different worker processes), on this one host.
    assert {t["last"]["node_id"] for t in trials} == set(nodes)
    assert len({t["last"]["hostname"] for t in trials}) == 1
    pids = {n: {t["last"]["pid"] for t in trials if t["config"]["node"] == n} for n in node_of}
    assert pids[HEAD_RESOURCE].isdisjoint(pids[WORKER_RESOURCE])
    # The same seed and config give the same velocities on either node.
    for lr in LRS:
        on_head, on_worker = (
            next(t for t in trials if t["config"] == {"lr": lr, "node": node})
            for node in (HEAD_RESOURCE, WORKER_RESOURCE)
        )
        assert on_head["velocity"] == pytest.approx(on_worker["velocity"], rel=1e-6)
