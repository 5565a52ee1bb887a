"""Plain per-trial records of a study (from the backends or read back from MLflow), and the pick rules.

A pick rule chooses the trial an arm would deploy, using only what that arm is allowed to see; the test
accuracy is only reported, it never picks a trial or stops one. Each :class:`~neve_tune.studies.Arm`
names its rule; the built-in rules are here.

The validation-free rules rank trials on a signal of their training run alone (no validation data). The
candidates measured in ``studies/ranking_signals.md`` (Spearman rank correlation with test accuracy over
every trial of the digits and MNIST-1D studies, with and without label noise, and the regret of the pick):

* the final training loss (:func:`pick_lowest_train_loss`, the ``neve-pure`` arm): a fit criterion; under
  label noise it prefers the trials that memorise the noisy labels;
* TSE, the sum of the epochs' training losses (Lyle et al. 2020): a training-speed estimate of the marginal
  likelihood, but it grows with the number of epochs, so it only compares trials of the same length (an
  ASHA rung);
* TSE / epochs, the mean of the epochs' training losses: Lyle et al.'s estimate per epoch, comparable
  across trials of different lengths. The ``neve`` arm picks on it (:func:`pick_lowest_mean_loss`): its
  rank correlation was the highest or tied of the loss family in every study and in-trial policy
  measured, with the same regret as TSE-EMA;
* TSE-EMA, ``sum_s 0.9^(t-s) L_s`` (Ru et al. 2021, the study key ``train/tse_ema``): the training speed
  of the latest ~10 epochs. The ``neve`` arm's ASHA ranks trials on it at its rungs (where every trial has
  the same length, it ranks like TSE);
* the final training accuracy, and velocity-based signals (the final model velocity, its sum, the epoch of
  convergence): the velocity ones rank trials poorly (they say when a trial stopped moving, not how good
  it is).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from neve_tune import keys as neve_keys

from ._keys import (
    COLLAPSED,
    CONVERGED,
    DIVERGED,
    ERROR,
    MEMORIZING,
    PRUNED,
    STALLED,
    TEST_ACC,
    TRAIN_LOSS,
    TRAIN_TSE,
    VAL_ACC,
    VAL_LOSS,
)


@dataclass
class TrialRecord:
    """What the comparison needs from one trial.

    NaN policy: a missing or non-numeric metric reads as NaN; NaN values never win a pick and are left out
    of the quantiles. State: plain data (rebuilt from MLflow by ``neve-tune study compare``).

    Attributes:
        arm: the arm's name.
        config_id: index of the sampled configuration (the same config id means the same
            hyperparameters in every arm).
        config: the hyperparameters.
        epochs: epochs trained (its last reported epoch).
        stop_reason: ``converged``, ``stalled``, ``collapsed``, ``diverged``, ``max_t``, ``pruned``,
            ``error`` or ``stopped``.
        final: its last reported metrics (``train/loss``, ``val/acc``, ``test/acc``, ...).
        test_acc_curve: ``(epoch, test accuracy)`` per epoch, for the plots.
        tse_curve: ``(epoch, train/tse)`` per epoch: the pick reads a memorizing trial's TSE at the epoch
            whose weights NeVe restored.
        trial_id: the backend's trial id.
        run_id: its MLflow run id, when known.
    """

    arm: str
    config_id: int
    config: dict[str, Any]
    epochs: int
    stop_reason: str
    final: dict[str, float]
    test_acc_curve: list[tuple[int, float]] = field(default_factory=list)
    tse_curve: list[tuple[int, float]] = field(default_factory=list)
    trial_id: str | None = None
    run_id: str | None = None

    def metric(self, key: str) -> float:
        """``final[key]`` as a float; NaN when missing or not a number."""
        value = self.final.get(key)
        try:
            return float(value) if value is not None else math.nan
        except (TypeError, ValueError):
            return math.nan

    @property
    def test_acc(self) -> float:
        return self.metric(TEST_ACC)


@dataclass
class ArmResult:
    """All trials of one arm in one seed, plus its wall time and the fraction of labelled data it trained on.

    ``failure``: set when every trial of the arm failed: the first error, summarised, and where the full one
    is (``None`` otherwise, and for a study read back from MLflow).
    """

    arm: str
    records: list[TrialRecord]
    wall_time_s: float
    train_fraction: float
    max_epochs: int
    seed: int = 0
    failure: str | None = None


#: Stop reasons that disqualify a trial from the validation-free pick (it never learned, or was cut).
NEVER_PICKED = frozenset((STALLED, COLLAPSED, DIVERGED, PRUNED, ERROR))


def _train_loss_pools(records: Sequence[TrialRecord]) -> tuple[list[TrialRecord], list[TrialRecord]]:
    """(converged or memorizing trials, the others that may still be picked), with a finite final train loss."""
    finite = [r for r in records if math.isfinite(r.metric(TRAIN_LOSS))]
    converged = [r for r in finite if r.stop_reason in (CONVERGED, MEMORIZING)]
    others = [r for r in finite if r.stop_reason not in (CONVERGED, MEMORIZING, *NEVER_PICKED)]
    return converged, others


def pick_lowest_train_loss(records: Sequence[TrialRecord]) -> TrialRecord | None:
    """The validation-free rule: among the trials that *converged*, the lowest final training loss.

    If none converged, among the trials that ran to the epoch cap (``max_t``) or were stopped from outside
    (``stopped``). Stalled, collapsed, diverged, pruned and failed trials are never picked: they did not
    learn. Ties: fewer epochs, then lower config id. NaN losses never qualify. This is a fit criterion,
    not a generalisation estimate: it is what an arm without validation data can honestly use.
    :func:`describe_train_loss_pick` says which case happened.
    """
    converged, others = _train_loss_pools(records)
    pool = converged or others
    if not pool:
        return None
    return min(pool, key=lambda r: (r.metric(TRAIN_LOSS), r.epochs, r.config_id))


def describe_train_loss_pick(records: Sequence[TrialRecord]) -> str:
    """The pick-rule line of :func:`pick_lowest_train_loss` for these records: what actually happened."""
    converged, others = _train_loss_pools(records)
    if converged:
        return f"lowest final train loss among the {len(converged)} converged trials (validation-free)"
    reasons = sorted({r.stop_reason for r in others})
    if others:
        return (
            f"no trial converged: picked the lowest final train loss among the {len(others)} trials that"
            f" ended {'/'.join(reasons)} (validation-free)"
        )
    return "no trial converged, and none ran to its cap (all stalled, collapsed, diverged or failed): no pick"


def _mean_loss(r: TrialRecord) -> float:
    """TSE / epochs; for a trial NeVe stopped as memorizing, over the epochs up to the one whose weights it
    restored (the epochs after that fit wrong labels and lower the loss of the trials that memorise most)."""
    if r.stop_reason == MEMORIZING:
        restored = r.metric(neve_keys.FLIP_MIN_EPOCH)
        tse = dict(r.tse_curve)
        if math.isfinite(restored) and int(restored) in tse and restored > 0:
            return tse[int(restored)] / int(restored)
    return r.metric(TRAIN_TSE) / r.epochs if r.epochs > 0 else math.nan


def _mean_loss_pool(records: Sequence[TrialRecord]) -> list[TrialRecord]:
    return [r for r in records if r.stop_reason not in NEVER_PICKED and math.isfinite(_mean_loss(r))]


def pick_lowest_mean_loss(records: Sequence[TrialRecord]) -> TrialRecord | None:
    """The ``neve`` arm's rule: the lowest mean training loss over the trial's epochs (``train/tse`` / epochs)
    among the trials that learned; for a trial stopped as ``memorizing``, over its epochs up to the one whose
    weights NeVe restored.

    That is Lyle et al.'s (2020) training-speed estimate of the marginal likelihood, divided by the epochs so
    that trials of different lengths compare. Trials that converged, ran to the epoch cap (``max_t``) or
    were stopped from outside qualify alike; stalled, collapsed, diverged, pruned and failed trials never
    do, nor a NaN signal. Ties: fewer epochs, then lower config id. Validation-free.
    """
    pool = _mean_loss_pool(records)
    if not pool:
        return None
    return min(pool, key=lambda r: (_mean_loss(r), r.epochs, r.config_id))


def describe_mean_loss_pick(records: Sequence[TrialRecord]) -> str:
    """The pick-rule line of :func:`pick_lowest_mean_loss` for these records."""
    pool = _mean_loss_pool(records)
    if not pool:
        return "no trial converged or ran to its cap (all stalled, collapsed, diverged, pruned or failed): no pick"
    reasons = "/".join(sorted({r.stop_reason for r in pool}))
    return (
        f"lowest mean training loss over its epochs (TSE / epochs) among the {len(pool)} {reasons} trials"
        " (validation-free)"
    )


def pick_highest_val_acc(records: Sequence[TrialRecord]) -> TrialRecord | None:
    """The validation rule: the highest validation accuracy at the trial's last epoch.

    Ties: lower validation loss, fewer epochs, lower config id (``ResultGrid.get_best_result(scope="last")``).
    Trials that raised, and NaN accuracies, never qualify.
    """
    pool = [r for r in records if r.stop_reason != ERROR and math.isfinite(r.metric(VAL_ACC))]
    if not pool:
        return None

    def key(r: TrialRecord) -> tuple[float, float, int, int]:
        loss = r.metric(VAL_LOSS)
        return (-r.metric(VAL_ACC), loss if math.isfinite(loss) else math.inf, r.epochs, r.config_id)

    return min(pool, key=key)


__all__ = [
    "NEVER_PICKED",
    "ArmResult",
    "TrialRecord",
    "describe_mean_loss_pick",
    "describe_train_loss_pick",
    "pick_highest_val_acc",
    "pick_lowest_mean_loss",
    "pick_lowest_train_loss",
]
