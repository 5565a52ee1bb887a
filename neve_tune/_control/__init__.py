"""Control: :class:`~neve_tune.NeVe`, which joins measurement and decision and applies them to an optimizer.

* ``neve`` - the controller a training loop steps once per epoch: ``step()`` is the one decision flow
  (measure, then the rule, then the optimizer's LRs), ``report_step()`` the one report path of the
  integrations;
* ``callers`` - refuses the training loops that would step it once per batch.
"""
