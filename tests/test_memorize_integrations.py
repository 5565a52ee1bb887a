"""The memorizing stop in every integration: Ray's scheduler, Optuna's report_epoch, Lightning's callback."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from neve_tune import Memorization, NeVe, StopReason, keys
from tests.test_memorize_neve import N, make_neve, noisy_task, run


def test_ray_scheduler_stops_a_memorizing_trial_and_records_the_reason():
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler

    from neve_tune.keys import STOP_REASON
    from neve_tune.ray import NeVeScheduler

    x, y, model, opt, aux = noisy_task()
    neve = make_neve(model, opt, aux)
    decisions = []
    scheduler = NeVeScheduler(grace_period=1)
    trial = Trial("train_fn", stub=True)
    for step in run(neve, model, opt, x, y):
        epoch = step.epoch
        result = {"training_iteration": epoch, "time_total_s": 0.1 * epoch, "trial_id": "x", "done": False}
        decisions.append(scheduler.on_trial_result(None, trial, {**result, **step.metrics()}))
    assert decisions[-1] == TrialScheduler.STOP and set(decisions[:-1]) == {TrialScheduler.CONTINUE}
    assert scheduler.stop_info(trial.trial_id).reason is StopReason.MEMORIZING
    scheduler.on_trial_complete(None, trial, {})
    assert trial.last_result[STOP_REASON] == "memorizing"


def test_optuna_trial_completes_with_the_value_of_the_restored_weights():
    optuna = pytest.importorskip("optuna")
    from neve_tune.optuna import report_epoch

    def objective(trial: Any) -> float:
        x, y, model, opt, aux = noisy_task()
        neve = make_neve(model, opt, aux)
        for step in run(neve, model, opt, x, y):
            with torch.no_grad():
                value = float((model(x).argmax(1) == y).float().mean())  # after the step: the restored model
            trial.set_user_attr(
                "kept_equal",
                all(torch.equal(model.state_dict()[k], v) for k, v in (neve.watch.best_state or {}).items()),
            )
            if report_epoch(trial, neve, value, step=step.epoch - 1):
                return value
        raise AssertionError("NeVe did not stop")

    study = optuna.create_study(direction="maximize")
    study.optimize(objective, n_trials=1)
    trial = study.trials[0]
    assert trial.state == optuna.trial.TrialState.COMPLETE
    assert trial.user_attrs["neve_stop_reason"] == "memorizing" and trial.user_attrs["kept_equal"]
    assert trial.user_attrs["neve"][keys.MEMORIZING] == 1.0
    assert trial.value == trial.intermediate_values[max(trial.intermediate_values)]


class _Indexed(Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.x[i], self.y[i], i


def test_lightning_callback_observes_training_step_outputs_and_ends_with_the_kept_weights():
    pl = pytest.importorskip("lightning.pytorch")
    from neve_tune.lightning import NeVeCallback

    x, y, model, _, aux = noisy_task()

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            return self.net(inputs)

        def training_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
            inputs, labels, idx = batch
            logits = self(inputs)
            return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits, "indices": idx}

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    callback = NeVeCallback(aux, min_epochs=3, memorization=Memorization(patience=3, anneal=False), log=False)
    options = dict(logger=False, enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False)
    trainer = pl.Trainer(max_epochs=40, callbacks=[callback], **options)
    loader = DataLoader(_Indexed(x, y), batch_size=50, shuffle=True, generator=torch.Generator().manual_seed(0))
    module = Module()
    trainer.fit(module, loader)
    assert callback.stop_reason is StopReason.MEMORIZING and trainer.current_epoch < 40
    kept = callback.neve.watch.best_state
    assert kept is not None and callback.last_result.restored_epoch == callback.last_result.flip_min_epoch
    assert all(torch.equal(module.state_dict()[k], v) for k, v in kept.items())
    assert callback.neve.watch.counter.size == N
    assert callback.history[-1][keys.MEMORIZING] == 1.0


def test_no_class_output_leaves_neve_unchanged():
    *_, model, opt, aux = noisy_task()
    neve = NeVe(model, opt, aux, min_epochs=3)
    with pytest.warns(UserWarning, match="no memorisation signal"):
        neve.observe(torch.randn(5, 1), range(5))
    step = neve.step(1.0)
    assert step.flip_fraction is None and keys.FLIP_FRACTION not in neve.metrics()


def test_hugging_face_trainer_observes_compute_loss_and_ends_with_the_kept_weights(tmp_path: Any) -> None:
    pytest.importorskip("transformers")
    from transformers import TrainingArguments
    from transformers.modeling_outputs import SequenceClassifierOutput

    from neve_tune.transformers import NeVeCallback, NeVeTrainer

    x, y, net, _, aux = noisy_task()

    class Classifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> SequenceClassifierOutput:
            logits = self.net(x)
            loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
            return SequenceClassifierOutput(loss=loss, logits=logits)

    class Rows(Dataset):
        def __len__(self) -> int:
            return N

        def __getitem__(self, i: int) -> dict[str, Any]:
            return {"x": x[i], "labels": y[i], "index": i}

    model = Classifier()
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=50, save_strategy="no",
        logging_strategy="epoch", disable_tqdm=True, seed=0, num_train_epochs=40, log_level="error",
        lr_scheduler_type="constant", max_grad_norm=0.0,
    )  # fmt: skip
    callback = NeVeCallback({"x": aux}, min_epochs=3, memorization=Memorization(patience=3, anneal=False))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    trainer = NeVeTrainer(model=model, args=args, train_dataset=Rows(), callbacks=[callback], optimizers=(opt, None))
    trainer.train()
    assert callback.stop_reason is StopReason.MEMORIZING and trainer.state.epoch < 40
    kept = callback.neve.watch.best_state
    assert kept is not None and callback.last_result.restored_epoch == callback.last_result.flip_min_epoch
    assert all(torch.equal(trainer.model.state_dict()[k], v) for k, v in kept.items())
    assert any(e.get(keys.MEMORIZING) == 1.0 for e in trainer.state.log_history)


class _Reporter:
    def needs_state(self, epoch: int) -> bool:
        return False

    def restore(self, model: Any, optimizer: Any, neve: Any, extra: dict) -> int:
        return 0

    def report(self, metrics: dict, **kwargs: Any) -> None:
        pass


def test_the_studies_neve_arm_observes_its_training_batches():
    import dataclasses

    from neve_tune.studies import get_study
    from neve_tune.studies._trial import TrialSpec, run_trial

    study = get_study("mnist1d-noisy")
    spec = TrialSpec("mnist1d-noisy", "neve", dataclasses.replace(study.budget, max_epochs=2))
    outcome = run_trial(spec, study.configs(1, 0)[0], _Reporter())
    assert outcome.epochs == 2 and 0.0 < outcome.final[keys.FLIP_FRACTION] < 1.0


def test_study_loaders_yield_dataset_indices_in_the_training_order():
    from torch.utils.data import TensorDataset

    from neve_tune.studies import DatasetData, TensorData

    x, y = torch.randn(10, 3), torch.arange(10)
    tensor = TensorData(x, y, x[:0], y[:0], x, y, batch_size=4)
    dataset = DatasetData(TensorDataset(x, y), None, TensorDataset(x, y), batch_size=4)
    for data in (tensor, dataset):
        plain = list(data.train_batches(torch.Generator().manual_seed(3)))
        indexed = list(data.indexed_train_batches(torch.Generator().manual_seed(3)))
        assert [b[1].tolist() for b in plain] == [b[1].tolist() for b in indexed]
        assert all(torch.equal(b[2], b[1]) and torch.equal(b[0], x[b[2]]) for b in indexed)  # y == index here


def test_mnist1d_noisy_study_flips_a_fifth_of_the_labels_before_the_validation_cut(capsys: Any) -> None:
    pytest.importorskip("mnist1d")
    from neve_tune.cli import main
    from neve_tune.studies import DataRequest, get_study
    from neve_tune.studies.builtin.mnist1d import generate_mnist1d

    clean = generate_mnist1d()
    true_label = {
        row.tobytes(): int(label) for row, label in zip(clean["x"].astype("float32"), clean["y"], strict=True)
    }
    data = get_study("mnist1d-noisy").load_data(DataRequest(val_fraction=0.1, seed=0, batch_size=64))

    def flipped(x: torch.Tensor, y: torch.Tensor) -> float:
        truth = torch.tensor([true_label[row.numpy().tobytes()] for row in x.squeeze(1)])
        return float((truth != y).float().mean())

    assert 0.18 < flipped(data.x_train, data.y_train) < 0.22
    assert 0.15 < flipped(data.x_val, data.y_val) < 0.25  # the baselines validate on noisy labels, as in real life
    assert torch.equal(data.y_test, torch.tensor(clean["y_test"]))  # a clean test split
    again = get_study("mnist1d-noisy").load_data(DataRequest(val_fraction=0.1, seed=0, batch_size=64))
    assert torch.equal(again.y_train, data.y_train)  # fixed flips
    assert main(["study", "list"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert lines["mnist1d-noisy"].index("MNIST-1D with 20%") == lines["digits"].index("scikit-learn")  # aligned
