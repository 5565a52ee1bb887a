"""The `neve-tune` command line: help, version, clear errors that lose nothing, and the demo path.

The slow test runs `neve-tune study run digits` exactly as `make demo` does (a local Ray started by the
command, the default SQLite store `mlflow.db` in the working directory) on a tiny budget, then
`neve-tune study compare` on the same folder.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from neve_tune import __version__
from neve_tune.cli import EXIT_USAGE, main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"neve-tune {__version__}"
    with pytest.raises(SystemExit):
        main(["study", "run", "--help"])
    text = capsys.readouterr().out
    for option in ("--arms", "--trials", "--max-epochs", "--seed", "--tracking-uri", "--experiment", "--ray-address"):
        assert option in text
    for option in ("--backend", "--cpus-per-trial", "--gpus-per-trial"):
        assert option in text
    assert main([]) == EXIT_USAGE  # no command: help, usage status
    assert "study" in capsys.readouterr().out


def test_study_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["study", "list"]) == 0
    out = capsys.readouterr().out
    for name in ("digits", "cifar10", "cifar100", "imagenet100"):
        assert name in out


def test_unknown_study_lists_the_known_ones_and_creates_nothing(
    in_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["study", "run", "digitz"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "neve-tune: error: Unknown study 'digitz'. Known studies: cifar10, cifar100, digits, imagenet100" in err
    assert list(in_tmp.iterdir()) == []


def test_bad_tracking_uri_fails_before_any_training(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ray = pytest.importorskip("ray")
    ray_was_up = ray.is_initialized()
    port = _free_port()
    t0 = time.monotonic()
    assert main(["study", "run", "digits", "--tracking-uri", f"http://127.0.0.1:{port}"]) == EXIT_USAGE
    assert time.monotonic() - t0 < 15
    err = capsys.readouterr().err
    assert f"No MLflow server answers at 'http://127.0.0.1:{port}'" in err
    assert "--tracking-uri sqlite:///mlflow.db" in err  # says what to do instead
    assert main(["study", "run", "digits", "--tracking-uri", f"sqlite:///{in_tmp / 'no' / 'such' / 'dir.db'}"]) == 2
    assert "does not exist" in capsys.readouterr().err
    # Nothing was trained or written, and no Ray was started.
    assert list(in_tmp.iterdir()) == []
    assert ray.is_initialized() == ray_was_up


def test_bad_options_are_clear(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["study", "run", "digits", "--arms", "neve,hyperband"]) == EXIT_USAGE
    assert "Unknown arm 'hyperband'. The arms are: neve, asha, fifo." in capsys.readouterr().err
    assert main(["study", "run", "digits", "--cpus-per-trial", "0"]) == EXIT_USAGE
    assert "cpus_per_trial must be > 0" in capsys.readouterr().err
    assert main(["study", "compare"]) == EXIT_USAGE
    assert f"There is no MLflow store at sqlite:///{in_tmp / 'mlflow.db'}" in capsys.readouterr().err
    assert list(in_tmp.iterdir()) == []  # compare never creates a store
    uri = f"sqlite:///{in_tmp / 'other.db'}"
    from neve_tune.mlflow import check_tracking_uri

    check_tracking_uri(uri)  # an existing, empty store
    assert main(["study", "compare", "--experiment", "nothing-here", "--tracking-uri", uri]) == EXIT_USAGE
    assert "No MLflow experiment named 'nothing-here'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["study", "run", "digits", "--backend", "dask"])
    assert "invalid choice: 'dask'" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_command_with_the_default_sqlite_store_then_compare(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="200")
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "neve_tune.cli", "study", "run", "digits", "--trials", "2", "--max-epochs", "3"]
    run = subprocess.run(
        [*cmd, "--arms", "neve,fifo", "--no-progress"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert "digits: 2 trials x <= 3 epochs per arm, seed 0" in out
    assert "│ neve │" in out and "│ fifo │" in out
    # 3 epochs: inside NeVe's warm-up nothing converges, and the pick-rule line says so (issue 12).
    assert "pick rule, neve: no trial converged: picked the lowest final train loss among the 2 trials" in out
    assert f"MLflow: sqlite:///{tmp_path / 'mlflow.db'}" in out  # the embedded default, in the working directory

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("neve-tune-digits")
    runs = client.search_runs([exp.experiment_id])
    roles = sorted(r.data.tags["role"] for r in runs)
    assert roles == ["arm", "arm", "study", "trial", "trial", "trial", "trial"]
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert Path(exp.artifact_location.removeprefix("file://")).parent == tmp_path / "mlruns"

    compare = subprocess.run(
        [sys.executable, "-m", "neve_tune.cli", "study", "compare"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert compare.returncode == 0, compare.stderr[-3000:]
    # `compare` rebuilds exactly the table `run` wrote, from MLflow alone.
    [ran] = (tmp_path / "neve_results").glob("digits-*/comparison.md")
    [rebuilt] = (tmp_path / "neve_results").glob("compare-digits-*/comparison.md")
    assert rebuilt.read_text() == ran.read_text()
    assert (rebuilt.parent / "test_acc_vs_epochs.png").stat().st_size > 5000


def test_study_run_options_map_the_command_line() -> None:
    from neve_tune.cli import build_parser, study_options

    args = build_parser().parse_args(
        ["study", "run", "digits", "--trials", "3", "--arms", "neve,fifo", "--no-mlflow", "--mlflow-wait", "5"]
    )
    options = study_options(args)
    assert (options.trials, list(options.arms), options.track) == (3, ["neve", "fifo"], False)
    assert options.mlflow_drain_timeout_s == 5.0
    default = study_options(build_parser().parse_args(["study", "run", "digits"]))
    assert default.mlflow_drain_timeout_s == 60.0 and default.track and default.trials is None


def test_the_printed_mlflow_link_opens_the_runs_view() -> None:
    from neve_tune.cli import _ui_link

    assert _ui_link("http://127.0.0.1:5005/", "7") == "http://127.0.0.1:5005/#/experiments/7?workflowType=machine_learning"
    local = _ui_link("sqlite:///mlflow.db", "3")
    assert local.startswith("`mlflow ui --backend-store-uri sqlite:///mlflow.db`")
    assert local.endswith("/#/experiments/3?workflowType=machine_learning")
