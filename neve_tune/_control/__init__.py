"""Control: :class:`~neve_tune.NeVe`, which joins measurement and decision and applies them to an optimizer.

* ``neve`` - the controller a training loop steps once per epoch: ``step()`` is the one decision flow
  (measure, then the rule, then the optimizer's LRs), ``report_step()`` the one report path of the
  integrations;
* ``memorizing`` - how it acts on the memorisation watch (:mod:`neve_tune._memorize`): the ``memorizing``
  stop, the restore of the flip minimum's weights and the cooldown after it;
* ``arguments`` - what it reads from its arguments (the number of classes, the training loss);
* ``callers`` - refuses the training loops that would step it once per batch.
"""
