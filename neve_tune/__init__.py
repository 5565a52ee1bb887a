"""neve_tune: NeVe (Neural Velocity) — validation-free LR decay and early stopping.

The core (this package's top level) depends on torch only:

* :class:`VelocityMonitor` measures neural velocity on a fixed auxiliary set;
* :class:`NeVeRule` is the decision rule (plateau LR decay; stop as converged, stalled, collapsed or
  diverged, with the thresholds of :class:`StopCriteria`), a pure state machine;
* :func:`decide` reads the trial's own decision from one epoch's reported metrics, the one decision the
  integrations (Ray Tune scheduler, Optuna pruner and ``report_epoch``) act on;
* :class:`Anneal`: opt-in anneal on convergence (``NeVe(anneal=Anneal())``): the first convergence starts a
  short LR cooldown instead of a stop;
* :class:`Memorization`: the settings of NeVe's memorisation watch (``NeVe.observe(outputs, indices)`` per
  training batch; the ``memorizing`` stop restores the weights at the flip count's minimum);
* :class:`NeVe` combines both for a plain PyTorch loop; each ``step()`` returns a :class:`StepResult` (the
  one result type, also what ``NeVeRule.step`` returns); ``NeVe.metrics()`` (and ``StepResult.metrics()``)
  is the one flat metrics dict every integration reports, and ``NeVe.report_step(train_loss)`` the one
  report path (step with the loss if given, then the metrics);
* :func:`noise_aux`, :func:`subset_aux`, :func:`image_folder_aux`, :func:`token_aux` and
  :func:`token_subset_aux` build aux sets; :data:`AuxInput` is the type every ``aux=`` accepts;
* :mod:`neve_tune.keys` names the metrics NeVe reports, and :class:`StopReason` spells why a trial stopped.

Integrations live in ``neve_tune.ray``, ``neve_tune.optuna``, ``neve_tune.mlflow``, ``neve_tune.lightning``
(``NeVeCallback`` for a Lightning ``Trainer``) and ``neve_tune.transformers`` (``NeVeCallback`` for the
Hugging Face ``Trainer``).
"""

from __future__ import annotations

from . import keys
from ._auxsets.builders import image_folder_aux, noise_aux, subset_aux
from ._auxsets.tokens import token_aux, token_subset_aux
from ._control.neve import NeVe
from ._decide.anneal import Anneal
from ._decide.decide import decide
from ._decide.decide import settings_disagreement as settings_disagreement  # not in __all__: for the integrations
from ._decide.result import StepResult
from ._decide.rule import NeVeRule
from ._decide.stopping import StopCriteria
from ._measure.inputs import AuxInput
from ._measure.layertable import register_layer_rule
from ._measure.monitor import DEFAULT_LAYER_TYPES, Measurement, MeasurementError, VelocityMonitor
from ._memorize.wave import Memorization
from .keys import StopReason

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_LAYER_TYPES",
    "Anneal",
    "AuxInput",
    "Measurement",
    "MeasurementError",
    "Memorization",
    "NeVe",
    "NeVeRule",
    "StepResult",
    "StopCriteria",
    "StopReason",
    "VelocityMonitor",
    "__version__",
    "decide",
    "image_folder_aux",
    "keys",
    "noise_aux",
    "register_layer_rule",
    "subset_aux",
    "token_aux",
    "token_subset_aux",
]
