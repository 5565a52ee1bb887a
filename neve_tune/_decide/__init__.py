"""Decision: when to decay the learning rate and when, and why, a trial stops (standard library only).

* ``stopping`` - :class:`~neve_tune.StopCriteria` and the detector that names a stop reason;
* ``rule`` - :class:`~neve_tune.NeVeRule`, the plateau-decay state machine, and :func:`~neve_tune.decide`;
* ``anneal`` - :class:`~neve_tune.Anneal`, the opt-in cooldown on convergence.
"""
