"""The Ray Tune backend of the study runner: one ``Tuner`` per arm, with the arm's scheduler.

Imported only when the Ray backend runs (it imports Ray at module level, so that the callback class is
importable and pickles by reference into Tune's experiment state).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ray import tune

from .._env import scoped_env
from ._backend import ArmJob, Backend
from ._collect import Collector
from ._records import ArmResult
from ._spec import Budget, StudyError
from ._trial import TrialSpec, run_trial


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


def _ray_trainable(config: dict[str, Any], *, spec: TrialSpec, fallback_dir: str | None) -> None:
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
            path = getattr(trial, "error_file", None)
            where = f"Ray's trial error file {path}" if path else f"the Ray trial's logs ({trial.trial_id})"
            self.collector.completed(trial.trial_id, error=_trial_error(path), error_at=where)


def _trial_error(path: str | None) -> str:
    """The last line of Ray's trial error file (the exception), or a pointer to the logs."""
    try:
        if path and os.path.exists(path):
            text = Path(path).read_text().strip().splitlines()
            return (text[-1] if text else "error")[:2000]
    except OSError:
        pass
    return "the trial raised an error (see the Ray trial logs)"


class RayBackend(Backend):
    """One ``tune.Tuner`` per arm: the configurations as a grid over ``config_id``, the arm's scheduler.

    :meth:`open` starts a local Ray (``address`` ``None``/``"local"``) or connects to one, and checks one
    trial's resources fit the cluster; :meth:`close` shuts down a Ray it started. Failed trials restart
    ``budget.max_failures`` times from their last checkpoint (``budget.checkpoint_every``).

    Args:
        address: ``None``/``"local"`` starts a local Ray with every CPU (and shuts it down at the end); else
            the cluster to connect to, e.g. ``"auto"`` (``--ray-address``).
        callbacks: extra Ray Tune callbacks of every arm's ``Tuner``.
    """

    name = "ray"

    def __init__(self, *, address: str | None = None, callbacks: Sequence[Any] = ()) -> None:
        self.address = address
        self.callbacks = list(callbacks)
        self._started = False
        self._tune_env = contextlib.ExitStack()  # the study's Tune settings, from open to close

    @property
    def runs_here(self) -> bool:
        return self.address in (None, "", "local")

    def open(self, budget: Budget) -> None:
        # A study must not change the caller's own later `Tuner` runs: close() puts their settings back.
        self._tune_env.enter_context(scoped_env(STUDY_TUNE_ENV, override=False))
        try:
            self._started = init_ray(self.address, budget.cpus_per_trial, budget.gpus_per_trial)
        except BaseException:
            self._tune_env.close()
            raise

    def close(self) -> None:
        self._tune_env.close()
        if self._started:
            import ray

            ray.shutdown()
            self._started = False

    def run_arm(self, job: ArmJob) -> ArmResult:
        tuner, study_callback = self._tuner(job)
        t0 = time.perf_counter()
        try:
            tuner.fit()
        finally:
            study_callback.close()
        done, total = job.collector.done, len(job.configs)
        if done < total:
            # Tune handles Ctrl-C itself: it stops the trials cleanly and fit() returns as if done.
            raise KeyboardInterrupt(f"the {job.arm.name} arm was interrupted after {done}/{total} trials")
        return job.result(time.perf_counter() - t0)

    def _tuner(self, job: ArmJob) -> tuple[tune.Tuner, StudyCallback]:
        from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

        arm, budget = job.arm, job.budget
        resources = {"cpu": budget.cpus_per_trial, "gpu": budget.gpus_per_trial}
        trainable = tune.with_resources(
            tune.with_parameters(_ray_trainable, spec=job.spec, fallback_dir=job.fallback_dir), resources
        )

        def trial_name(trial: Any) -> str:
            return f"{arm.name}-{int(trial.config['config_id']):03d}"

        study_callback = StudyCallback(job.collector)
        tuner = tune.Tuner(
            trainable,
            param_space=_param_space(job),
            tune_config=tune.TuneConfig(
                scheduler=arm.ray_scheduler(budget),
                num_samples=1,
                reuse_actors=True,
                trial_name_creator=trial_name,
                trial_dirname_creator=trial_name,
            ),
            run_config=tune.RunConfig(
                name=job.name,
                storage_path=str(job.output / "ray"),
                verbose=0,
                callbacks=[study_callback, JsonLoggerCallback(), CSVLoggerCallback(), *self.callbacks],
                failure_config=tune.FailureConfig(max_failures=budget.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            ),
        )
        return tuner, study_callback


def _param_space(job: ArmJob) -> dict[str, Any]:
    """A grid over ``config_id``; every other hyperparameter is looked up from the sampled configuration."""
    configs = job.configs
    space: dict[str, Any] = {"config_id": tune.grid_search([c["config_id"] for c in configs])}
    by_id = {c["config_id"]: c for c in configs}
    for key in configs[0]:
        if key != "config_id":
            space[key] = tune.sample_from(_lookup(by_id, key))
    if job.link is not None:
        space["mlflow"] = dict(job.link)
    return space


def _lookup(by_id: dict[Any, dict[str, Any]], key: str) -> Callable[[Any], Any]:
    def value(config: Any) -> Any:
        return by_id[config["config_id"]][key]

    return value


#: Tune settings of a study's ``Tuner`` runs, set (where the caller has not set them) between the backend's
#: ``open`` and ``close`` only.
STUDY_TUNE_ENV = {
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",  # no TensorBoard logger: the study adds CSV + JSON itself
    "RAY_AIR_NEW_OUTPUT": "0",
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "1000",
}


def init_ray(address: str | None, cpus_per_trial: float, gpus_per_trial: float) -> bool:
    """Start (or connect to) Ray; True when this call started it. Checks the trial fits the cluster."""
    import ray

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
