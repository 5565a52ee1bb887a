"""Layer coverage: recurrent, attention, embedding and HF Conv1D layers measured by default against the
float64 reference; parameter coverage reported and warned about; the layer table extended by users."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from neve_tune import VelocityMonitor, register_layer_rule
from neve_tune._measure import layertable as _layertable
from tests.velocity_reference import ReferenceVelocity

RTOL, ATOL = 1e-4, 1e-7


class Tagger(nn.Module):
    """Embedding + bidirectional LSTM (batch_first=False: (T, N, 2H)) + Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(40, 8)
        self.lstm = nn.LSTM(8, 6, bidirectional=True)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        return self.head(self.lstm(self.emb(x.t()))[0])


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 24, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.enc(self.inp(x)))


def gpt2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2Model(config)


def bert() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
    )
    return transformers.BertModel(config)


def reference_responses(model: nn.Module, names: list[str], batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """name -> (neurons, outputs) float64, read as the test spells it: output[0] of LSTM/MHA, neurons last."""
    modules = dict(model.named_modules())
    parts: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = []
    for name in names:

        def hook(mod, inputs, out, name=name):
            if isinstance(mod, (nn.LSTM, nn.MultiheadAttention)):
                out = out[0]
            y = out.detach().to(torch.float64).movedim(-1, 0)
            parts[name].append(y.reshape(y.shape[0], -1).clone())

        handles.append(modules[name].register_forward_hook(hook))
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                out = model(batch)
                assert out is not None
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(p, dim=1) for n, p in parts.items()}


def perturb(model: nn.Module, gen: torch.Generator, scale: float = 0.05) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen) * (p.abs().mean() + 1e-3))


CASES = {
    "lstm_bidirectional": (Tagger, lambda g: torch.randint(0, 40, (6, 7), generator=g), {"lstm": 12, "emb": 8}),
    "transformer_encoder": (
        Encoder,
        lambda g: torch.randn(6, 7, 5, generator=g),
        {"enc.layers.0.self_attn": 16, "enc.layers.1.linear1": 24},
    ),
    "gpt2": (gpt2, lambda g: torch.randint(0, 50, (6, 8), generator=g), {"h.0.attn.c_attn": 96, "wte": 32}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sequence_models_match_float64_reference(case, compute_path):
    factory, make_aux, widths = CASES[case]
    torch.manual_seed(0)
    model = factory()
    gen = torch.Generator().manual_seed(1)
    aux = make_aux(gen)
    monitor = VelocityMonitor(model, aux, batch_size=3)
    assert monitor.measure() is None
    names = monitor.layer_names
    for name in widths:
        assert name in names
    ref = ReferenceVelocity(momentum=0.5)
    batches = list(aux.split(3))
    assert ref.update(reference_responses(model, names, batches)) is None
    for epoch in range(3):
        perturb(model, gen)
        V, D, v = ref.update(reference_responses(model, names, batches))
        m = monitor.measure()
        assert m.model_velocity == pytest.approx(V, rel=RTOL, abs=ATOL)
        if epoch:
            assert m.velocity_change == pytest.approx(D, rel=RTOL, abs=ATOL)
        for name in names:
            torch.testing.assert_close(m.layers[name], v[name], rtol=RTOL, atol=ATOL)
        for name, width in widths.items():
            assert m.layers[name].numel() == width
        assert V > 1e-4
    assert monitor.coverage == pytest.approx(1.0)


class DecoderStep(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dec = nn.TransformerDecoderLayer(16, 2, 32, batch_first=True)

    def forward(self, x):
        return self.dec(x, x)


@pytest.mark.parametrize(
    "factory, make_aux",
    [
        (lambda: nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), lambda: torch.randn(8, 5, 16)),
        (DecoderStep, lambda: torch.randn(8, 5, 16)),
        (bert, lambda: torch.randint(0, 50, (8, 8))),
        (gpt2, lambda: torch.randint(0, 50, (8, 8))),
    ],
    ids=["encoder_layer", "decoder_layer", "bert", "gpt2"],
)
def test_default_layers_cover_transformer_blocks(factory, make_aux):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no coverage warning
        monitor = VelocityMonitor(factory(), make_aux())
        monitor.measure()
        monitor.measure()
    assert monitor.coverage >= 0.9


class Hidden(nn.Module):
    """Most weights in a Parameter used through F.linear: no default rule sees them."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(64, 16))

    def forward(self, x):
        return F.linear(x, self.weight)


class HidingNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = Hidden()
        self.head = nn.Linear(64, 2)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


def test_low_coverage_warns_once_naming_the_module():
    model = HidingNet()
    with pytest.warns(UserWarning, match=r"only 11% .*'body' \(Hidden, 1,024 parameters\).*register_layer_rule") as rec:
        monitor = VelocityMonitor(model, torch.randn(4, 16))
        monitor.measure()
        monitor.measure()
    assert len([w for w in rec if "NeVe measures" in str(w.message)]) == 1
    assert monitor.coverage == pytest.approx(130 / (1024 + 130))
    assert monitor.unmeasured_modules() == [("body", "Hidden", 1024)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        covered = VelocityMonitor(model, torch.randn(8, 16), layers=["body", "head"])
    assert covered.coverage == 1.0


class Pair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 6)

    def forward(self, x):
        y = self.lin(x)
        return y, y.sum()


def test_register_layer_rule_reads_a_tuple_output_and_joins_the_defaults(monkeypatch):
    monkeypatch.setattr(_layertable, "_USER", [])
    model = nn.Sequential(Pair())
    with pytest.raises(TypeError, match=r"returns tuple.*register_layer_rule\(Pair, output=0"):
        VelocityMonitor(model, torch.randn(3, 4), layers=[Pair]).measure()
    register_layer_rule("Pair", output=0, dim=-1)
    monitor = VelocityMonitor(model, torch.randn(3, 4))
    assert monitor.layer_names == ["0", "0.lin"]
    monitor.measure()
    with torch.no_grad():
        model[0].lin.weight.mul_(-1)
    m = monitor.measure()
    assert m.layers["0"].numel() == 6
    torch.testing.assert_close(m.layers["0"], m.layers["0.lin"])
    register_layer_rule(Pair, default=False)
    assert VelocityMonitor(model, torch.randn(3, 4)).layer_names == ["0.lin"]
    with pytest.raises(TypeError, match="nn.Module subclass"):
        register_layer_rule(int)  # type: ignore[arg-type]
