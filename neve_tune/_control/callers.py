"""Who called ``NeVe.step()``: refuse the training loops that would step it once per batch.

The core imports no integration; it only reads the caller's module name, so nothing is imported here.
"""

from __future__ import annotations

import sys
import warnings

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


def warn_if_decay_undone(now: list[float], left: list[float], factor: float, num_decays: int, depth: int = 2) -> None:
    """Warn when, since NeVe's last step, something raised an LR NeVe had decayed at least halfway back.

    In a plain loop that is an LR scheduler stepped beside NeVe (``LambdaLR``, ``OneCycleLR``): it recomputes
    each LR from its ``base_lrs`` and silently undoes NeVe's decays. The Lightning and Hugging Face callbacks
    (callers in ``neve_tune.``) carry each decay into their schedulers' ``base_lrs`` themselves: not judged.
    Python's warning filter shows it once per calling line.
    """
    if num_decays < 1 or len(now) != len(left):
        return
    rose = [(i, was, lr) for i, (was, lr) in enumerate(zip(left, now, strict=True)) if lr > was * (1 + 1 / factor) / 2]
    try:
        caller = str(sys._getframe(depth).f_globals.get("__name__", ""))
    except ValueError:
        caller = ""
    if not rose or caller.startswith("neve_tune."):
        return
    group, was, lr = rose[0]
    warnings.warn(
        f"The LR of param group {group} rose from {was:.4g} (after NeVe's {num_decays} decay(s)) to {lr:.4g} since"
        " NeVe's last step: an LR scheduler stepped beside NeVe (e.g. LambdaLR, OneCycleLR) recomputes the LR from"
        " its base_lrs and undoes NeVe's decay, while neve.metrics()['neve/num_decays'] still counts it. Make the"
        " decay stick: when neve.step() returns lr_decayed, scale the scheduler's base_lrs by the same factor"
        f" (sched.base_lrs = [b * {factor:g} for b in sched.base_lrs]), as the Lightning and Hugging Face callbacks"
        " do; or let NeVe alone drive the LR.",
        UserWarning,
        stacklevel=depth + 1,
    )
