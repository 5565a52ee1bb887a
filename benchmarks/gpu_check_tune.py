"""Items 5 and 6 of the GPU check (``gpu_check.py`` runs them after items 1-4, in the same process).

5. Ray Tune: 4 trials of a ResNet-20 on generated CIFAR-shaped images, ``{"gpu": 0.25}`` each (on the CPU
   ``{"cpu": 0.5}``), under ``NeVeScheduler``; each trains and measures on ``neve_tune.ray.trial_device()``;
   every trial ends with a stop reason, and the GPU memory the trials took is free again once they stopped.
6. The CLI: ``neve-tune study run gpu_check_tune:GENERATED_CIFAR --gpus-per-trial 0.25 ...`` (its
   ``cli.main``, in this process, on the Ray that item 5 started), printing its table.

The data are generated, not CIFAR: tensors of CIFAR-10's shape (3x32x32, 10 classes), a fixed random pattern
per class plus noise, so that a network learns them. Nothing is downloaded (the GPU machine cannot). Ray
workers import this module by name (``GENERATED_CIFAR``); Ray puts the driver's script folder on their path.
"""

from __future__ import annotations

import csv
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from gpu_check_velocity import Check, Result
from torch import Tensor, nn

from neve_tune import NeVe, StopReason, noise_aux
from neve_tune.studies import Budget, DataRequest, LogUniform, NeVeSettings, StudyDefinition, TensorData
from neve_tune.studies.builtin.cifar import resnet20

MiB = 2**20


def generated_cifar(n: int, seed: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """``n`` generated CIFAR-shaped images (3x32x32) and labels (10 classes): half a fixed random pattern of
    the class plus unit noise, so that they can be learned. Not CIFAR."""
    gen = torch.Generator().manual_seed(seed)
    patterns = torch.randn(10, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    x = 0.5 * patterns[y] + torch.randn(n, 3, 32, 32, generator=gen)
    return x.to(device), y.to(device)


def train_epoch(
    model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor, batch: int, autocast: bool
) -> Tensor:
    """One epoch of SGD steps in order (bf16 autocast if asked); the mean loss, as a tensor (no sync)."""
    model.train()
    total = torch.zeros((), device=x.device)
    for xb, yb in zip(x.split(batch), y.split(batch), strict=True):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = nn.functional.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.detach() * len(yb)
    return total / len(y)


# ---------------------------------------------------------------------------------------------- item 5
def tune_trial(config: dict[str, Any]) -> None:
    """A Ray Tune trial: ResNet-20 on generated images, NeVe measuring on the trial's own device."""
    from neve_tune.ray import report_epoch, trial_device

    device = trial_device()
    x, y = generated_cifar(config["n"], seed=0, device=device)
    torch.manual_seed(0)
    model = resnet20(10).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=0.9)
    neve = NeVe(model, opt, noise_aux((3, 32, 32), n=config["aux"]), patience=1)
    velocity_device = neve.monitor.state_dict(snapshot="none")["v"].device
    for _ in range(config["epochs"]):
        loss = train_epoch(model, opt, x, y, 128, autocast=device.type == "cuda")
        used = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
        metrics = {"device": str(device), "velocity_device": str(velocity_device), "device_bytes": used}
        report_epoch(neve, metrics, model=model, optimizer=opt, train_loss=float(loss), checkpoint_every=0)


def start_ray(dev: torch.device) -> None:
    import ray

    if not ray.is_initialized():
        cpus = None if dev.type == "cuda" else 2  # the GPU machine: all its CPUs and its GPU
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)


def free_device_bytes(dev: torch.device) -> int:
    return torch.cuda.mem_get_info(dev)[0]


def check_tune(dev: torch.device, quick: bool, memory: dict[str, Any]) -> Result:
    """4 trials (one diverges on purpose) with a fractional GPU each; ``memory`` gets the free device memory
    before and after them."""
    from ray import tune

    from neve_tune.ray import NeVeScheduler

    start_ray(dev)
    cuda = dev.type == "cuda"
    # On the CPU, one trial per CPU in reused actors (two worker processes, not four: each imports torch); on
    # the GPU every trial gets its own actor, whose exit must give its memory back (5b).
    resources = {"cpu": 1, "gpu": 0.25} if cuda else {"cpu": 1}
    epochs = 2 if quick else 4
    space = {"lr": tune.grid_search([0.01, 0.05, 0.2, 1e4]), "epochs": epochs}  # 1e4 diverges
    space.update(n=64 if quick else 5_000, aux=8 if quick else 100)
    free_before = free_device_bytes(dev) if cuda else 0
    with tempfile.TemporaryDirectory(prefix="gpu_check_tune_") as tmp:
        tuner = tune.Tuner(
            tune.with_resources(tune_trial, resources),
            param_space=space,
            tune_config=tune.TuneConfig(scheduler=NeVeScheduler(max_t=epochs, grace_period=1), reuse_actors=not cuda),
            run_config=tune.RunConfig(storage_path=tmp, name="gpu_check", verbose=0),
        )
        results = tuner.fit()
    trials = [trial_row(results[i].config or {}, results[i].metrics or {}) for i in range(len(results))]
    reasons = {s.value for s in StopReason}
    expected = "cuda:0" if cuda else "cpu"
    ok = results.num_errors == 0 and len(trials) == 4
    ok = ok and all(t["reason"] in reasons and t["device"] == t["velocity_device"] == expected for t in trials)
    figure = "; ".join(f"lr {t['lr']:g}: {t['reason']} at epoch {t['epoch']} on {t['device']}" for t in trials)
    details: dict[str, Any] = {"trials": trials, "resources": resources}  # memory: in check 5b's details
    if cuda:
        ok = ok and all(t["device_mib"] > 0 for t in trials)
        memory.update(memory_returned(dev, free_before))
    return "PASSED" if ok else "FAILED", f"{len(trials)} trials with {resources}: {figure}", details


def trial_row(config: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    """What check 5a reads from a trial's last result."""
    from neve_tune.keys import STOP_EPOCH, STOP_REASON

    return {
        "lr": config.get("lr"),
        "reason": metrics.get(STOP_REASON),
        "epoch": metrics.get(STOP_EPOCH),
        "device": metrics.get("device"),
        "velocity_device": metrics.get("velocity_device"),
        "device_mib": metrics.get("device_bytes", 0) / MiB,
    }


def memory_returned(dev: torch.device, free_before: int, wait_s: float = 30.0) -> dict[str, Any]:
    """Free device memory after the trials stopped, against before they started (polled while actors exit)."""
    waited = time.perf_counter()
    free_after = free_device_bytes(dev)
    while free_after < free_before - 64 * MiB and time.perf_counter() - waited < wait_s:
        time.sleep(0.5)
        free_after = free_device_bytes(dev)
    return {
        "free_before_mib": free_before / MiB,
        "free_after_mib": free_after / MiB,
        "waited_s": time.perf_counter() - waited,
        "returned": free_after >= free_before - 64 * MiB,
    }


def check_memory_returned(memory: dict[str, Any], dev: torch.device) -> Result:
    if dev.type != "cuda":
        return "SKIPPED", "n/a (cpu): the trials held no GPU memory", {}
    if not memory:
        return "FAILED", "check 5a did not finish, so nothing was measured", {}
    figure = (
        f"free {memory['free_after_mib']:.0f} MiB after the trials stopped ({memory['waited_s']:.1f} s),"
        f" {memory['free_before_mib']:.0f} MiB before they started (target: within 64 MiB)"
    )
    return "PASSED" if memory["returned"] else "FAILED", figure, memory


# ---------------------------------------------------------------------------------------------- item 6
def _generated_study(name: str, n_train: int, n_test: int, aux_samples: int) -> StudyDefinition:
    def load_data(request: DataRequest) -> TensorData:
        x, y = generated_cifar(n_train + n_test, seed=request.seed)
        n_val = round(request.val_fraction * n_train)
        train, val, test = slice(n_val, n_train), slice(0, n_val), slice(n_train, None)
        splits = (x[train], y[train], x[val], y[val], x[test], y[test])
        return TensorData(*splits, batch_size=request.batch_size)

    return StudyDefinition(
        name=name,
        description=f"generated CIFAR-shaped tensors ({n_train} train, {n_test} test; not CIFAR), ResNet-20",
        input_shape=(3, 32, 32),
        num_classes=10,
        build_model=lambda config: resnet20(10),
        load_data=load_data,
        search_space={"lr": LogUniform(0.01, 0.3), "weight_decay": LogUniform(1e-5, 1e-3)},
        budget=Budget(
            trials=4, max_epochs=3, batch_size=128, grace_period=1, neve=NeVeSettings(aux_samples=aux_samples)
        ),
        data_note="generated in memory by benchmarks/gpu_check_tune.py",
    )


GENERATED_CIFAR = _generated_study("generated-cifar", 10_000, 2_000, 100)
GENERATED_CIFAR_QUICK = _generated_study("generated-cifar-quick", 128, 64, 8)


def check_cli(dev: torch.device, quick: bool) -> Result:
    from neve_tune.cli import main as cli_main

    start_ray(dev)  # the CLI runs on the Ray this process started
    arms, trials, epochs = (["neve"], 2, 2) if quick else (["neve", "asha"], 4, 3)
    study = "gpu_check_tune:GENERATED_CIFAR" + ("_QUICK" if quick else "")
    gpus, cpus = ("0.25", "1") if dev.type == "cuda" else ("0", "1")
    with tempfile.TemporaryDirectory(prefix="gpu_check_cli_") as tmp:
        argv = ["study", "run", study, "--arms", ",".join(arms), "--trials", str(trials), "--max-epochs", str(epochs)]
        argv += ["--gpus-per-trial", gpus, "--cpus-per-trial", cpus, "--no-mlflow", "--no-progress"]
        argv += ["--output-dir", tmp]
        print("neve-tune " + " ".join(argv), flush=True)
        code = cli_main(argv)
        tables = list(Path(tmp).glob("*/comparison.csv"))
        rows = list(csv.DictReader(tables[0].open())) if tables else []
    by_arm = {row["arm"]: row for row in rows}
    ok = code == 0 and sorted(by_arm) == sorted(arms)
    ok = ok and all(int(row["trials"]) == trials and row["stop_reasons"] for row in rows)
    figure = "; ".join(
        f"{row['arm']}: {row['trials']} trials, picked test acc {row['picked_test_acc']},"
        f" trial-epochs {row['trial_epochs']}, stop reasons {row['stop_reasons']}"
        for row in rows
    )
    where = f"--gpus-per-trial {gpus}" + ("" if dev.type == "cuda" else " (cpu: no GPU to share)")
    return "PASSED" if ok else "FAILED", f"exit {code}, {where}, generated data: {figure}", {"rows": rows}


def checks(dev: torch.device, quick: bool) -> list[Check]:
    """Items 5 and 6 (5b reads what 5a measured)."""
    memory: dict[str, Any] = {}
    return [
        ("5a", "Ray Tune trials under NeVeScheduler", lambda: check_tune(dev, quick, memory)),
        ("5b", "GPU memory returned after the trials", lambda: check_memory_returned(memory, dev)),
        ("6", "CLI study on generated CIFAR-shaped data", lambda: check_cli(dev, quick)),
    ]


def stop_ray() -> None:
    """Shut down the Ray that items 5-6 started, if any."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
