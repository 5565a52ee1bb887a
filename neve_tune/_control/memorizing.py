"""How :class:`~neve_tune.NeVe` acts on its memorisation watch: the ``memorizing`` stop, restore, cooldown."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

from .._decide.anneal import Anneal, Annealer
from .._decide.result import StepResult
from .._decide.rule import NeVeRule
from .._memorize.watch import MemorizationWatch, WatchStep
from ..keys import StopReason

__all__ = ["MemorizationStop", "load_memorization", "warn_if_value_predates_restore"]

_LR_EPS = 1e-8  # as the rule: an LR change smaller than this is no decay


class MemorizationStop:
    """Turns the watch's verdict into NeVe's decision, and runs the cooldown that may follow a restore.

    Once it stopped the trial (``MEMORIZING``), every later step says ``MEMORIZING`` too (``DIVERGED`` wins),
    as the rule's own stops do: a loop that steps on does not see ``should_stop`` turn back to ``False``.

    State: :meth:`state_dict` holds the cooldown (``None`` when none is under way) and whether it stopped.
    """

    def __init__(self, watch: MemorizationWatch) -> None:
        self.watch = watch
        self.cooldown: Annealer | None = None
        self.stopped = False

    def decide(self, seen: WatchStep, rule: NeVeRule, result: StepResult) -> StepResult:
        """The rule's ``result`` of this epoch, with the watch's step ``seen`` and its decision applied.

        * During a cooldown that memorisation started, its learning rates replace the rule's and the rule's
          decisions are ignored but divergence; it ends as ``MEMORIZING`` after its last epoch.
        * Otherwise, after the warm-up (``rule.min_epochs``), when the watch says the network memorises, the
          rule found no failure (its reason is ``None`` or ``CONVERGED``) and the rule is not cooling down
          itself (``NeVe(anneal=...)`` after a convergence): the weights of the flip minimum come back
          (``restore_best_weights``), the watch freezes (its minimum stays the decision's), and a cooldown
          starts from them (``Memorization.anneal``, with ``rule.anneal``'s settings or ``Anneal()``'s),
          else the trial stops now as ``MEMORIZING``.
        """
        if self.watch.active:
            result = dataclasses.replace(
                result,
                flip_fraction=seen.fraction,
                flip_fraction_smoothed=seen.smoothed,
                flip_min_epoch=seen.best_epoch,
            )
        epoch, reason, lrs = result.epoch, result.stop_reason, tuple(result.lrs)
        if self.stopped:
            return dataclasses.replace(result, stop_reason=self._stop(reason))
        cooldown = self.cooldown
        if cooldown is not None:
            if reason is StopReason.DIVERGED or cooldown.done(epoch):
                self.cooldown = None
                return dataclasses.replace(result, stop_reason=self._stop(reason), annealing=False)
            return self._cool(result, rule, lrs, None)
        own = rule.annealer
        if (
            not seen.memorizing
            or epoch < rule.min_epochs
            or reason not in (None, StopReason.CONVERGED)
            or (own is not None and own.cooling and reason is None)
        ):
            return result
        restored = seen.best_epoch if self.watch.restore() else None
        self.watch.frozen = True
        if self.watch.settings.anneal:
            cooldown = Annealer(rule.anneal or Anneal())
            if cooldown.begin(epoch, lrs, converged=True):
                self.cooldown = cooldown
                return self._cool(result, rule, lrs, restored)
        return dataclasses.replace(result, stop_reason=self._stop(None), restored_epoch=restored)

    def _stop(self, reason: StopReason | None) -> StopReason:
        """``MEMORIZING`` from now on, unless the rule says ``DIVERGED``."""
        self.stopped = True
        return reason if reason is StopReason.DIVERGED else StopReason.MEMORIZING

    def _cool(self, result: StepResult, rule: NeVeRule, lrs: tuple[float, ...], restored: int | None) -> StepResult:
        assert self.cooldown is not None
        floors = rule.min_lrs * len(lrs) if len(rule.min_lrs) == 1 else list(rule.min_lrs)
        new = self.cooldown.lrs(result.epoch, floors)
        decayed = result.lr_decayed or any(old - lr > _LR_EPS for old, lr in zip(lrs, new, strict=True))
        return dataclasses.replace(
            result, stop_reason=None, lrs=list(new), lr_decayed=decayed, annealing=True, restored_epoch=restored
        )

    def state_dict(self) -> dict[str, Any]:
        """The watch's state (tables, tracker, kept weights) and the cooldown's."""
        return {
            "watch": self.watch.state_dict(),
            "cooldown": None if self.cooldown is None else self.cooldown.state_dict(),
            "stopped": self.stopped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; the state's ``Memorization`` settings win (warns when they differ)."""
        before = self.watch.settings
        self.watch.load_state_dict(state["watch"])
        if self.watch.settings != before:
            warnings.warn(
                f"The loaded NeVe state replaces this NeVe's memorization={before!r} with the state's"
                f" {self.watch.settings!r}. The state wins, so a resumed run decides as before; to train with the"
                " new settings, start a fresh NeVe instead of loading the state.",
                UserWarning,
                stacklevel=4,
            )
        self.stopped = bool(state["stopped"])
        self.cooldown = None
        if state["cooldown"] is not None:
            self.cooldown = Annealer(Anneal())
            self.cooldown.load_state_dict(state["cooldown"])


def load_memorization(stop: MemorizationStop | None, state: dict[str, Any] | None) -> None:
    """Restore ``stop`` from a NeVe state's ``"memorization"`` entry; both must be ``None`` or neither.

    Raises:
        ValueError: the state was saved with another ``memorization`` setting (``None`` vs. a watch).
    """
    if (state is None) != (stop is None):
        saved, here = ("None", "Memorization(...)") if state is None else ("Memorization(...)", "None")
        raise ValueError(
            f"this NeVe state was saved with memorization={saved} but this NeVe has memorization={here};"
            " build it with the same memorization setting as the one that saved it."
        )
    if stop is not None and state is not None:
        stop.load_state_dict(state)


def warn_if_value_predates_restore(result: StepResult, who: str) -> None:
    """Warn when a report that stepped NeVe itself (``report_epoch(..., train_loss=...)``) ended the trial as
    ``memorizing`` with the weights of the flip minimum put back: the value reported with it (measured before
    the step) is not that of the weights the model now holds."""
    if result.stop_reason is not StopReason.MEMORIZING or result.restored_epoch is None:
        return
    warnings.warn(
        f"{who}(..., train_loss=...) stepped NeVe, which stopped as memorizing and put back the weights of epoch"
        f" {result.restored_epoch}: the value and metrics passed with it were measured on the weights before that."
        " Evaluate the model again and keep that value (e.g. return it from the Optuna objective), or call"
        f" neve.step(loss) before evaluating and then {who} without train_loss.",
        UserWarning,
        stacklevel=4,
    )
