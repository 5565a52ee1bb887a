"""Building blocks for Ray Tune function trainables: report with a checkpoint, resume from it, pick a device.

Both study arms use them: the NeVe arm (``neve`` given, trains on all the data) and the validation-based
ASHA arm (``neve=None``, reports validation metrics). The checkpoint is one ``torch.save`` file,
``neve_state.pt``, holding the model, the optimizer, the NeVe state, the epoch, the RNG states and any
extra state, so a restarted (``FailureConfig(max_failures=...)``) or restored (``Tuner.restore``) trial
continues with identical velocities, learning rates and data order.
"""

from __future__ import annotations

import math
import os
import random
import tempfile
import warnings
from collections.abc import Mapping, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from ray import tune
from torch import nn
from torch.optim import Optimizer

from neve_tune import keys

if TYPE_CHECKING:
    from neve_tune import NeVe

#: File name of the checkpoint inside the Ray checkpoint directory.
CHECKPOINT_FILE = "neve_state.pt"
_FORMAT = 1
_NOT_STEPPED = (
    "report_epoch got train_loss=None, which means the loop already called neve.step(loss) for this epoch, but"
    " NeVe has not been stepped yet (neve/epoch is 0). Call neve.step(epoch_loss) after the epoch's training,"
    " or pass the loss here: report_epoch(..., train_loss=epoch_loss)."
)


def report_epoch(
    neve: NeVe | None,
    metrics: Mapping[str, Any] | None = None,
    *,
    model: nn.Module,
    optimizer: Optimizer,
    epoch: int | None = None,
    extra_state: Mapping[str, Any] | None = None,
    checkpoint_every: int = 1,
    save_rng: bool = True,
    train_loss: float | torch.Tensor | None = None,
) -> dict[str, Any]:
    """Report one epoch to Ray Tune: ``{**metrics, **neve.metrics()}`` with a checkpoint every k epochs.

    Call it once per epoch, either after ``neve.step(loss)`` or, with ``train_loss=``, instead of it:
    ``report_epoch(neve, metrics, model=..., optimizer=..., train_loss=epoch_loss)`` calls
    ``neve.step(epoch_loss)`` itself, so NeVe's decision uses the training loss (the stalled test and the
    chance-level check need it; see ``neve_tune.NeVe``). Calling both ``neve.step()`` and
    ``report_epoch(..., train_loss=...)`` in one epoch raises ``ValueError`` (``NeVe.report_step``, the
    report path shared with ``neve_tune.optuna.report_epoch``). The checkpoint (``neve_state.pt`` in a
    ``ray.tune.Checkpoint``) holds ``model.state_dict()``, ``optimizer.state_dict()``,
    ``neve.state_dict()``, the epoch, the torch/NumPy/Python RNG states (``save_rng``) and
    ``extra_state`` (any ``torch.save``-able values, e.g. an LR scheduler's ``state_dict()``).
    :func:`restore_from_checkpoint` reads it back.

    Args:
        neve: the trial's ``NeVe`` controller, or ``None`` for a trainable without NeVe (the
            validation-based baseline); then pass ``epoch``.
        metrics: the trial's own metrics (losses, accuracies). Keys must not start with ``neve/``.
        model, optimizer: what the checkpoint saves.
        epoch: the number of completed epochs; defaults to ``neve``'s epoch, required without ``neve``.
        extra_state: more state to checkpoint, restored into the dict passed to
            :func:`restore_from_checkpoint`.
        checkpoint_every: save a checkpoint when ``epoch % checkpoint_every == 0``; ``0`` never saves.
        save_rng: also save the RNG states, so the data order and dropout continue identically.
        train_loss: the epoch's training loss (a number or a one-element tensor): step NeVe with it
            before reporting. ``None``: the loop called ``neve.step()`` itself (as with
            ``NeVe.report_step(None)``); a NeVe never stepped is then refused with a ``ValueError``.

    Returns:
        The dict that was reported.

    Raises:
        TypeError: ``metrics`` is not a mapping (e.g. a loss passed where the metrics dict goes).
        ValueError: ``train_loss=None`` but ``neve`` was never stepped, or ``train_loss`` given after the
            loop already stepped NeVe this epoch.
    """
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be an integer >= 0, but got {checkpoint_every=}.")
    if metrics is not None and not isinstance(metrics, Mapping):
        raise TypeError(
            f"metrics must be a dict of the trial's own metrics (or None), but got {type(metrics).__name__}"
            f" {metrics!r}. To give NeVe the epoch's training loss, pass train_loss={metrics!r}; to report it,"
            f" pass {{'train_loss': {metrics!r}}}."
        )
    own = dict(metrics or {})
    clash = sorted(k for k in own if k.startswith(keys.PREFIX))
    if clash:
        raise ValueError(f"metrics must not use NeVe's own key prefix {keys.PREFIX!r}; got {clash}.")
    reported: dict[str, Any] = own
    if train_loss is not None and neve is None:
        raise ValueError("train_loss= steps NeVe before reporting; it needs a NeVe object (got neve=None).")
    if neve is not None:
        neve_metrics = neve.report_step(train_loss, who="report_epoch")  # steps NeVe first when given the loss
        reported = {**own, **neve_metrics}
        if neve_metrics[keys.EPOCH] < 1:
            raise ValueError(_NOT_STEPPED)
        if epoch is None:
            epoch = int(neve_metrics[keys.EPOCH])
    if epoch is None:
        raise ValueError(
            "Pass `epoch=` (the number of completed epochs) when reporting without a NeVe object."
        )
    if checkpoint_every == 0 or epoch % checkpoint_every != 0:
        tune.report(reported)
        return reported
    with tempfile.TemporaryDirectory(prefix="neve_ckpt_") as tmp:
        save_training_state(
            tmp, model, optimizer, neve, epoch=epoch, extra_state=extra_state, save_rng=save_rng
        )
        tune.report(reported, checkpoint=tune.Checkpoint.from_directory(tmp))
    return reported


def restore_from_checkpoint(
    model: nn.Module,
    optimizer: Optimizer,
    neve: NeVe | None = None,
    *,
    checkpoint: tune.Checkpoint | None = None,
    extra_state: MutableMapping[str, Any] | None = None,
    restore_rng: bool = True,
) -> int:
    """Load the trial's latest checkpoint (``ray.tune.get_checkpoint()``) and return the epoch to start from.

    Returns 0 and changes nothing when there is no checkpoint (a fresh trial), so a trainable reads::

        start = restore_from_checkpoint(model, optimizer, neve)
        for epoch in range(start, max_epochs):
            ...

    Build the model, optimizer and ``NeVe`` exactly as for a fresh trial (same architecture, param groups
    and aux set) before calling this; it then overwrites their state, the RNG states (``restore_rng``) and
    the entries of ``extra_state`` with the checkpointed ones. Tensors are loaded onto the model's device.

    The learning rates the optimizer was built with (its param groups' ``lr`` now) are kept as each group's
    ``initial_lr``, the key PyTorch's LR schedulers use. When they differ from the checkpoint's (a
    ``PopulationBasedTraining`` exploit restores another trial's checkpoint under a new ``config["lr"]``),
    the new config's LR applies, times the decay NeVe had applied in the checkpoint: each group trains at
    ``new lr * checkpoint lr / checkpoint initial_lr``, and ``neve`` reports that LR. An unchanged config
    resumes at the checkpoint's LRs.

    Raises:
        FileNotFoundError: the checkpoint was not written by :func:`report_epoch`.
        ValueError: the checkpoint holds NeVe state but ``neve`` is ``None`` (or the reverse).
    """
    if checkpoint is None:
        checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])  # the config's LR, for a later PBT exploit
        return 0
    with checkpoint.as_directory() as directory:
        return load_training_state(
            directory, model, optimizer, neve, extra_state=extra_state, restore_rng=restore_rng
        )


def save_training_state(
    directory: str | os.PathLike[str],
    model: nn.Module,
    optimizer: Optimizer,
    neve: NeVe | None = None,
    *,
    epoch: int,
    extra_state: Mapping[str, Any] | None = None,
    save_rng: bool = True,
) -> str:
    """Write the trial's state to ``directory/neve_state.pt``; returns the file's path.

    What :func:`report_epoch` checkpoints, for class trainables (``Trainable.save_checkpoint``) and
    plain loops: model, optimizer and NeVe ``state_dict()``, ``epoch``, ``extra_state`` and, with
    ``save_rng``, the torch (CPU and CUDA), NumPy and Python RNG states.
    """
    state = {
        "format": _FORMAT,
        "epoch": int(epoch),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "neve": None if neve is None else neve.state_dict(),
        "extra": None if extra_state is None else dict(extra_state),
        "rng": _rng_state() if save_rng else None,
    }
    path = os.path.join(os.fspath(directory), CHECKPOINT_FILE)
    torch.save(state, path)
    return path


def load_training_state(
    directory: str | os.PathLike[str],
    model: nn.Module,
    optimizer: Optimizer,
    neve: NeVe | None = None,
    *,
    extra_state: MutableMapping[str, Any] | None = None,
    restore_rng: bool = True,
) -> int:
    """Load what :func:`save_training_state` wrote into the given objects; returns the saved epoch.

    Raises:
        FileNotFoundError: ``directory`` holds no ``neve_state.pt``.
        ValueError: the state holds NeVe state but ``neve`` is ``None`` (or the reverse).
    """
    path = os.path.join(os.fspath(directory), CHECKPOINT_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} does not exist: this checkpoint was not written by neve_tune.ray.report_epoch or "
            "save_training_state. Report checkpoints with `report_epoch(...)` to resume with "
            "`restore_from_checkpoint`."
        )
    # The trial's own checkpoint (it holds RNG states and arbitrary extra state): not weights_only.
    state = torch.load(path, map_location="cpu", weights_only=False)
    if (state["neve"] is None) != (neve is None):
        has = "holds" if state["neve"] is not None else "does not hold"
        passed = "None" if neve is None else "a NeVe object"
        raise ValueError(
            f"The checkpoint {has} NeVe state but neve={passed} was passed."
            " Restore with the same kind of trainable that wrote the checkpoint."
        )
    model.load_state_dict(state["model"])
    built = [float(group["lr"]) for group in optimizer.param_groups]  # from the (maybe new) config
    optimizer.load_state_dict(state["optimizer"])  # moves the optimizer state to its params' device
    _apply_config_lrs(optimizer, built)
    if neve is not None:
        neve.load_state_dict(state["neve"])  # moves the velocity state to the model's device
    if extra_state is not None and state["extra"] is not None:
        extra_state.update(state["extra"])
    if restore_rng and state["rng"] is not None:
        _set_rng_state(state["rng"])
    return int(state["epoch"])


def _apply_config_lrs(optimizer: Optimizer, built: list[float]) -> bool:
    """Apply the LRs the optimizer was built with when they differ from the checkpoint's ``initial_lr``.

    Each group keeps the checkpoint's decay (``lr / initial_lr``) on the new LR. Returns whether any changed.
    """
    changed = False
    for group, lr in zip(optimizer.param_groups, built, strict=True):
        was = group.get("initial_lr")
        group["initial_lr"] = lr
        if was is None or math.isclose(float(was), lr, rel_tol=1e-9, abs_tol=0.0) or float(was) <= 0.0:
            continue
        group["lr"] = lr * float(group["lr"]) / float(was)
        changed = True
    return changed


def _select_device(gpu_ids: Sequence[Any], cuda_available: bool) -> torch.device:
    """The device for a trial that Ray gave ``gpu_ids``: ``cuda`` when it got a GPU and CUDA works, else cpu.

    Ray sets ``CUDA_VISIBLE_DEVICES`` to the trial's GPU(s), so its first GPU is ``cuda:0`` (also for a
    fractional GPU such as ``{"gpu": 0.5}``). A trial given a GPU on a machine where torch sees no CUDA
    runs on the cpu, with a warning.
    """
    if not gpu_ids:
        return torch.device("cpu")
    if not cuda_available:
        warnings.warn(
            f"Ray assigned GPU(s) {list(gpu_ids)} to this trial, but torch.cuda.is_available() is False; "
            "running on the cpu. Install a CUDA build of torch to use the GPU.",
            RuntimeWarning,
            stacklevel=2,
        )
        return torch.device("cpu")
    return torch.device("cuda", 0)


def trial_device() -> torch.device:
    """The device this trial should train and measure velocity on (see :func:`_select_device`).

    Inside a trial (a Ray actor) it follows the GPUs Ray assigned, e.g. with
    ``tune.with_resources(fn, {"gpu": 0.5})``; outside Ray it is ``cuda`` when available, else cpu.
    """
    import ray

    cuda = torch.cuda.is_available()
    # Check is_initialized() first: get_runtime_context() would start a Ray instance.
    if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
        return torch.device("cuda", 0) if cuda else torch.device("cpu")
    return _select_device(ray.get_gpu_ids(), cuda)


def _rng_state() -> dict[str, Any]:
    # legacy=True (the default) gives the MT19937 tuple ("MT19937", keys, pos, has_gauss, cached_gaussian).
    np_state = cast(tuple[Any, ...], np.random.get_state(legacy=True))
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": (np_state[0], np_state[1].copy(), *np_state[2:]),
        "python": random.getstate(),
    }


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        cuda_states = state["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(cuda_states)
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
