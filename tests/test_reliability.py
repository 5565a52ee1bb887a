"""Issue 23: what a new user does wrong gets an error or a warning that says what is wrong and names the fix.

One test per case of the issue, named after it.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import neve_tune as nt


def _token_model(vocab: int = 10) -> nn.Module:
    return nn.Sequential(nn.Embedding(vocab, 8), nn.Flatten(), nn.Linear(8 * 5, 3))


class _KwargsTokenModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = _token_model(10)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.body(input_ids * attention_mask)


def _float_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))


def _neve(model: nn.Module, aux: object) -> nt.NeVe:
    return nt.NeVe(model, torch.optim.SGD(model.parameters(), lr=0.1), aux)  # type: ignore[arg-type]


def test_case07_wrong_dtype_aux_names_the_fix() -> None:
    with pytest.raises(
        ValueError, match=r"floating-point inputs \(float32\).*nn\.Embedding '0'.*token_aux\(vocab_size=10"
    ):
        _neve(_token_model(), torch.randn(16, 5))
    with pytest.raises(ValueError, match=r"integer inputs \(int64\).*float32.*aux\.float\(\)"):
        _neve(_float_model(), torch.randint(0, 5, (16, 5)))
    with pytest.raises(TypeError, match=r"numpy\.ndarray of shape \(16, 5\).*torch\.as_tensor"):
        _neve(_float_model(), np.random.default_rng(0).standard_normal((16, 5)).astype("float32"))
    with pytest.raises(TypeError, match=r"numpy\.ndarray of shape \(4, 5\).*torch\.as_tensor"):
        _neve(_float_model(), [np.zeros((4, 5), dtype="float32")] * 3)
    # the right dtypes still measure
    neve = _neve(_float_model(), torch.randn(16, 5))
    assert neve.step().model_velocity is not None


def test_case08_token_vocabulary_larger_than_embedding_says_which_sizes() -> None:
    aux = nt.token_aux(vocab_size=50, seq_len=5, n=16)
    top = int(aux.max())  # type: ignore[union-attr]
    assert top >= 10
    with pytest.raises(ValueError, match=rf"token ids reach {top}.*'0' has 10 rows \(ids 0\.\.9\).*vocab_size=10"):
        _neve(_token_model(10), aux)
    with pytest.raises(ValueError, match=r"has 10 rows"):
        _neve(_KwargsTokenModel(), nt.token_aux(vocab_size=50, seq_len=5, n=16, attention_mask="full"))
    _neve(_token_model(50), aux)  # fits


def test_case09_loader_of_pairs_says_labels_were_passed() -> None:
    data = TensorDataset(torch.randn(32, 5), torch.randint(0, 3, (32,)))
    with pytest.raises(ValueError, match=r"2 items \[\(8, 5\), \(8,\)\].*labels were passed to forward.*subset_aux"):
        _neve(_float_model(), DataLoader(data, batch_size=8))
    neve = _neve(_float_model(), nt.subset_aux(data, n=32))
    assert neve.step().model_velocity is not None


def test_case10_meta_model_or_meta_aux_is_refused_clearly() -> None:
    with pytest.raises(ValueError, match=r"'meta' device \(e\.g\. '0\.weight', shape \(16, 5\)\).*to_empty"):
        _neve(_float_model().to("meta"), torch.randn(16, 5))
    with pytest.raises(ValueError, match=r"Aux batch 0 is a tensor on the 'meta' device \(shape \(16, 5\)\)"):
        _neve(_float_model(), torch.randn(16, 5, device="meta"))
    with pytest.raises(ValueError, match=r"'meta' device"):
        nt.VelocityMonitor(_float_model().to("meta"), torch.randn(16, 5))


def test_case11_one_sample_aux_warns() -> None:
    with pytest.warns(UserWarning, match=r"only 1 sample\(s\) \(fewer than 8\).*noise.*n=100"):
        _neve(_float_model(), torch.randn(1, 5))
    with pytest.warns(UserWarning, match=r"only 6 sample\(s\)"):
        _neve(_float_model(), [torch.randn(3, 5), torch.randn(3, 5)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _neve(_float_model(), torch.randn(8, 5))  # 8 samples: no warning


def test_case15_report_epoch_with_none() -> None:
    import optuna

    from neve_tune.optuna import report_epoch as optuna_report
    from neve_tune.ray import report_epoch as ray_report

    model = _float_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    neve = nt.NeVe(model, optimizer, torch.randn(16, 5))
    neve.step(1.0)
    trial = optuna.create_study().ask()
    with pytest.raises(TypeError, match=r"value is this epoch's objective value.*got None.*train_loss=epoch_loss"):
        optuna_report(trial, neve, None)  # type: ignore[arg-type]
    assert optuna_report(trial, neve, 1.0) is None  # a number still reports
    # Ray: None as train_loss means "the loop stepped NeVe"; a NeVe never stepped is refused, not reported as epoch 0
    fresh = nt.NeVe(model, optimizer, torch.randn(16, 5))
    with pytest.raises(ValueError, match=r"train_loss=None.*neve/epoch is 0.*train_loss=epoch_loss"):
        ray_report(fresh, None, model=model, optimizer=optimizer)
    with pytest.raises(
        TypeError, match=r"got float 0\.5\. To give NeVe the epoch's training loss, pass train_loss=0\.5"
    ):
        ray_report(fresh, 0.5, model=model, optimizer=optimizer)  # type: ignore[arg-type]


def test_case14_multi_objective_report_epoch_says_how_to_use_neve() -> None:
    import optuna

    from neve_tune.optuna import report_epoch

    model = _float_model()
    neve = nt.NeVe(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.randn(16, 5))
    study = optuna.create_study(directions=["minimize", "maximize"])
    trial = study.ask()
    with pytest.raises(
        NotImplementedError, match=r"multi-objective study \(this one has 2 directions.*neve\.should_stop"
    ):
        report_epoch(trial, neve, 0.5, train_loss=1.0)
    assert neve.last_epoch == 0  # refused before NeVe was stepped: the loop can still step it itself
    single = optuna.create_study().ask()
    assert report_epoch(single, neve, 0.5, train_loss=1.0) is None


def _pbt_trainable(config: dict) -> None:
    from neve_tune import keys
    from neve_tune.ray import report_epoch, restore_from_checkpoint

    torch.set_num_threads(1)
    torch.manual_seed(0)
    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    model = _float_model()
    opt = torch.optim.SGD(model.parameters(), lr=config["lr"])
    neve = nt.NeVe(model, opt, torch.randn(16, 5), min_epochs=1000)  # no decay, no stop: LR == config LR
    start = restore_from_checkpoint(model, opt, neve)
    for _ in range(start + 1, 5):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        trained_at = opt.param_groups[0]["lr"]
        row = {"config_lr": config["lr"], "trained_at": trained_at, "start": start}
        with open(config["rows"], "a") as rows:  # our own record: Tune's result.json can be missing under load
            rows.write(json.dumps(row) + "\n")
        report_epoch(neve, {"score": config["lr"], **row}, model=model, optimizer=opt, train_loss=float(loss))
        assert math.isclose(neve.metrics()[keys.LR], trained_at), "NeVe reports the LR the trial trains at"


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_case04_pbt_exploit_trains_at_the_new_configs_lr(tmp_path) -> None:
    from ray import tune
    from ray.tune.schedulers import PopulationBasedTraining

    pbt = PopulationBasedTraining(
        time_attr="training_iteration",
        perturbation_interval=2,
        hyperparam_mutations={"lr": tune.uniform(0.01, 0.5)},
        quantile_fraction=0.5,
        resample_probability=0.0,
        synch=True,
    )
    tuner = tune.Tuner(
        _pbt_trainable,
        param_space={"lr": tune.grid_search([0.05, 0.2]), "rows": str(tmp_path / "rows.jsonl")},
        tune_config=tune.TuneConfig(scheduler=pbt, metric="score", mode="max"),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="pbt", verbose=0),
    )
    results = tuner.fit()
    assert results.num_errors == 0
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert len(rows) >= 8  # 2 trials x 4 epochs, and the epochs a restored trial trains again
    exploited = [row for row in rows if row["start"] > 0]
    assert exploited, "PBT restored no trial from a checkpoint"
    assert any(not math.isclose(r["config_lr"], 0.2) and not math.isclose(r["config_lr"], 0.05) for r in exploited)
    # every epoch, before and after an exploit, trains at the config's LR (and NeVe reports it: checked in the trial)
    for row in rows:
        assert math.isclose(row["trained_at"], row["config_lr"]), row


def test_case04_restore_under_a_new_config_lr_keeps_neves_decay(tmp_path) -> None:
    from neve_tune import keys
    from neve_tune.ray import load_training_state, save_training_state

    def build(lr: float) -> tuple[nn.Module, torch.optim.Optimizer, nt.NeVe]:
        model = _float_model()
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        opt.param_groups[0]["initial_lr"] = lr  # what restore_from_checkpoint stamps on a fresh trial
        return model, opt, nt.NeVe(model, opt, torch.randn(16, 5), momentum=0.0, patience=0, min_epochs=0)

    model, opt, neve = build(0.1)
    for _ in range(3):
        neve.step()  # the model stands still: the LR decays
    decayed = opt.param_groups[0]["lr"]
    assert decayed < 0.1
    save_training_state(tmp_path, model, opt, neve, epoch=3)
    model, opt, neve = build(0.1)  # same config: resumes at the checkpoint's LR
    load_training_state(tmp_path, model, opt, neve)
    assert opt.param_groups[0]["lr"] == decayed == neve.get_last_lr()[0]
    model, opt, neve = build(0.4)  # PBT's new config: 0.4 with the same decay
    load_training_state(tmp_path, model, opt, neve)
    assert math.isclose(opt.param_groups[0]["lr"], 0.4 * decayed / 0.1)
    assert math.isclose(neve.get_last_lr()[0], 0.4 * decayed / 0.1)
    assert math.isclose(neve.metrics()[keys.LR], 0.4 * decayed / 0.1)


def test_case05_output_dir_that_cannot_be_created_is_refused_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from neve_tune.cli import EXIT_USAGE, main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    argv = ["study", "run", "digits", "--trials", "1", "--max-epochs", "1", "--arms", "neve", "--backend", "optuna"]
    assert main([*argv, "--output-dir", str(blocker / "out")]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"Cannot write the study's results to --output-dir '{blocker / 'out'}': {blocker} is a file" in err
    assert "Traceback" not in err and "--output-dir ./neve_results" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # nothing started: no mlflow.db, no folder
    assert main([*argv, "--output-dir", "/proc/neve_x"]) == EXIT_USAGE
    assert "Cannot write the study's results to --output-dir '/proc/neve_x'" in capsys.readouterr().err


def test_case16_seed_and_seeds_are_refused_together_whatever_the_seed(capsys: pytest.CaptureFixture[str]) -> None:
    from neve_tune.cli import EXIT_USAGE, build_parser, study_options

    for seed in ("0", "3"):  # parse only: on a CLI that lets it through, nothing trains
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args(["study", "run", "digits", "--seed", seed, "--seeds", "1,2"])
        assert exit_info.value.code == EXIT_USAGE
        assert "argument --seeds: not allowed with argument --seed" in capsys.readouterr().err
    parse = build_parser().parse_args
    assert study_options(parse(["study", "run", "digits"])).seed_list == (0,)
    assert study_options(parse(["study", "run", "digits", "--seed", "0"])).seed_list == (0,)
    assert study_options(parse(["study", "run", "digits", "--seeds", "1,2"])).seed_list == (1, 2)


def _sigterm_study(tmp_path: Path, at_seed: int = 0) -> subprocess.CompletedProcess[str]:
    """`study run digits` over seeds 0,1 sent SIGTERM once a trial of seed 0 has reported an epoch, or (at_seed=1)
    as soon as the arm run of seed 1 exists."""
    from mlflow import MlflowClient

    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(repo), COLUMNS="200")
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "neve_tune.cli", "study", "run", "digits", "--trials", "2", "--max-epochs", "60"]
    cmd += ["--arms", "neve", "--seeds", "0,1", "--backend", "optuna", "--no-progress"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.search_experiments()  # creates the store's tables here, not concurrently with the study
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(1.0 if at_seed == 0 else 0.2)
        exp = client.get_experiment_by_name("neve-tune-digits")
        if exp is None:
            continue
        if at_seed == 0 and any(r.data.metrics for r in client.search_runs([exp.experiment_id], "tags.role = 'trial'")):
            break
        if at_seed and client.search_runs([exp.experiment_id], f"tags.role = 'arm' and tags.seed = '{at_seed}'"):
            break
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.slow
def test_case17_sigterm_ends_every_run_killed(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    done = _sigterm_study(tmp_path)
    assert done.returncode == 130, done.stderr[-3000:]
    assert "interrupted; open MLflow runs were ended KILLED" in done.stderr
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("neve-tune-digits")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    status = {(run.data.tags["role"], run.info.status) for run in runs}
    assert ("study", "KILLED") in status and ("arm", "KILLED") in status
    assert {s for _, s in status} <= {"KILLED", "FINISHED"}, status  # none FAILED, none left RUNNING


@pytest.mark.slow
def test_case18_compare_after_sigterm_leaves_out_the_seed_that_never_ran(tmp_path: Path) -> None:
    from neve_tune.studies import load_study

    done = _sigterm_study(tmp_path, at_seed=1)
    assert done.returncode == 130, done.stderr[-3000:]
    stored = load_study(f"sqlite:///{tmp_path / 'mlflow.db'}", "neve-tune-digits")
    assert stored.status == "KILLED"
    assert (1, "neve") in stored.missing  # its arm run exists, no trial of it ran
    assert [run.seed for run in stored.runs] == [0]  # only seed 0 is in the tables and the means
    assert all(arm.records for run in stored.runs for arm in run.arms.values())
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), COLUMNS="200")
    env.pop("MLFLOW_TRACKING_URI", None)
    compare = subprocess.run(
        [sys.executable, "-m", "neve_tune.cli", "study", "compare"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert compare.returncode == 0, compare.stderr[-3000:]
    assert "left out, no trial ran (the study run ended KILLED): seed 1 (neve)" in compare.stdout
    assert "mean ± std over the seeds" not in compare.stdout  # one seed left: no table over seeds


def test_case12_state_loaded_on_another_optimizer_reports_that_optimizers_lr() -> None:
    from neve_tune import keys

    model, aux = _float_model(), torch.randn(16, 5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    neve = nt.NeVe(model, opt, aux)
    neve.step()
    state = neve.state_dict()
    other_opt = torch.optim.SGD(model.parameters(), lr=0.03)
    other = nt.NeVe(model, other_opt, aux)
    other.load_state_dict(state)
    assert other.get_last_lr() == [0.03] and other.metrics()[keys.LR] == 0.03
    other_opt.load_state_dict(opt.state_dict())  # the optimizer's own state, loaded after NeVe's: followed too
    assert other.get_last_lr() == [0.1] and other.metrics()[keys.LR] == 0.1


def test_case03_load_state_dict_says_which_settings_the_state_replaces() -> None:
    model, aux = _float_model(), torch.randn(16, 5)
    default = nt.NeVe(model, torch.optim.SGD(model.parameters(), lr=0.1), aux)
    state = default.state_dict()
    anneal = nt.Anneal()
    tuned = nt.NeVe(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        aux,
        patience=7,
        stop_threshold=1e-2,
        momentum=0.9,
        anneal=anneal,
    )
    with pytest.warns(UserWarning) as caught:
        tuned.load_state_dict(state)
    text = " ".join(str(w.message) for w in caught)
    rule = default.rule
    assert f"patience 7 -> {rule.patience}" in text and f"stop_threshold 0.01 -> {rule.stop_threshold}" in text
    assert f"anneal {anneal!r} -> None" in text and "The state wins" in text
    assert f"momentum 0.9 -> {default.monitor.momentum}" in text
    got = (tuned.rule.patience, tuned.rule.stop_threshold, tuned.monitor.momentum, tuned.rule.anneal)
    assert got == (rule.patience, rule.stop_threshold, default.monitor.momentum, None)
    same = nt.NeVe(model, torch.optim.SGD(model.parameters(), lr=0.1), aux)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same.load_state_dict(state)  # same settings: no warning


def test_case01_not_converged_while_the_loss_still_falls_fast() -> None:
    from neve_tune import StopCriteria, StopReason
    from neve_tune._decide.stopping import StopDetector

    # The frozen backbone + trainable head: V under the threshold from the start, the loss falling fast.
    detector = StopDetector(stop_threshold=1e-3, min_epochs=2, num_classes=10, criteria=StopCriteria(learned=0.3))
    losses = [2.20, 1.86, 1.56, 1.33, 1.15, 1.14, 1.14, 1.14, 1.14, 1.14]
    reasons = [detector.step(epoch, 1e-4, 0.0, None, loss) for epoch, loss in enumerate(losses, start=1)]
    # epochs 2-5 (after the warm-up, fewer than two loss windows): the loss falls 7-13% of log 10 per epoch
    assert reasons[:5] == [None] * 5, reasons
    assert StopReason.CONVERGED in reasons  # once the loss flattens, it converges
    first = reasons.index(StopReason.CONVERGED) + 1
    assert 6 <= first <= 9, reasons


def test_case02_scheduler_beside_neve_that_undoes_its_decay_warns() -> None:
    def loop(scale_base_lrs: bool) -> list[warnings.WarningMessage]:
        torch.manual_seed(0)
        model = _float_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0)  # recomputes lr = base_lr * 1
        neve = nt.NeVe(model, opt, torch.randn(16, 5), momentum=0.0, patience=0, min_epochs=0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(4):  # the model stands still: NeVe decays
                result = neve.step()
                if result.lr_decayed and scale_base_lrs:
                    sched.base_lrs = [b * neve.rule.factor for b in sched.base_lrs]
                sched.step()
        return [w for w in caught if "rose from" in str(w.message)]

    undone = loop(scale_base_lrs=False)
    assert undone, "the undone decay went unreported"
    message = str(undone[0].message)
    assert "rose from 0.05 (after NeVe's 1 decay(s)) to 0.1" in message and "sched.base_lrs = [b * 0.5" in message
    assert undone[0].filename == __file__  # points at the loop's neve.step() call
    assert loop(scale_base_lrs=True) == []  # the decay sticks: nothing to say


def test_case13_lightning_with_onecycle_warns_that_decays_are_overwritten() -> None:
    from neve_tune.lightning._optimizers import carry_decay_into_schedulers, current_lrs

    model = _float_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=100)
    before = current_lrs([opt])
    opt.param_groups[0]["lr"] = before[0] * 0.5  # NeVe's decay, as the callback sees it
    with pytest.warns(UserWarning, match=r"OneCycleLR recomputes every LR.*overwrites the decay.*StepLR"):
        carry_decay_into_schedulers([opt], [sched], before)
    for _ in range(30):  # to the end of OneCycle's warm-up (pct_start 0.3)
        sched.step()
    assert opt.param_groups[0]["lr"] > 0.099  # what the warning is about: back at max_lr, the decay is gone
    chainable = torch.optim.lr_scheduler.StepLR(opt, step_size=10)
    before = current_lrs([opt])
    opt.param_groups[0]["lr"] = before[0] * 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        carry_decay_into_schedulers([opt], [chainable], before)  # a chainable scheduler keeps it: no warning
