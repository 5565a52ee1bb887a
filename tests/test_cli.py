"""The `neve-tune` command line: help, version, clear errors that lose nothing, and the demo path.

The slow test runs `neve-tune study run digits` as `make demo` does (the default SQLite store `mlflow.db` in
the working directory) on a tiny budget, in this process on the session's Ray, then `neve-tune study compare`
on the same folder in a fresh process. A command that starts its own Ray is run by the SIGTERM tests
(`test_reliability.py`, cases 17 and 18).
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
from neve_tune.cli import EXIT_USAGE, CLIError, main

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


def test_study_alone_prints_the_study_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["study"]) == EXIT_USAGE  # as `neve-tune` alone: the help, usage status
    out = capsys.readouterr().out
    assert out.startswith("usage: neve-tune study [-h] SUBCOMMAND")
    for sub in ("run", "compare", "list"):
        assert f"\n    {sub} " in out
    assert "mlflow" not in out  # not the top-level help


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
    err = capsys.readouterr().err
    assert "Unknown arm 'hyperband'. The arms are: neve, asha, fifo" in err and "schedulefree" in err
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
def test_demo_command_with_the_default_sqlite_store_then_compare(
    ray_session: object, in_tmp: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    tmp_path = in_tmp
    monkeypatch.setenv("COLUMNS", "200")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    argv = ["study", "run", "digits", "--trials", "2", "--max-epochs", "3", "--arms", "neve,fifo", "--no-progress"]
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    assert "digits: 2 trials x <= 3 epochs per arm, seed 0" in out
    assert "│ neve │" in out and "│ fifo │" in out
    # 3 epochs: inside NeVe's warm-up nothing converges; the pick-rule line says what the rule did with the
    # records (issue 12), the same line as the arm's own rule gives on the records MLflow holds.
    from neve_tune.studies import load_study, summarize_arm

    stored = {a.arm: a for a in load_study(f"sqlite:///{tmp_path / 'mlflow.db'}", "neve-tune-digits").arms}
    assert "converged" not in {r.stop_reason for r in stored["neve"].records}
    line = f"pick rule, neve: {summarize_arm(stored['neve']).pick_rule}"
    assert " ".join(line.split()) in " ".join(out.split())  # (rich may wrap a long line)
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


def test_a_gpu_trial_on_a_machine_without_one_is_refused_first(
    in_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    ray = pytest.importorskip("ray")
    ray_was_up = ray.is_initialized()
    for backend in ("ray", "optuna"):
        t0 = time.monotonic()
        assert main(["study", "run", "digits", "--gpus-per-trial", "1", "--backend", backend]) == EXIT_USAGE
        assert time.monotonic() - t0 < 5
        err = capsys.readouterr().err
        assert "Each trial asks for 1 GPU(s), but this machine has 0" in err
        assert "Pass --gpus-per-trial 0 to train on CPUs" in err
    assert list(in_tmp.iterdir()) == []  # no mlflow.db, no results folder
    assert ray.is_initialized() == ray_was_up  # no Ray was started


def test_an_unknown_tracking_scheme_is_refused_in_plain_words(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["study", "run", "digits"], ["study", "compare"]):
        assert main([*argv, "--tracking-uri", "ftp://x"]) == EXIT_USAGE
        err = capsys.readouterr().err
        assert "Cannot track in 'ftp://x': MLflow has no tracking store for the scheme 'ftp'" in err
        assert "--tracking-uri sqlite:///mlflow.db" in err and "registry" not in err
    assert list(in_tmp.iterdir()) == []
    from neve_tune.studies._options import check_tracking_scheme

    for uri in ("sqlite:///a.db", "mysql+pymysql://u@h/db", "postgresql://h/db", "https://h", "file:///x", "mlruns"):
        check_tracking_scheme(uri)  # what MLflow itself accepts passes


def test_compare_with_an_unknown_run_id_says_what_exists(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{in_tmp / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("neve-tune-digits")
    study = client.create_run(exp, tags={"role": "study", "study": "digits"}, run_name="digits-20260101-000000")
    other = client.create_run(exp, tags={"role": "arm"}, run_name="neve")
    assert main(["study", "compare", "digits", "--run-id", "deadbeef", "--tracking-uri", uri]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"No MLflow run has the id 'deadbeef' at {uri}." in err
    assert f"The latest study runs of 'neve-tune-digits': {study.info.run_id} (digits-20260101-000000, RUNNING)" in err
    assert "Leave out --run-id for the latest one" in err
    assert main(["study", "compare", "--run-id", other.info.run_id, "--tracking-uri", uri]) == EXIT_USAGE
    assert (
        f"The run '{other.info.run_id}' is not a study run of the experiment 'neve-tune-digits' (it is an arm run)"
        in capsys.readouterr().err
    )


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
    assert default.seed_list == (0,)
    seeds = study_options(build_parser().parse_args(["study", "run", "digits", "--seeds", "0, 1,2"]))
    assert seeds.seed_list == (0, 1, 2)
    assert study_options(build_parser().parse_args(["study", "run", "digits", "--seed", "7"])).seed_list == (7,)
    assert default.backend == "ray"  # by name: the backend's defaults (a local Ray)
    ray = study_options(build_parser().parse_args(["study", "run", "digits", "--ray-address", "auto"])).backend
    assert (ray.name, ray.address, ray.runs_here) == ("ray", "auto", False)  # a Ray option lives on the backend
    with pytest.raises(CLIError, match="--ray-address is an option of the ray backend, but --backend is optuna"):
        study_options(
            build_parser().parse_args(["study", "run", "digits", "--ray-address", "auto", "--backend", "optuna"])
        )


def test_seed_and_seeds_are_exclusive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["study", "run", "digits", "--seed", "1", "--seeds", "0,1"])
    assert exit_info.value.code == EXIT_USAGE
    assert "argument --seeds: not allowed with argument --seed" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["study", "run", "digits", "--seeds", "0,x"])
    assert "argument --seeds: invalid _seeds value: '0,x'" in capsys.readouterr().err


def test_the_printed_mlflow_link_opens_the_runs_view() -> None:
    from neve_tune.cli import _ui_link

    assert (
        _ui_link("http://127.0.0.1:5005/", "7") == "http://127.0.0.1:5005/#/experiments/7?workflowType=machine_learning"
    )
    local = _ui_link("sqlite:///mlflow.db", "3")
    assert local.startswith("`mlflow ui --backend-store-uri sqlite:///mlflow.db`")
    assert local.endswith("/#/experiments/3?workflowType=machine_learning")
