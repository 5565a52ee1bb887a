"""The ``neve-tune`` command line.

``neve-tune study run STUDY`` runs NeVe against validation-based ASHA (and a FIFO compute reference) on
the same sampled configurations and prints the comparison; ``neve-tune study compare`` rebuilds that
table (and its plots) from MLflow; ``neve-tune study list`` lists the studies; ``neve-tune mlflow replay
FOLDER`` sends the MLflow records saved while the tracking server was unreachable.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from neve_tune.studies import StudyOptions

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class CLIError(Exception):
    """A user-facing error: printed as one message, exit status 2."""


def _version() -> str:
    from neve_tune import __version__

    return __version__


def _arms(text: str) -> list[str]:
    return [a for a in (x.strip() for x in text.split(",")) if a]


def _seeds(text: str) -> list[int]:
    """``--seeds 0,1,2`` (argparse reports a ValueError as an invalid value)."""
    seeds = [int(x) for x in (x.strip() for x in text.split(",")) if x]
    if not seeds:
        raise ValueError(text)
    return seeds


def _backends() -> list[str]:
    from neve_tune.studies import list_backends

    return list_backends()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neve-tune",
        description="NeVe (Neural Velocity): validation-free LR decay and early stopping, compared with "
        "validation-based ASHA on the same work.",
    )
    parser.add_argument("--version", action="version", version=f"neve-tune {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    study = commands.add_parser(
        "study",
        help="run and compare studies (NeVe vs ASHA vs FIFO)",
        description="Run a study's arms on the same configurations (`study run`), rebuild its table from MLflow "
        "(`study compare`), or list the studies (`study list`).",
    )
    study.set_defaults(print_command_help=study.print_help)  # `neve-tune study` alone: this help
    study_commands = study.add_subparsers(dest="study_command", metavar="SUBCOMMAND")

    run = study_commands.add_parser(
        "run",
        help="run a study's arms and print the comparison table",
        description="Run every arm on the same sampled configurations, trial count, seed and epoch cap, "
        "track it in MLflow and print the comparison table.",
    )
    run.add_argument("study", metavar="STUDY", help="a study name (see `neve-tune study list`) or module:DEFINITION")
    run.add_argument(
        "--arms",
        type=_arms,
        default=None,
        help="comma-separated arms among neve, asha, fifo, the optional neve-pure and schedulefree and any "
        "registered ones (default: neve,asha,fifo)",
    )
    run.add_argument("--trials", type=int, default=None, help="configurations per arm (default: the study's)")
    run.add_argument("--max-epochs", type=int, default=None, help="epoch cap of every trial (default: the study's)")
    seeds = run.add_mutually_exclusive_group()
    # default None, not 0: argparse sees `--seed 0` as "not given" when it is the default object, and would let
    # `--seed 0 --seeds 1,2` through while refusing `--seed 3 --seeds 1,2`.
    seeds.add_argument(
        "--seed", type=int, default=None, help="seed of the configurations, splits and inits (default 0)"
    )
    seeds.add_argument(
        "--seeds",
        type=_seeds,
        default=None,
        metavar="S1,S2,...",
        help="repeat the study once per seed (e.g. 0,1,2); the table reports each arm's mean and spread over them",
    )
    run.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in this folder)",
    )
    run.add_argument("--experiment", default=None, help="MLflow experiment name (default: neve-tune-STUDY)")
    run.add_argument("--no-mlflow", action="store_true", help="do not track in MLflow (table and files only)")
    run.add_argument(
        "--mlflow-wait",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="at the end, how long to retry an unreachable MLflow store for unsent records (default 60)",
    )
    run.add_argument(
        "--ray-address", default=None, help="Ray cluster address, e.g. auto (default: start a local Ray; --backend ray)"
    )
    run.add_argument("--backend", choices=_backends(), default="ray", help="tuning backend (default: ray)")
    run.add_argument("--cpus-per-trial", type=float, default=None, help="CPUs per trial (default: the study's)")
    run.add_argument("--gpus-per-trial", type=float, default=None, help="GPUs per trial (default: the study's)")
    run.add_argument("--data-root", default=None, help="dataset folder (download target for CIFAR)")
    run.add_argument("--num-workers", type=int, default=0, help="DataLoader workers per trial (default 0)")
    run.add_argument(
        "--output-dir", default="neve_results", help="where Ray results, tables and plots go (default: neve_results)"
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bars")

    compare = study_commands.add_parser(
        "compare",
        help="print the comparison table of a study tracked in MLflow and write its plots",
        description="Rebuild the comparison table of the latest study run of an MLflow experiment.",
    )
    compare.add_argument("study", metavar="STUDY", nargs="?", default="digits", help="study name (default: digits)")
    compare.add_argument("--experiment", default=None, help="MLflow experiment (default: neve-tune-STUDY)")
    compare.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default as for `study run`)")
    compare.add_argument("--run-id", default=None, help="a specific study run id (default: the latest)")
    compare.add_argument(
        "--output-dir", default="neve_results", help="where the plots and tables go (default: neve_results)"
    )

    study_commands.add_parser("list", help="list the known studies")

    mlflow_parser = commands.add_parser("mlflow", help="MLflow utilities (send records saved during an outage)")
    mlflow_commands = mlflow_parser.add_subparsers(dest="mlflow_command", metavar="SUBCOMMAND", required=True)
    replay = mlflow_commands.add_parser(
        "replay",
        help="send the records that trials and studies saved while MLflow was unreachable",
        description="Send every mlflow-unsent-*.jsonl file of FOLDER (trial runs first), deleting each file "
        "once it is sent. Stops at the first outage: run it again when the server answers.",
    )
    replay.add_argument("folder", metavar="FOLDER", help="e.g. neve_results/mlflow-unsent (or one .jsonl file)")
    replay.add_argument(
        "--tracking-uri", default=None, help="send to this MLflow store instead of the one each file records"
    )
    return parser


def _quiet_libraries() -> None:
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    for name in ("mlflow", "alembic", "ray", "ray.tune", "ray.train", "optuna"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def _console() -> Any:
    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # piped or logged: do not squeeze the table into 80 columns
        console = Console(width=160)
    return console


def cmd_list(args: argparse.Namespace) -> int:
    from neve_tune.studies import get_study, list_studies

    console = _console()
    names = list_studies()
    width = max(map(len, names), default=0)
    for name in names:
        try:
            definition = get_study(name)
            b = definition.budget
            console.print(
                f"[bold]{name:{width}s}[/bold] {definition.description} "
                f"[dim](default: {b.trials} trials x <= {b.max_epochs} epochs)[/dim]"
            )
        except ImportError as err:
            console.print(f"[bold]{name:{width}s}[/bold] [red]unavailable: {err}[/red]")
    return 0


def study_options(args: argparse.Namespace, console: Any = None) -> StudyOptions:
    """The :class:`neve_tune.studies.StudyOptions` of a parsed ``study run`` command line."""
    from neve_tune.studies import StudyOptions, get_backend

    arms = {} if args.arms is None else {"arms": args.arms}  # None: the default arms
    backend: Any = args.backend
    if args.ray_address is not None:
        if args.backend != "ray":
            raise CLIError(f"--ray-address is an option of the ray backend, but --backend is {args.backend}.")
        ray_backend: Any = get_backend("ray")  # its own options: RayBackend(address=..., callbacks=...)
        backend = ray_backend(address=args.ray_address)
    return StudyOptions(
        trials=args.trials,
        max_epochs=args.max_epochs,
        seed=0 if args.seed is None else args.seed,
        seeds=args.seeds,
        tracking_uri=args.tracking_uri,
        experiment=args.experiment,
        track=not args.no_mlflow,
        mlflow_drain_timeout_s=args.mlflow_wait,
        backend=backend,
        cpus_per_trial=args.cpus_per_trial,
        gpus_per_trial=args.gpus_per_trial,
        data_root=args.data_root,
        num_workers=args.num_workers,
        output_dir=args.output_dir,
        progress=not args.no_progress,
        console=console,
        **arms,
    )


def cmd_run(args: argparse.Namespace) -> int:
    from neve_tune.studies import run_study

    console = _console()
    started = time.perf_counter()
    result = run_study(args.study, study_options(args, console))
    console.print()
    _print_tables(console, result.runs, result.seed_title, result.title)
    console.print(
        "  test accuracy is reported only; no arm sees it. 'train data': fraction of the labelled "
        "(non-test) data the arm trains on."
    )
    console.print(f"\nTables and plots: {result.output_dir}")
    if result.tracking_uri:
        console.print(
            f"MLflow: {result.tracking_uri} - experiment id {result.experiment_id}, study run {result.study_run_id}."
        )
        console.print(f"  runs: {_ui_link(result.tracking_uri, result.experiment_id)}")
    console.print(f"Done in {time.perf_counter() - started:.0f} s.")
    for failure in result.failures:
        print(f"neve-tune: error: {failure}", file=sys.stderr)
    return EXIT_FAILED if result.failures else 0


def _ui_link(tracking_uri: str, experiment_id: str | None) -> str:
    """Where to see the runs: the server's page, or how to start ``mlflow ui`` on a local store, with the
    URL parameter that makes MLflow 3's UI open on the runs table rather than its GenAI overview."""
    from neve_tune.mlflow import experiment_ui_url

    if tracking_uri.startswith(("http://", "https://")):
        return experiment_ui_url(tracking_uri, str(experiment_id))
    page = experiment_ui_url("http://127.0.0.1:5000", str(experiment_id))
    return f"`mlflow ui --backend-store-uri {tracking_uri}`, then {page}"


def cmd_compare(args: argparse.Namespace) -> int:
    from neve_tune.studies import load_study, write_study_outputs

    console = _console()
    experiment = args.experiment or f"neve-tune-{args.study}"
    stored = load_study(args.tracking_uri, experiment, study_run_id=args.run_id)
    if not stored.arms:
        raise CLIError(f"The study run {stored.study_run_id} of {experiment!r} has no arm runs.")
    runs = stored.runs
    folder = Path(args.output_dir) / f"compare-{stored.study_run_name}"
    files = write_study_outputs(folder, runs)
    title = f"{stored.study} - study run {stored.study_run_name} ({stored.status})"
    _print_tables(console, runs, lambda run: f"{title}, seed {run.seed}", title)
    if stored.missing:
        left_out = ", ".join(f"seed {seed} ({arm})" for seed, arm in stored.missing)
        console.print(f"  left out, no trial ran (the study run ended {stored.status}): {left_out}")
    shown = sorted(name for name in files if "/" not in name)
    console.print(f"\nTables and plots: {folder.resolve()} ({', '.join(shown)})")
    return 0


def _print_tables(console: Any, runs: Sequence[Any], seed_title: Any, title: str) -> None:
    """Each seed's table with its pick rules, then (several seeds) the table over seeds."""
    from neve_tune.studies import comparison_table, seeds_table

    for run in runs:
        console.print(comparison_table(run.summaries, title=title if len(runs) == 1 else seed_title(run)))
        for summary in run.summaries:
            console.print(f"  pick rule, [bold]{summary.arm}[/bold]: {summary.pick_rule}")
    if len(runs) > 1:
        console.print()
        console.print(seeds_table(runs, title=f"{title}: mean ± std over the seeds"))


def cmd_mlflow_replay(args: argparse.Namespace) -> int:
    """``neve-tune mlflow replay FOLDER``: 0 when everything was sent, 1 when something is left."""
    _quiet_libraries()
    from neve_tune.mlflow._replay import replay_folder
    from neve_tune.mlflow._uri import resolve_tracking_uri

    try:
        uri = resolve_tracking_uri(args.tracking_uri) if args.tracking_uri else None
        report = replay_folder(args.folder, tracking_uri=uri)
    except (ValueError, ImportError) as err:
        print(f"neve-tune: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    print(report.summary())
    return 0 if report.complete else 1


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (``timeout``, job schedulers) handled as Ctrl-C: the SIGINT handler in place runs (Ray Tune's
    graceful stop, or Python's ``KeyboardInterrupt``), so open MLflow runs end KILLED, not FAILED."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler):
            handler(signal.SIGINT, frame)
        else:  # SIGINT ignored (a background job): still stop like Ctrl-C
            raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``neve-tune`` console script; returns the exit status: 0, 1 when an arm of
    ``study run`` had every trial fail (after the table), 2 for a usage or setup error, 130 on Ctrl-C."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "mlflow":
        return cmd_mlflow_replay(args)
    if args.command != "study" or getattr(args, "study_command", None) is None:
        # No command: the top-level help; `neve-tune study` alone: the study command's help (usage status).
        getattr(args, "print_command_help", parser.print_help)()
        return EXIT_USAGE
    _quiet_libraries()
    from neve_tune.mlflow import TrackingUnavailableError
    from neve_tune.studies import StudyError, UnknownStudyError

    handlers = {"run": cmd_run, "compare": cmd_compare, "list": cmd_list}
    try:
        with _sigterm_as_interrupt():
            return handlers[args.study_command](args)
    except (UnknownStudyError, StudyError, TrackingUnavailableError, CLIError, ValueError) as err:
        print(f"neve-tune: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except ImportError as err:
        print(f"neve-tune: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("neve-tune: interrupted; open MLflow runs were ended KILLED.", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
