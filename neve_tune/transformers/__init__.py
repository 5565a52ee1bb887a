"""NeVe for the Hugging Face ``Trainer``: a ``TrainerCallback`` that measures, decays the LR and stops.

* :class:`NeVeCallback` — ``Trainer(..., callbacks=[NeVeCallback(aux)])``: measures once per epoch (or
  every ``every_n_steps`` optimizer steps) with the mean training loss the Trainer logged, decays the
  learning rate in a way the Trainer's own LR scheduler keeps, sets ``control.should_training_stop`` when
  NeVe says converged, stalled, collapsed or diverged, writes ``neve/*`` into ``trainer.state.log_history``
  (and into the Trainer's MLflow run), and saves its state into every Trainer checkpoint
  (:data:`STATE_FILE`) so a resumed training continues with identical velocities.
* :class:`NeVeTrainer` (or :class:`NeVeTrainerMixin` on your own Trainer subclass) shows NeVe the logits of
  every training batch with the batch's ``"index"`` column, so NeVe also stops as ``memorizing`` and puts
  back the weights of the flip minimum (label noise; see ``neve_tune.Memorization``).

Example:
    >>> from neve_tune.transformers import NeVeCallback
    >>> import neve_tune
    >>> callback = NeVeCallback(neve_tune.token_aux(100, 16, n=8, attention_mask="full"))
"""

from __future__ import annotations

try:
    import transformers as _transformers  # noqa: F401
except ImportError as _err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "transformers was not found - please install with `pip install 'neve_tune[transformers]'`"
        " (or `pip install transformers accelerate`)."
    ) from _err

from neve_tune.transformers._callback import STATE_FILE, NeVeCallback
from neve_tune.transformers._trainer import NeVeTrainer, NeVeTrainerMixin

__all__ = ["STATE_FILE", "NeVeCallback", "NeVeTrainer", "NeVeTrainerMixin"]
