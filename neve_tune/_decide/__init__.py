"""Decision: when to decay the learning rate and when, and why, a trial stops (standard library only).

* ``result`` - :class:`~neve_tune.StepResult`, what one epoch measured and decided, and the flat metrics;
* ``stopping`` - :class:`~neve_tune.StopCriteria` and the detector that names a stop reason;
* ``rule`` - :class:`~neve_tune.NeVeRule`, the plateau-decay state machine that returns a ``StepResult``;
* ``decide`` - :func:`~neve_tune.decide`, the trial's own decision read back from its reported metrics;
* ``anneal`` - :class:`~neve_tune.Anneal`, the opt-in cooldown on convergence.
"""
