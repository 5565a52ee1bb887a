"""neve_tune.transformers.NeVeCallback under a real Hugging Face Trainer (tiny BERT from a config, CPU),
and the nn.TransformerEncoder measurement (fast path, padding mask)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import neve_tune
from neve_tune import StopReason

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from transformers import BertConfig, BertForTokenClassification, Trainer, TrainingArguments  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from neve_tune.transformers import STATE_FILE, NeVeCallback  # noqa: E402
from tests.readme import readme_example  # noqa: E402

hf_logging.set_verbosity_error()

VOCAB, SEQ, LABELS = 100, 16, 4
STEPS_PER_EPOCH = 8  # 64 sequences, batch 8


class TokenTask(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Each token's label is its id mod 4: learnable from the embedding alone."""

    def __init__(self, n: int = 64, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB, (n, SEQ), generator=gen)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids % LABELS}


def tiny_bert() -> BertForTokenClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, num_labels=LABELS, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return BertForTokenClassification(config)


def aux() -> dict[str, torch.Tensor]:
    out = neve_tune.token_aux(VOCAB, SEQ, n=32, attention_mask="full", special_ids=[0])
    assert isinstance(out, dict)
    return out


def make_args(out: Path, **kw: Any) -> TrainingArguments:
    options: dict[str, Any] = dict(
        output_dir=str(out), use_cpu=True, report_to=[], per_device_train_batch_size=8, save_strategy="no",
        logging_steps=500, disable_tqdm=True, seed=0, num_train_epochs=3,
    )  # fmt: skip
    options.update(kw)
    return TrainingArguments(**options)


def train(out: Path, callback: NeVeCallback | None, resume: str | None = None, **kw: Any) -> Trainer:
    trainer = Trainer(
        model=tiny_bert(), args=make_args(out, **kw), train_dataset=TokenTask(),
        callbacks=[] if callback is None else [callback],
    )  # fmt: skip
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def neve_entries(trainer: Trainer) -> list[dict[str, Any]]:
    return [e for e in trainer.state.log_history if "neve/epoch" in e]


def test_one_step_per_epoch_with_the_logged_loss(tmp_path: Path) -> None:
    callback = NeVeCallback(aux())
    trainer = train(tmp_path, callback, logging_steps=3)  # logs at 3, 6 (Trainer) and 8 (asked for by NeVe)
    entries = neve_entries(trainer)
    assert [e["neve/epoch"] for e in entries] == [1.0, 2.0, 3.0]
    assert [e["step"] for e in entries] == [8, 16, 24]
    assert callback.neve is not None and callback.neve.last_epoch == 3
    assert callback.neve.monitor.coverage >= 0.9
    losses = {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}
    # neve/train_loss is the epoch's mean loss: the logged losses weighted by the steps each covers
    for entry, first in zip(entries, (0, 8, 16), strict=True):
        logged = sorted(s for s in losses if first < s <= first + STEPS_PER_EPOCH)
        bounds = [first, *logged]
        mean = sum(losses[s] * (s - b) for s, b in zip(logged, bounds, strict=False)) / STEPS_PER_EPOCH
        assert entry["neve/train_loss"] == pytest.approx(mean, rel=1e-9)
        assert entry["neve/model_velocity"] > 0 and math.isfinite(entry["neve/model_velocity"])
    assert "neve/velocity_change" not in entries[0] and "neve/velocity_change" in entries[1]
    assert callback.stop_reason is None and trainer.state.global_step == 3 * STEPS_PER_EPOCH


@pytest.mark.parametrize(("n", "steps"), [(4, [4, 8, 12, 16, 20, 24]), (5, [5, 10, 15, 20])])
def test_every_n_steps(tmp_path: Path, n: int, steps: list[int]) -> None:
    trainer = train(tmp_path, NeVeCallback(aux(), every_n_steps=n))
    entries = neve_entries(trainer)
    assert [e["step"] for e in entries] == steps  # 24 optimizer steps // n
    assert [e["neve/epoch"] for e in entries] == [float(i + 1) for i in range(len(steps))]
    assert all("neve/train_loss" in e for e in entries)


def test_lr_decay_survives_the_trainers_scheduler(tmp_path: Path) -> None:
    options = dict(logging_steps=1, num_train_epochs=4, learning_rate=5e-4)  # the default linear schedule
    plain = train(tmp_path / "plain", None, **options)
    callback = NeVeCallback(aux(), every_n_steps=4, patience=0, min_epochs=100)  # decays at step 24 here
    decayed = train(tmp_path / "neve", callback, **options)
    lr_plain = {e["step"]: e["learning_rate"] for e in plain.state.log_history if "learning_rate" in e}
    lr_neve = {e["step"]: e["learning_rate"] for e in decayed.state.log_history if "learning_rate" in e}
    decays = {int(e["step"]): int(e["neve/num_decays"]) for e in neve_entries(decayed)}
    assert callback.neve is not None and callback.neve.rule.num_decays >= 1, decays
    first = min(step for step, k in decays.items() if k >= 1)
    checked = 0
    for step in range(1, 4 * STEPS_PER_EPOCH):
        # the LR of optimizer step `step`: the Trainer's schedule times 0.5 per decay taken before it
        k = max((num for s, num in decays.items() if s < step), default=0)
        assert lr_neve[step] == pytest.approx(lr_plain[step] * 0.5**k, rel=1e-9), (step, k)
        checked += step > first + 3  # several steps after the decay, the schedule kept it
    assert checked >= 3
    # and the optimizer's own groups agree at the end
    last = decayed.optimizer.param_groups[0]["lr"]
    assert last == pytest.approx(plain.optimizer.param_groups[0]["lr"] * 0.5**callback.neve.rule.num_decays)


def test_neve_as_the_trainers_lr_scheduler_is_refused(tmp_path: Path) -> None:
    model = tiny_bert()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5)
    neve = neve_tune.NeVe(model, opt, aux())
    trainer = Trainer(
        model=model, args=make_args(tmp_path), train_dataset=TokenTask(), optimizers=(opt, neve),
        callbacks=[NeVeCallback(aux())],
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"calls lr_scheduler.step\(\) after every optimizer step") as err:
        trainer.train()
    assert "optimizers=(optimizer, None)" in str(err.value)
    assert neve.last_epoch == 0


def test_neve_as_the_trainers_lr_scheduler_without_the_callback_is_refused_at_its_first_step(tmp_path: Path) -> None:
    """The usual misuse: no NeVeCallback at all; the core refuses the Trainer's per-batch scheduler step."""
    model = tiny_bert()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5)
    neve = neve_tune.NeVe(model, opt, aux())
    trainer = Trainer(model=model, args=make_args(tmp_path), train_dataset=TokenTask(), optimizers=(opt, neve))
    with pytest.raises(ValueError, match=r"NeVe.step\(\) was called by (transformers|accelerate)\.") as err:
        trainer.train()
    assert "optimizers=(optimizer, None)" in str(err.value) and "NeVeCallback" in str(err.value)
    assert neve.last_epoch == 0 and neve.last_result is None  # refused before it measured or counted
    # the same NeVe, stepped by the user's own loop, still works
    assert neve.step().model_velocity is not None and neve.last_epoch == 1


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="every_n_steps must be an integer >= 1"):
        NeVeCallback(aux(), every_n_steps=0)
    with pytest.raises(TypeError, match="takes the Trainer's model and optimizer itself"):
        NeVeCallback(aux(), model=nn.Linear(2, 2))


def test_resume_from_a_checkpoint_gives_identical_velocities(tmp_path: Path) -> None:
    options = dict(save_strategy="epoch", num_train_epochs=4)
    full = train(tmp_path, NeVeCallback(aux(), min_epochs=10), **options)
    checkpoint = tmp_path / "checkpoint-16"  # after epoch 2
    assert (checkpoint / STATE_FILE).is_file()
    callback = NeVeCallback(aux(), min_epochs=10)
    resumed = train(tmp_path, callback, resume=str(checkpoint), **options)
    want = {e["neve/epoch"]: e for e in neve_entries(full)}
    got = [e for e in neve_entries(resumed) if e["step"] > 16]
    assert [e["neve/epoch"] for e in got] == [3.0, 4.0]
    for entry in got:
        for key in ("neve/model_velocity", "neve/velocity_change", "neve/train_loss", "neve/lr"):
            assert entry[key] == want[entry["neve/epoch"]][key], key


def test_resume_without_a_neve_state_warns_and_rebaselines(tmp_path: Path) -> None:
    train(tmp_path, None, save_strategy="epoch", num_train_epochs=2)
    callback = NeVeCallback(aux())
    with pytest.warns(UserWarning, match=f"no {STATE_FILE} for that step"):
        train(tmp_path, callback, resume=str(tmp_path / "checkpoint-8"), num_train_epochs=2)
    assert callback.neve is not None and callback.neve.last_epoch == 1  # epoch 2 only, counted from 0


def test_tiny_bert_at_the_default_lr_stalls_and_a_healthy_one_converges(tmp_path: Path) -> None:
    """Issue 12: at lr 5e-5 the tiny BERT barely learns; it used to be called converged at epoch 1."""
    slow = NeVeCallback(aux())
    trainer = train(tmp_path / "slow", slow, learning_rate=5e-5, num_train_epochs=20)
    entries = neve_entries(trainer)
    assert slow.stop_reason is StopReason.STALLED
    assert len(entries) == 6 and trainer.state.global_step == 6 * STEPS_PER_EPOCH  # warm-up 5, then 2 loss windows
    assert entries[-1]["neve/stalled"] == 1.0 and entries[-1]["neve/converged"] == 0.0
    assert entries[-1]["neve/train_loss"] > 0.95 * math.log(LABELS)  # it did not learn
    assert all(e["neve/converged"] == 0.0 for e in entries)

    healthy = NeVeCallback(aux())
    trainer = train(tmp_path / "healthy", healthy, learning_rate=2e-3, num_train_epochs=40)
    entries = neve_entries(trainer)
    assert healthy.stop_reason is StopReason.CONVERGED
    assert 8 <= len(entries) <= 20 and trainer.state.global_step == len(entries) * STEPS_PER_EPOCH
    assert entries[-1]["neve/train_loss"] < 0.1 * math.log(LABELS)


def test_neve_metrics_reach_the_trainers_mlflow_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mlflow = pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "hf-neve")
    mlflow.set_tracking_uri(uri)
    try:
        # logging_steps=3: the Trainer logs at steps 3, 6, 9, ...; NeVe has it log at 8 and 16 as well
        # (epoch ends), while at 24 the loss was logged already and NeVe steps at the epoch end itself
        train(tmp_path / "out", NeVeCallback(aux()), report_to=["mlflow"], logging_steps=3)
        client = mlflow.MlflowClient(uri)
        experiment = client.get_experiment_by_name("hf-neve")
        (run,) = client.search_runs([experiment.experiment_id])
        history = client.get_metric_history(run.info.run_id, "neve/model_velocity")
        assert sorted(m.step for m in history) == [8, 16, 24]
        assert all(m.value > 0 for m in history)
        loss_steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss"))
        assert loss_steps == [3, 6, 8, 9, 12, 15, 16, 18, 21, 24]
        epochs = sorted(client.get_metric_history(run.info.run_id, "neve/epoch"), key=lambda m: m.step)
        assert [m.value for m in epochs] == [1.0, 2.0, 3.0]
    finally:
        mlflow.set_tracking_uri("")


def test_readme_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {}
    exec(readme_example("hf-trainer"), namespace)
    callback, trainer = namespace["callback"], namespace["trainer"]
    assert callback.stop_reason is StopReason.CONVERGED  # at epoch 12 on the machine the README names
    entries = neve_entries(trainer)
    assert 8 <= len(entries) <= 20 and entries[-1]["neve/converged"] == 1.0
    assert entries[-1]["neve/train_loss"] < 0.1 and entries[0]["neve/train_loss"] > 1.0
    assert sorted(p.name for p in tmp_path.glob("hf-neve/checkpoint-*/neve_state.pt")) == ["neve_state.pt"]


# ---------------------------------------------------------------------- nn.TransformerEncoder


class EncoderClassifier(nn.Module):
    def __init__(self, padding_mask: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2)
        self.head = nn.Linear(32, 3)
        self.padding_mask = padding_mask

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = (ids == 0) if self.padding_mask else None
        return self.head(self.encoder(self.embed(ids), src_key_padding_mask=mask).mean(1))


def responses(model: nn.Module, names: list[str], ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Reference responses, float64, neurons on the last dim (MHA: output[0]), from the training-mode path
    (dropout 0: the same function, never the fused or nested-tensor fast path)."""
    modules = dict(model.named_modules())
    got: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:

        def hook(_m: nn.Module, _i: Any, out: Any, name: str = name) -> None:
            y = (out[0] if isinstance(out, tuple) else out).detach().double()
            got[name] = y.reshape(-1, y.shape[-1]).T

        handles.append(modules[name].register_forward_hook(hook))
    model.train()
    with torch.no_grad():
        model(ids)
    for handle in handles:
        handle.remove()
    return got


@pytest.mark.parametrize("padding_mask", [False, True])
def test_transformer_encoder_is_measured_on_its_inner_modules(padding_mask: bool) -> None:
    torch.manual_seed(0)
    model = EncoderClassifier(padding_mask)
    ids = torch.randint(1, 50, (8, 10), generator=torch.Generator().manual_seed(1))
    ids[:, 7:] = 0  # right padding: the encoder's eval path would pack it into a nested tensor
    monitor = neve_tune.VelocityMonitor(model, ids, momentum=0.0)
    monitor.measure()
    assert model.encoder.use_nested_tensor  # switched off for the measurement's passes only
    inner = [n for n in monitor.layer_names if n.startswith("encoder.layers.")]
    assert len(inner) == 10  # self_attn, linear1, linear2, norm1, norm2 per layer
    assert monitor.coverage == 1.0
    before = responses(model, inner, ids)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    after = responses(model, inner, ids)
    m = monitor.measure()
    assert m is not None
    for name in inner:
        want = 1 - torch.nn.functional.cosine_similarity(after[name], before[name], dim=1)
        assert m.layers[name].shape == (32 if "linear1" not in name else 64,)
        torch.testing.assert_close(m.layers[name], want, rtol=1e-4, atol=1e-7)
