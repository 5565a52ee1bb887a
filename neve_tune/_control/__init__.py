"""Control: :class:`~neve_tune.NeVe`, which joins measurement and decision and applies them to an optimizer.

* ``neve`` - the controller a training loop steps once per epoch;
* ``callers`` - refuses the training loops that would step it once per batch.
"""
