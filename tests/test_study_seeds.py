"""Studies over several seeds: the spread per arm, its table and plot, the MLflow tree, and `study compare`.

The slow test runs a real tiny study (digits, Optuna backend, 2 seeds x 2 arms x 3 trials x 3 epochs) into
a SQLite store, checks that the table over seeds holds exactly the mean, sample std and min-max of the
per-seed rows, and that `neve-tune study compare` rebuilds the same tables from MLflow alone.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from neve_tune.studies import ArmResult, StudyError, StudyOptions, TrialRecord, comparison_markdown, summarize_arm
from neve_tune.studies._options import check_seeds
from neve_tune.studies._seeds import SeedRun, Spread, seeds_csv, seeds_markdown, summarize_over_seeds


def _arm(arm: str, accs: list[float], epochs: list[int], wall: float) -> ArmResult:
    records = [
        TrialRecord(arm, i, {"config_id": i}, e, "max_t", {"test/acc": a, "val/acc": a, "train/loss": 1 - a})
        for i, (a, e) in enumerate(zip(accs, epochs, strict=True))
    ]
    return ArmResult(arm, records, wall_time_s=wall, train_fraction=0.9, max_epochs=10)


def _seed_run(seed: int, fifo: ArmResult, asha: ArmResult) -> SeedRun:
    arms = {"asha": asha, "fifo": fifo}
    return SeedRun(seed, arms, [summarize_arm(a) for a in arms.values()])


def test_spread_is_mean_sample_std_and_range_of_the_finite_values() -> None:
    s = Spread((0.9, math.nan, 0.8, 0.7))
    assert s.mean == pytest.approx(0.8) and s.std == pytest.approx(0.1)  # ddof 1: sqrt(0.02 / 2)
    assert (s.min, s.max) == (0.7, 0.9)
    assert s.text(3) == "0.800 ± 0.100" and s.range_text(2) == "0.70-0.90"
    one = Spread((0.5,))
    assert one.mean == 0.5 and math.isnan(one.std) and one.text(2) == "0.50 ± nan"
    empty = Spread((math.nan,))
    assert all(math.isnan(x) for x in (empty.mean, empty.std, empty.min, empty.max))


def test_the_table_over_seeds_is_the_spread_of_each_seeds_row() -> None:
    runs = [
        _seed_run(0, _arm("fifo", [0.90, 0.95], [10, 10], 30.0), _arm("asha", [0.92, 0.50], [10, 2], 12.0)),
        _seed_run(1, _arm("fifo", [0.80, 0.85], [10, 10], 34.0), _arm("asha", [0.70, 0.96], [4, 10], 16.0)),
        _seed_run(2, _arm("fifo", [0.97, 0.60], [10, 10], 32.0), _arm("asha", [0.93, 0.10], [10, 4], 14.0)),
    ]
    over = {a.arm: a for a in summarize_over_seeds(runs)}
    assert list(over) == ["asha", "fifo"]  # the first seed's order
    asha, fifo = over["asha"], over["fifo"]
    # Each arm picks by validation accuracy in each seed (here val = test): 0.92, 0.96, 0.93.
    assert asha.picked_test_acc.values == (0.92, 0.96, 0.93) and fifo.picked_test_acc.values == (0.95, 0.85, 0.97)
    assert asha.picked_test_acc.mean == pytest.approx(np.mean([0.92, 0.96, 0.93]))
    assert asha.picked_test_acc.std == pytest.approx(np.std([0.92, 0.96, 0.93], ddof=1))
    assert asha.trial_epochs.values == (12.0, 14.0, 14.0) and fifo.trial_epochs.values == (20.0, 20.0, 20.0)
    assert asha.wall_time_s.mean == pytest.approx(14.0) and asha.wall_time_s.std == pytest.approx(2.0)
    assert asha.seeds == (0, 1, 2) and asha.trials == 2 and fifo.compute_reference
    md = seeds_markdown(runs)
    # mean ± std, min-max and the ratio of mean trial-epochs to FIFO's (13.3 / 20).
    assert "| asha | 3 | 2 | 0.937 ± 0.021 | 0.920-0.960 | 0.685 | 13.3 ± 1.2 | 12-14 | 0.67 | 14.0 ± 2.0 |" in md
    assert "| fifo | 3 | 2 | 0.923 ± 0.064 | 0.850-0.970 | 0.845 | 20.0 ± 0.0 | 20-20 | 1.00 | 32.0 ± 2.0 |" in md
    for run in runs:  # each seed's own table follows, as `study run` prints it for one seed
        assert f"### seed {run.seed}\n\n{comparison_markdown(run.summaries)}" in md + "\n"
    header, asha_row, _ = seeds_csv(runs).splitlines()
    assert header.startswith("arm,seeds,trials,picked_test_acc_mean,picked_test_acc_std,picked_test_acc_min_max")
    assert asha_row.startswith("asha,3,2,0.937,0.021,0.920-0.960,0.685,13.3,1.2,12-14,0.67,14.0,2.0,12.0-16.0,0.9,")


def test_seeds_options() -> None:
    assert StudyOptions().seed_list == (0,) and StudyOptions(seed=4).seed_list == (4,)
    assert check_seeds(StudyOptions(seed=4, seeds=[2, 0, 1])) == (2, 0, 1)  # `seeds` wins, order kept
    with pytest.raises(StudyError, match=r"\[1\] appear more than once"):
        check_seeds(StudyOptions(seeds=[1, 2, 1]))
    with pytest.raises(StudyError, match="at least one seed"):
        check_seeds(StudyOptions(seeds=[]))
    with pytest.raises(StudyError, match="integers >= 0"):
        check_seeds(StudyOptions(seeds=[0, -1]))


def test_bad_seeds_fail_before_anything_runs(tmp_path: Path) -> None:
    from neve_tune.studies import run_study

    with pytest.raises(StudyError, match="more than once"):
        run_study("digits", seeds=(0, 0), output_dir=tmp_path, tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_a_study_over_two_seeds_and_compare_rebuilds_it_from_mlflow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("optuna")
    from mlflow import MlflowClient

    from neve_tune.cli import main
    from neve_tune.studies import load_study, run_study

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done: list[tuple[str, int, str, int]] = []
    result = run_study(
        "digits",
        on_arm_done=lambda res, row: done.append((res.arm, res.seed, row.arm, row.trial_epochs)),
        backend="optuna",
        arms=["neve", "fifo"],
        trials=3,
        max_epochs=3,
        seeds=(0, 1),
        tracking_uri=uri,
        output_dir=tmp_path / "out",
        progress=False,
    )
    assert result.seeds == (0, 1) and result.title.endswith("seeds 0,1")
    first = result.runs[0]
    assert done == [  # the hook hears of every arm of every seed, in order, with that seed's row
        (arm, run.seed, arm, next(s for s in run.summaries if s.arm == arm).trial_epochs)
        for run in result.runs for arm in ("neve", "fifo")
    ]  # fmt: skip
    assert [[res.seed for res in run.arms.values()] for run in result.runs] == [[0, 0], [1, 1]]
    # Each seed samples its own configurations (the same in both arms of that seed).
    lrs = [sorted(r.config["lr"] for r in run.arms["fifo"].records) for run in result.runs]
    assert lrs[0] != lrs[1]
    assert lrs[0] == sorted(r.config["lr"] for r in first.arms["neve"].records)
    assert result.arms is first.arms and result.summaries is first.summaries  # the first seed's, as before

    # The table over seeds is exactly the spread of the per-seed rows, which come from the per-seed records.
    over = {a.arm: a for a in result.over_seeds}
    for arm in ("neve", "fifo"):
        rows = [next(s for s in run.summaries if s.arm == arm) for run in result.runs]
        for row, run in zip(rows, result.runs, strict=True):
            assert row.trials == 3 and row.trial_epochs == sum(r.epochs for r in run.arms[arm].records)
            assert row.wall_time_s == run.arms[arm].wall_time_s > 0
        picked = [r.picked_test_acc for r in rows]
        epochs = [float(r.trial_epochs) for r in rows]
        walls = [r.wall_time_s for r in rows]
        stats = over[arm]
        assert stats.picked_test_acc.values == tuple(picked) and all(0 <= p <= 1 for p in picked)
        assert stats.picked_test_acc.mean == pytest.approx(np.mean(picked))
        assert stats.picked_test_acc.std == pytest.approx(np.std(picked, ddof=1))
        assert (stats.picked_test_acc.min, stats.picked_test_acc.max) == (min(picked), max(picked))
        assert stats.trial_epochs.mean == pytest.approx(np.mean(epochs))
        assert stats.wall_time_s.mean == pytest.approx(np.mean(walls))
        assert stats.wall_time_s.std == pytest.approx(np.std(walls, ddof=1))
    assert over["fifo"].trial_epochs.values == (9.0, 9.0)  # FIFO: 3 trials x 3 epochs in each seed

    # Files: the table over seeds and its plot at the top, each seed's own outputs below.
    folder = result.output_dir
    assert (folder / "comparison.md").read_text() == result.markdown() == seeds_markdown(result.runs)
    assert (folder / "comparison.csv").read_text() == seeds_csv(result.runs)
    assert (folder / "seeds_per_arm.png").stat().st_size > 5000
    for run in result.runs:
        assert (folder / f"seed-{run.seed}" / "comparison.md").read_text() == comparison_markdown(run.summaries)
        assert (folder / f"seed-{run.seed}" / "test_acc_vs_epochs.png").exists()

    # MLflow: one study run; one arm run per arm and seed, tagged with its seed; the trials under them.
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("neve-tune-digits")
    study = client.get_run(result.study_run_id)
    assert study.data.params["seeds"] == "0,1" and study.data.tags["arms"] == "neve,fifo"
    arm_runs = client.search_runs([exp.experiment_id], "tags.role = 'arm'")
    assert sorted((r.info.run_name, r.data.tags["seed"]) for r in arm_runs) == [
        ("fifo-seed0", "0"), ("fifo-seed1", "1"), ("neve-seed0", "0"), ("neve-seed1", "1"),
    ]  # fmt: skip
    for arm_run in arm_runs:
        assert arm_run.data.tags["mlflow.parentRunId"] == study.info.run_id
        trials = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{arm_run.info.run_id}'")
        assert len(trials) == 3 and {t.info.status for t in trials} == {"FINISHED"}
    history = sorted((m.step, m.value) for m in client.get_metric_history(study.info.run_id, "fifo.picked_test_acc"))
    assert history == [
        (seed, pytest.approx(v)) for seed, v in zip((0, 1), over["fifo"].picked_test_acc.values, strict=True)
    ]
    assert study.data.metrics["fifo.picked_test_acc.mean"] == pytest.approx(over["fifo"].picked_test_acc.mean)

    # `compare` rebuilds the same numbers from MLflow alone.
    stored = load_study(uri, "neve-tune-digits")
    assert [run.seed for run in stored.runs] == [0, 1]
    assert [[res.seed for res in run.arms.values()] for run in stored.runs] == [[0, 0], [1, 1]]
    again = {a.arm: a for a in summarize_over_seeds(stored.runs)}
    for arm in ("neve", "fifo"):
        assert again[arm].picked_test_acc.values == pytest.approx(over[arm].picked_test_acc.values)
        assert again[arm].trial_epochs.values == over[arm].trial_epochs.values
        assert again[arm].wall_time_s.values == pytest.approx(over[arm].wall_time_s.values)
    monkeypatch.chdir(tmp_path)
    assert main(["study", "compare", "--tracking-uri", uri, "--output-dir", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert "mean ± std over the seeds" in out and "seed 0" in out and "seed 1" in out
    [rebuilt] = (tmp_path / "cmp").glob("compare-digits-*")
    assert (rebuilt / "comparison.md").read_text() == (folder / "comparison.md").read_text()
    assert (rebuilt / "comparison.csv").read_text() == (folder / "comparison.csv").read_text()
    for seed in (0, 1):
        assert (rebuilt / f"seed-{seed}" / "comparison.md").read_text() == (
            folder / f"seed-{seed}" / "comparison.md"
        ).read_text()
