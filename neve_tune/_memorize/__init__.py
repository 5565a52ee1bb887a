"""Memorisation: a label-free signal that a network has started to memorise its training labels.

LabelWave (Yuan, Feng, Liu, "Early Stopping Against Label Noise Without Validation Data", ICLR 2024):
each epoch, count the training samples whose predicted class changed since the previous epoch, each
prediction read from the training pass itself (the forward that trains on the sample, before its update).
While a network learns the common patterns the count falls; once it starts fitting the wrong labels one by
one it rises again. The minimum of the smoothed count marks the point to stop at, and its weights are
the ones to keep. Counting flips on a fixed set of inputs in eval mode at the end of each epoch does not
see this (it only falls): where and when predictions are read matters.

* ``predictions`` - the class predictions of one batch's model outputs (logits ``(N, C)``, token logits
  ``(N, T, C)``, a dict with ``"logits"``, a Hugging Face ``ModelOutput``);
* ``flips`` - :class:`FlipCounter`: per-sample predictions stored by dataset index, the epoch's flips;
* ``wave`` - :class:`Memorization` (the settings) and :class:`WaveTracker` (moving average, running
  minimum, patience), a pure state machine with no torch;
* ``watch`` - :class:`MemorizationWatch`: the counter, the tracker and the copy of the weights at the
  minimum, which :class:`neve_tune.NeVe` drives through ``observe()`` and ``step()``.

Torch only: nothing here imports the decision rule, the velocity measurement or an integration.
"""

from .flips import EpochFlips, FlipCounter
from .predictions import class_predictions
from .watch import MemorizationWatch
from .wave import Memorization, WaveTracker

__all__ = ["EpochFlips", "FlipCounter", "Memorization", "MemorizationWatch", "WaveTracker", "class_predictions"]
