"""`load_study` reads every run of a study from a real SQLite MLflow store, page by page, histories in bulk."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("mlflow")


def _study_tree(uri: str, trials: int, epochs: int) -> dict[int, list[tuple[int, float]]]:
    """A study run, one arm run and ``trials`` trial runs, written the way `run_study` writes them.

    Trial ``i`` logs test/acc ``i + epoch / 100`` at each epoch; trial 0 logs epoch 2 twice (a restarted
    trial replays it: the second value counts) and one epoch past its stop tag (stopped from outside).
    Returns each config's expected test-accuracy curve.
    """
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(uri)
    exp = client.create_experiment("neve-tune-toy")
    study = client.create_run(exp, tags={"role": "study", "study": "toy", "arms": "fifo"}, run_name="toy-1")
    client.log_param(study.info.run_id, "seeds", "3")
    arm = client.create_run(
        exp, tags={"role": "arm", "arm": "fifo", "seed": "3", "mlflow.parentRunId": study.info.run_id}
    )
    client.log_batch(
        arm.info.run_id,
        metrics=[Metric("wall_time_s", 12.5, 0, 0)],
        params=[],
    )
    client.log_param(arm.info.run_id, "train_fraction", "0.9")
    client.log_param(arm.info.run_id, "max_epochs", str(epochs))
    expected: dict[int, list[tuple[int, float]]] = {}
    for i in range(trials):
        run = client.create_run(
            exp,
            tags={"mlflow.parentRunId": arm.info.run_id, "trial_id": f"t{i}", "neve/stop_reason": "max_t",
                  "neve/stop_epoch": str(epochs)},
        )  # fmt: skip
        client.log_param(run.info.run_id, "config_id", str(i))
        client.log_param(run.info.run_id, "lr", "0.1")
        steps = list(range(1, epochs + 1)) + ([epochs + 1] if i == 0 else [])
        metrics = [Metric("test/acc", i + e / 100, 1000 + e, e) for e in steps]
        metrics += [Metric("train/loss", 1.0 / e, 1000 + e, e) for e in steps]
        if i == 0:
            metrics.insert(2, Metric("test/acc", -1.0, 900, 2))  # the first try of epoch 2, replaced later
        client.log_batch(run.info.run_id, metrics=metrics)
        client.set_terminated(run.info.run_id, "FINISHED")
        expected[i] = [(e, i + e / 100) for e in range(1, epochs + 1)]
    return expected


def test_load_study_reads_every_page_and_every_history(tmp_path: Path) -> None:
    from neve_tune.studies import load_study

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    expected = _study_tree(uri, trials=7, epochs=4)
    for page_size in (2, None):  # 2: four pages of trial runs; None: MLflow's default page
        stored = load_study(uri, "neve-tune-toy", page_size=page_size)
        [arm] = stored.arms
        assert (stored.study, arm.arm, arm.seed, arm.max_epochs, arm.wall_time_s) == ("toy", "fifo", 3, 4, 12.5)
        assert [r.config_id for r in arm.records] == list(range(7))
        for record in arm.records:
            curve = expected[record.config_id]
            assert record.test_acc_curve == [(e, pytest.approx(v)) for e, v in curve]
            assert record.test_acc == pytest.approx(curve[-1][1])  # at the stop epoch, not the one past it
            assert record.metric("train/loss") == pytest.approx(1.0 / 4)
            assert (record.epochs, record.stop_reason, record.trial_id) == (4, "max_t", f"t{record.config_id}")
        assert [run.seed for run in stored.runs] == [3]


def test_load_study_refuses_a_page_size_below_one(tmp_path: Path) -> None:
    from neve_tune.studies import load_study

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _study_tree(uri, trials=1, epochs=1)
    with pytest.raises(ValueError, match="page_size must be >= 1, but got page_size=0"):
        load_study(uri, "neve-tune-toy", page_size=0)
