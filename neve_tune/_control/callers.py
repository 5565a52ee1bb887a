"""Who called ``NeVe.step()``: refuse the training loops that would step it once per batch.

The core imports no integration; it only reads the caller's module name, so nothing is imported here.
"""

from __future__ import annotations

import sys

#: Loops that call their LR scheduler's ``step()`` after every optimizer step, with no loss: handing them a
#: ``NeVe`` as the scheduler measures after every batch, silently. Module prefix -> what to do instead.
_PER_STEP_LOOPS = {
    "transformers.": (
        "the Hugging Face Trainer calls lr_scheduler.step() after every optimizer step, so NeVe would measure "
        "after every batch instead of every epoch. Pass optimizers=(optimizer, None) (or let the Trainer build "
        "its optimizer) and callbacks=[neve_tune.transformers.NeVeCallback(aux, ...)]: it measures once per "
        "epoch (or every N steps), passes the loss and keeps the Trainer's own LR schedule."
    ),
}


#: Wrappers that forward a scheduler's ``step()`` (accelerate's ``AcceleratedScheduler``, torch's own):
#: skipped, so the loop behind them is the one judged.
_FORWARDERS = ("accelerate.", "torch.")


def refuse_per_step_loops(depth: int = 2) -> None:
    """Raise ``ValueError`` when the caller ``depth`` frames up (past any forwarding wrapper) is a known
    per-step scheduler loop."""
    try:
        frame = sys._getframe(depth)
    except ValueError:  # a shallower stack: called from the top level
        return
    for _ in range(4):
        module = str(frame.f_globals.get("__name__", ""))
        if not module.startswith(_FORWARDERS) or frame.f_back is None:
            break
        frame = frame.f_back
    for prefix, fix in _PER_STEP_LOOPS.items():
        if module.startswith(prefix):
            raise ValueError(f"NeVe.step() was called by {module}.{frame.f_code.co_name}: {fix}")
