"""NeVePruner composed with Optuna's own SuccessiveHalvingPruner and HyperbandPruner, on a validation-free signal.

Real studies of 8 trials. Each trial trains a tiny network with a real ``NeVe`` (its learning rate decides
what NeVe says: 0.5 converges at epoch 5, 50 keeps moving, 0 stalls, 1e30 diverges) and reports, as the
intermediate value the base pruner ranks, a training-loss curve that differs by configuration
(``level * decay**epoch``): the validation-free signal, minimised.
"""

from __future__ import annotations

import multiprocessing
import warnings

import optuna
import pytest
import torch
from optuna.pruners import HyperbandPruner, SuccessiveHalvingPruner
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from torch import nn

from neve_tune import NeVe, noise_aux
from neve_tune.optuna import NeVePruner, report_epoch
from neve_tune.optuna._attrs import STOP_EPOCH_ATTR, STOP_REASON_ATTR

MAX_EPOCHS = 8
#: name, learning rate (what the trial's own NeVe will say), and the reported training-loss curve:
#: ``level * decay**epoch``.
CONFIGS = [
    ("moving", 50.0, 1.0, 0.85),  # first at every rung, so successive halving promotes it; runs to the cap
    ("converges", 0.5, 0.6, 1.0),  # flat: in the best half at steps 1 and 2, not at step 4, where NeVe
    # says converged (epoch 5): NeVe's decision comes first, the trial is COMPLETE
    ("converges_best", 0.5, 0.5, 0.85),
    ("diverges", 1e30, 0.4, 0.85),
    ("stalls", 0.0, 0.3, 0.85),  # the best signal, but NeVe says stalled: NeVe's decision comes first
    ("bad", 50.0, 3.0, 0.85),
    ("worse", 50.0, 5.0, 0.85),
    ("mediocre", 50.0, 0.8, 0.85),
]
NAMES = [c[0] for c in CONFIGS]


def signal(name: str, epoch: int) -> float:
    """The validation-free signal configuration ``name`` reports at ``epoch``."""
    _, _, level, decay = CONFIGS[NAMES.index(name)]
    return level * decay**epoch


def objective(trial: optuna.Trial) -> float:
    torch.set_num_threads(1)
    name, lr, _, _ = CONFIGS[trial.suggest_int("cfg", 0, len(CONFIGS) - 1)]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    y = (x[:, 0] > 0).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    neve = NeVe(model, opt, noise_aux((4,), n=16, seed=0), patience=2, min_epochs=5)
    for epoch in range(1, MAX_EPOCHS + 1):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        neve.step()
        value = signal(name, epoch)
        if report_epoch(trial, neve, value, max_epochs=MAX_EPOCHS):
            break
    return value


def _study(pruner: optuna.pruners.BasePruner, storage=None, name: str = "cross-trial") -> optuna.Study:
    study = optuna.create_study(direction="minimize", pruner=pruner, storage=storage, study_name=name)
    for i in range(len(CONFIGS)):
        study.enqueue_trial({"cfg": i})
    return study


def _outcomes(study: optuna.Study) -> dict[str, tuple[str, str | None, int | None]]:
    return {
        NAMES[t.params["cfg"]]: (t.state.name, t.user_attrs.get(STOP_REASON_ATTR), t.user_attrs.get(STOP_EPOCH_ATTR))
        for t in study.get_trials(deepcopy=False)
    }


#: What successive halving (rungs at steps 1, 2, 4; reduction factor 2: a trial must be in the best half
#: of its rung, and the first trial at a rung always passes) and NeVe decide together, trial by trial.
EXPECTED_SH = {
    "moving": ("COMPLETE", "max_t", 8),
    "converges": ("COMPLETE", "converged", 5),
    "converges_best": ("COMPLETE", "converged", 5),
    "diverges": ("PRUNED", "diverged", 1),
    "stalls": ("PRUNED", "stalled", 5),
    "bad": ("PRUNED", "pruned", 2),  # step 1 (epoch 2): outside the best half of rung 0
    "worse": ("PRUNED", "pruned", 2),
    "mediocre": ("PRUNED", "pruned", 3),  # passed rung 0, outside the best half of rung 1 (step 2)
}


@pytest.mark.parametrize("storage", ["memory", "sqlite"])
def test_successive_halving_prunes_on_the_training_loss_and_neve_still_decides(tmp_path, storage):
    url = None if storage == "memory" else f"sqlite:///{tmp_path / 'study.db'}"
    sh = SuccessiveHalvingPruner(min_resource=1, reduction_factor=2)
    study = _study(NeVePruner(wrapped_pruner=sh), storage=url)
    study.optimize(objective, n_trials=len(CONFIGS))
    assert _outcomes(study) == EXPECTED_SH
    by_name = {NAMES[t.params["cfg"]]: t for t in study.trials}
    # The base ranked the reported signal: rung 0 holds each trial's value at step 1 (epoch 2).
    rung_0 = {n: t.system_attrs.get("completed_rung_0") for n, t in by_name.items()}
    assert rung_0 == {n: (None if n == "diverges" else pytest.approx(signal(n, 2))) for n in NAMES}
    # It is consulted where NeVe decides too, and keeps its records there: "converges" reached rung 2
    # (step 4) at the epoch NeVe said converged. With two values at that rung successive halving promotes
    # only the better one, so alone it would have pruned it; NeVe's decision came first.
    rung_2 = {n: t.system_attrs.get("completed_rung_2") for n, t in by_name.items()}
    assert rung_2["converges"] == pytest.approx(signal("converges", 5))
    assert rung_2["converges"] > rung_2["moving"] == pytest.approx(signal("moving", 5))
    assert study.best_trial.params == {"cfg": 2} and study.best_value == pytest.approx(signal("converges_best", 5))


def test_hyperband_under_neve_ranks_within_its_brackets():
    """HyperbandPruner builds its bracket of the study itself, so it works unchanged as the base. With
    max_resource=8 and reduction factor 2 it has 4 brackets (first rungs at steps 1, 2, 4, 8); a trial's
    bracket is a hash of the study name and trial number, fixed here by the study name."""
    hb = HyperbandPruner(min_resource=1, max_resource=MAX_EPOCHS, reduction_factor=2)
    study = _study(NeVePruner(wrapped_pruner=hb), name="hyperband-547")
    study.optimize(objective, n_trials=len(CONFIGS))
    brackets = {NAMES[t.params["cfg"]]: hb._get_bracket_id(study, t) for t in study.trials}
    assert brackets == {
        "moving": 0, "converges": 2, "converges_best": 0, "diverges": 0,
        "stalls": 2, "bad": 0, "worse": 0, "mediocre": 3,
    }  # fmt: skip
    assert _outcomes(study) == {
        "moving": ("COMPLETE", "max_t", 8),  # the first of bracket 0 at each of its rungs
        "converges": ("COMPLETE", "converged", 5),
        "converges_best": ("COMPLETE", "converged", 5),
        "diverges": ("PRUNED", "diverged", 1),
        "stalls": ("PRUNED", "stalled", 5),
        "bad": ("PRUNED", "pruned", 2),  # bracket 0, rung 0 (step 1): not the best of 3
        "worse": ("PRUNED", "pruned", 2),
        "mediocre": ("COMPLETE", "max_t", 8),  # bracket 3 ranks at step 8 only: never reached
    }
    # Each bracket keeps its own rungs: the first rung of bracket 0 is step 1 (epoch 2), that of bracket 2
    # step 4 (epoch 5), and bracket 3 (step 8) never recorded anything.
    attrs = {NAMES[t.params["cfg"]]: t.system_attrs for t in study.trials}
    assert attrs["bad"]["completed_rung_0"] == pytest.approx(signal("bad", 2))
    assert attrs["stalls"]["completed_rung_0"] == pytest.approx(signal("stalls", 5))
    assert attrs["converges"]["completed_rung_0"] == pytest.approx(signal("converges", 5))
    assert "completed_rung_1" not in attrs["stalls"]
    assert not any(k.startswith("completed_rung") for k in attrs["mediocre"])


def _journal(path: str) -> JournalStorage:
    """A journal file shared by processes, as ``neve_tune.studies`` builds it."""
    return JournalStorage(JournalFileBackend(path))


def _journal_worker(path: str, n_trials: int) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pruner = NeVePruner(wrapped_pruner=SuccessiveHalvingPruner(min_resource=1, reduction_factor=2))
    study = optuna.load_study(study_name="shared", storage=_journal(path), pruner=pruner)
    study.optimize(objective, n_trials=n_trials)


@pytest.mark.slow
def test_two_worker_processes_share_one_journal_study(tmp_path):
    """Two spawned processes run one study through a journal file: no trial lost, every trial COMPLETE or
    PRUNED with its reason, and the decisions each process makes from storage alone hold."""
    path = str(tmp_path / "journal.log")
    study = _study(NeVePruner(), storage=_journal(path), name="shared")
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_journal_worker, args=(path, len(CONFIGS) // 2)) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert [w.exitcode for w in workers] == [0, 0]
    trials = study.get_trials(deepcopy=False)
    assert sorted(t.params["cfg"] for t in trials) == list(range(len(CONFIGS)))  # each config once
    assert {t.state for t in trials} <= {TrialState.COMPLETE, TrialState.PRUNED}
    outcomes = _outcomes(study)
    for name, (state, reason, _) in outcomes.items():
        assert (state == "COMPLETE") == (reason in ("converged", "max_t")), (name, state, reason)
    # NeVe's own decisions do not depend on the order the two workers ran the trials in.
    for name in ("converges_best", "diverges", "stalls"):
        assert outcomes[name] == EXPECTED_SH[name]
    # The two worst configurations come last: by their rung, the first five have finished (each worker
    # runs one trial at a time), so successive halving cuts them wherever they ran.
    assert outcomes["bad"] == outcomes["worse"] == ("PRUNED", "pruned", 2)


def test_hyperband_with_an_auto_max_resource_warns_that_neve_may_end_trials_early():
    with pytest.warns(UserWarning, match="pass max_resource= the epoch cap"):
        NeVePruner(wrapped_pruner=HyperbandPruner())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        NeVePruner(wrapped_pruner=HyperbandPruner(max_resource=MAX_EPOCHS))
        NeVePruner(wrapped_pruner=SuccessiveHalvingPruner())
