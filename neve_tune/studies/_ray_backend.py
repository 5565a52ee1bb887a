"""The Ray Tune backend of the study runner: one ``Tuner`` per arm, scheduler by arm.

Imported only when the Ray backend runs (it imports Ray at module level, so that the callback class is
importable and pickles by reference into Tune's experiment state).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ray import tune

from ._collect import Collector
from ._spec import Budget, StudyError
from ._trial import VAL_ACC, TrialSpec, run_trial


class _RayReporter:
    """Reports through ``neve_tune.ray.report_epoch`` (NeVe metrics + optional checkpoint) and resumes."""

    def __init__(self, checkpoint_every: int) -> None:
        self.checkpoint_every = int(checkpoint_every)

    def needs_state(self, epoch: int) -> bool:
        return self.checkpoint_every > 0 and epoch % self.checkpoint_every == 0

    def restore(self, model: Any, optimizer: Any, neve: Any, extra: dict) -> int:
        if not self.checkpoint_every:
            return 0
        from neve_tune.ray import restore_from_checkpoint

        return restore_from_checkpoint(model, optimizer, neve, extra_state=extra)

    def report(
        self, metrics: dict, *, neve: Any, model: Any, optimizer: Any, epoch: int, extra: dict, final: bool
    ) -> None:
        from neve_tune.ray import report_epoch

        report_epoch(
            neve,
            metrics,
            model=model,
            optimizer=optimizer,
            epoch=epoch,
            extra_state=extra if self.checkpoint_every else None,
            checkpoint_every=self.checkpoint_every,
        )


def _ray_trainable(config: dict, *, spec: TrialSpec, fallback_dir: str | None) -> None:
    """The Ray Tune function trainable of every arm (runs in a Ray worker)."""
    from neve_tune.ray import trial_device

    run_trial(
        spec,
        config,
        _RayReporter(spec.budget.checkpoint_every),
        device=trial_device(),
        trial_id=tune.get_context().get_trial_id(),
        fallback_dir=fallback_dir,
    )


# The Tuner pickles its callbacks into the experiment state: they hold only a key into this registry.
_COLLECTORS: dict[str, Collector] = {}


class StudyCallback(tune.Callback):
    """Feeds a :class:`Collector` (records, progress, MLflow safety net) from Tune's trial events."""

    def __init__(self, collector: Collector) -> None:
        self.key = f"{id(collector)}-{time.monotonic_ns()}"
        _COLLECTORS[self.key] = collector

    @property
    def collector(self) -> Collector | None:
        return _COLLECTORS.get(self.key)

    def close(self) -> None:
        _COLLECTORS.pop(self.key, None)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self.collector is not None:
            self.collector.started(trial.trial_id, trial.config)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if self.collector is not None:
            self.collector.started(trial.trial_id, trial.config)
            self.collector.result(trial.trial_id, result)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self.collector is not None:
            self.collector.completed(trial.trial_id)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self.collector is not None:
            self.collector.started(trial.trial_id, trial.config)
            self.collector.completed(trial.trial_id, error=_trial_error(trial))


def _trial_error(trial: Any) -> str:
    path = getattr(trial, "error_file", None)
    try:
        if path and os.path.exists(path):
            text = Path(path).read_text().strip().splitlines()
            return (text[-1] if text else "error")[:2000]
    except OSError:
        pass
    return "the trial raised an error (see the Ray trial logs)"


def _ray_scheduler(arm: str, budget: Budget) -> Any:
    if arm == "neve":
        from neve_tune.ray import NeVeScheduler

        return NeVeScheduler(max_t=budget.max_epochs, grace_period=1, stop_threshold=budget.neve.stop_threshold)
    if arm == "asha":
        from ray.tune.schedulers import ASHAScheduler

        return ASHAScheduler(
            time_attr="training_iteration",
            metric=VAL_ACC,
            mode="max",
            max_t=budget.max_epochs,
            grace_period=min(budget.grace_period, budget.max_epochs),
            reduction_factor=budget.reduction_factor,
        )
    from ray.tune.schedulers import FIFOScheduler

    return FIFOScheduler()


def run_arm(
    *,
    arm: str,
    spec: TrialSpec,
    configs: list[dict[str, Any]],
    link: Mapping[str, Any] | None,
    collector: Collector,
    storage: Path,
    name: str,
    cpus_per_trial: float,
    gpus_per_trial: float,
    fallback_dir: str,
    callbacks: Sequence[Any],
) -> float:
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    space: dict[str, Any] = {"config_id": tune.grid_search([c["config_id"] for c in configs])}
    by_id = {c["config_id"]: c for c in configs}
    for key in configs[0]:
        if key != "config_id":
            space[key] = tune.sample_from(lambda config, key=key: by_id[config["config_id"]][key])
    if link is not None:
        space["mlflow"] = dict(link)
    resources = {"cpu": cpus_per_trial, "gpu": gpus_per_trial}
    trainable = tune.with_resources(
        tune.with_parameters(_ray_trainable, spec=spec, fallback_dir=fallback_dir), resources
    )

    def trial_name(trial: Any) -> str:
        return f"{arm}-{int(trial.config['config_id']):03d}"

    study_callback = StudyCallback(collector)
    tuner = tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            scheduler=_ray_scheduler(arm, spec.budget),
            num_samples=1,
            reuse_actors=True,
            trial_name_creator=trial_name,
            trial_dirname_creator=trial_name,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=str(storage),
            verbose=0,
            callbacks=[study_callback, JsonLoggerCallback(), CSVLoggerCallback(), *callbacks],
            failure_config=tune.FailureConfig(max_failures=spec.budget.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        ),
    )
    t0 = time.perf_counter()
    try:
        tuner.fit()
    finally:
        study_callback.close()
    if collector.done < len(configs):
        # Tune handles Ctrl-C itself: it stops the trials cleanly and fit() returns as if done.
        raise KeyboardInterrupt(f"the {arm} arm was interrupted after {collector.done}/{len(configs)} trials")
    return time.perf_counter() - t0


def init_ray(address: str | None, cpus_per_trial: float, gpus_per_trial: float) -> bool:
    """Start (or connect to) Ray; True when this call started it. Checks the trial fits the cluster."""
    import ray

    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # no TensorBoard logger: we add CSV + JSON
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "1000")
    started = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": True}
        if address in (None, "", "local"):
            ray.init(**kwargs)
        else:
            ray.init(address=address, **kwargs)
        started = True
    total = ray.cluster_resources()
    if total.get("CPU", 0) < cpus_per_trial:
        if started:
            ray.shutdown()
        raise StudyError(
            f"Each trial asks for {cpus_per_trial:g} CPU(s) but the Ray cluster has {total.get('CPU', 0):g}; "
            "lower --cpus-per-trial or add nodes."
        )
    if gpus_per_trial > 0 and total.get("GPU", 0) < gpus_per_trial:
        if started:
            ray.shutdown()
        raise StudyError(
            f"Each trial asks for {gpus_per_trial:g} GPU(s) but the Ray cluster has {total.get('GPU', 0):g}; "
            "pass --gpus-per-trial 0 to train on CPUs, or connect to a cluster with GPUs (--ray-address)."
        )
    return started
