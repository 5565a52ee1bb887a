"""Token aux sets: random ids, attention masks, dict batches, tokenized subsets, and real token models."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from neve_tune import VelocityMonitor, token_aux, token_subset_aux
from neve_tune._measure.inputs import as_batches
from tests.velocity_reference import ReferenceVelocity, capture_responses

RTOL = 1e-4


def test_token_aux_is_reproducible_in_range_and_leaves_the_global_rng_alone():
    before = torch.get_rng_state()
    a = token_aux(50, 12, n=30, seed=3)
    b = token_aux(50, 12, n=30, seed=3)
    assert torch.equal(torch.get_rng_state(), before)
    assert a.shape == (30, 12) and a.dtype == torch.long and torch.equal(a, b)
    assert not torch.equal(a, token_aux(50, 12, n=30, seed=4))
    assert int(a.min()) >= 0 and int(a.max()) <= 49
    assert len(a.unique()) > 40  # uniform over the vocabulary: 360 draws reach nearly all 50 ids
    ids = token_aux(6, 100, n=20, special_ids=[0, 5])
    assert set(ids.unique().tolist()) == {1, 2, 3, 4}
    assert token_aux(1, 3, n=2).tolist() == [[0, 0, 0], [0, 0, 0]]


def test_token_aux_masks():
    full = token_aux(50, 8, n=5, attention_mask="full")
    assert sorted(full) == ["attention_mask", "input_ids"]
    assert full["attention_mask"].dtype == torch.long and torch.equal(full["attention_mask"], torch.ones(5, 8).long())
    assert torch.equal(full["input_ids"], token_aux(50, 8, n=5))  # the same ids as without a mask

    before = torch.get_rng_state()
    pad = token_aux(50, 16, n=200, attention_mask="random_padding", pad_id=49, special_ids=[49], key="ids")
    again = token_aux(50, 16, n=200, attention_mask="random_padding", pad_id=49, special_ids=[49], key="ids")
    assert torch.equal(torch.get_rng_state(), before)
    assert sorted(pad) == ["attention_mask", "ids"] and all(torch.equal(pad[k], again[k]) for k in pad)
    mask, ids = pad["attention_mask"], pad["ids"]
    assert mask.shape == ids.shape == (200, 16)
    lengths = mask.sum(1)
    assert int(lengths.min()) >= 1 and int(lengths.max()) == 16 and len(lengths.unique()) == 16
    # right padding: ones then zeros; the pad id exactly on the padding, never drawn elsewhere
    assert torch.equal(mask, (torch.arange(16) < lengths.unsqueeze(1)).long())
    assert torch.equal(ids == 49, mask == 0)
    plain = token_aux(50, 8, n=3, as_dict=True)  # a dict without a mask
    assert list(plain) == ["input_ids"] and torch.equal(plain["input_ids"], token_aux(50, 8, n=3))


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"vocab_size": 0}, ValueError, r"vocab_size must be an integer >= 1, but got vocab_size=0\."),
        ({"seq_len": 0}, ValueError, r"seq_len must be an integer >= 1, but got seq_len=0\."),
        ({"n": 0}, ValueError, r"n must be an integer >= 1, but got n=0\."),
        ({"n": 2.5}, ValueError, r"n must be an integer >= 1, but got n=2\.5\."),
        ({"attention_mask": "left"}, ValueError, r"attention_mask must be False, 'full' or 'random_padding'"),
        ({"attention_mask": "full", "as_dict": False}, ValueError, r"needs as_dict=True"),
        ({"pad_id": 10}, ValueError, r"pad_id must lie in \[0, vocab_size=10\), but got pad_id=10\."),
        ({"special_ids": [3, 12]}, ValueError, r"special_ids must lie in \[0, vocab_size=10\), but got \[12\]\."),
        ({"special_ids": range(10)}, ValueError, r"special_ids exclude every id"),
    ],
)
def test_token_aux_refuses_bad_arguments(kwargs, error, message):
    args = {"vocab_size": 10, "seq_len": 4, **kwargs}
    with pytest.raises(error, match=message):
        token_aux(**args)


def test_dict_aux_splits_consistently_along_dim_0():
    aux = token_aux(50, 6, n=10, attention_mask="random_padding")
    aux["scale"] = 2.0
    batches = as_batches(aux, batch_size=4)
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4, 2]
    for k in ("input_ids", "attention_mask"):
        assert torch.equal(torch.cat([b[k] for b in batches]), aux[k])
    assert all(b["scale"] == 2.0 for b in batches)
    assert len(as_batches(aux)) == 1 and as_batches(aux)[0]["input_ids"] is not None
    with pytest.raises(ValueError, match="must share their size along dim 0"):
        as_batches({"input_ids": torch.zeros(4, 3), "attention_mask": torch.ones(5, 3)})
    with pytest.raises(ValueError, match="needs tensor values"):
        as_batches({"input_ids": [1, 2]})
    with pytest.raises(ValueError, match="The aux set is empty"):
        as_batches({"input_ids": torch.zeros(0, 3)})


class Masked(nn.Module):
    """Takes ids and a mask as keywords, like a Hugging Face model: the monitor calls model(**batch)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.fc = nn.Linear(8, 5)

    def forward(self, input_ids, attention_mask):
        return self.fc(self.emb(input_ids) * attention_mask.unsqueeze(-1))


@pytest.mark.filterwarnings("ignore:NeVe measures only")  # layers=[nn.Linear] on purpose, for the reference
def test_dict_aux_is_passed_as_keywords_and_batching_does_not_change_velocity():
    torch.manual_seed(0)
    model = Masked()
    aux = token_aux(50, 7, n=12, attention_mask="random_padding", seed=1)
    mons = [
        VelocityMonitor(model, aux, layers=[nn.Linear]),
        VelocityMonitor(model, aux, layers=[nn.Linear], batch_size=5),
    ]
    ref = ReferenceVelocity()
    for m in mons:
        assert m.measure() is None
    ref.update(capture_responses(_Keywords(model), ["m.fc"], [aux]))
    with torch.no_grad():
        model.fc.weight.add_(0.2 * torch.randn(model.fc.weight.shape, generator=torch.Generator().manual_seed(2)))
    V, _, _ = ref.update(capture_responses(_Keywords(model), ["m.fc"], [aux]))
    values = [m.measure().model_velocity for m in mons]
    assert V > 1e-3 and values == pytest.approx([V, V], rel=RTOL)


class _Keywords(nn.Module):
    """For the float64 reference, which calls model(batch): passes a dict batch as keywords."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, batch):
        return self.m(**batch)


class Tagger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(40, 16)
        self.lstm = nn.LSTM(16, 12, batch_first=True, bidirectional=True)
        self.head = nn.Linear(24, 6)

    def forward(self, ids):
        return self.head(self.lstm(self.emb(ids))[0])


@pytest.mark.filterwarnings("ignore:NeVe measures only")  # layers=[nn.Linear] on purpose, for the reference
def test_embedding_lstm_model_on_token_aux():
    torch.manual_seed(0)
    model = Tagger()
    aux = token_aux(40, 10, n=16, seed=0)
    monitor = VelocityMonitor(model, aux, batch_size=8)  # the default layer set
    assert monitor.measure() is None
    still = monitor.measure()
    assert still.model_velocity == 0.0 and all(v == 0.0 for v in still.layer_velocity.values())
    head = VelocityMonitor(model, aux, layers=[nn.Linear])
    ref = ReferenceVelocity()
    head.measure()
    ref.update(capture_responses(model, ["head"], list(aux.split(8))))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        ids = torch.randint(40, (8, 10), generator=gen)
        loss = nn.functional.cross_entropy(model(ids).reshape(-1, 6), torch.randint(6, (80,), generator=gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
    moved = monitor.measure()
    assert math.isfinite(moved.model_velocity) and moved.model_velocity > 0
    V, _, _ = ref.update(capture_responses(model, ["head"], list(aux.split(8))))
    assert head.measure().model_velocity == pytest.approx(V, rel=RTOL)


@pytest.mark.filterwarnings("ignore:NeVe measures only")  # layers=[nn.Linear] on purpose, for the reference
def test_tiny_bert_measured_on_a_dict_aux():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    model = transformers.BertModel(config)  # random weights, nothing downloaded
    aux = token_aux(50, 12, n=8, attention_mask="random_padding", special_ids=[0], seed=0)
    monitor = VelocityMonitor(model, aux, batch_size=4)
    assert monitor.measure() is None
    assert monitor.measure().model_velocity == 0.0  # unchanged model: zero velocity
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    linear = VelocityMonitor(model, aux, layers=[nn.Linear], batch_size=4)
    ref = ReferenceVelocity()
    linear.measure()
    batches = as_batches(aux, 4)
    ref.update({k[2:]: v for k, v in capture_responses(_Keywords(model), [f"m.{n}" for n in names], batches).items()})
    with torch.no_grad():
        gen = torch.Generator().manual_seed(5)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    moved = monitor.measure()
    assert math.isfinite(moved.model_velocity) and moved.model_velocity > 0
    V, _, per_neuron = ref.update(
        {k[2:]: v for k, v in capture_responses(_Keywords(model), [f"m.{n}" for n in names], batches).items()}
    )
    got = linear.measure()
    assert got.model_velocity == pytest.approx(V, rel=RTOL)
    for name in names:
        assert got.layer_velocity[name] == pytest.approx(float(per_neuron[name].abs().mean()), rel=RTOL, abs=1e-7)


def test_token_subset_aux_from_rows_pads_drops_labels_and_is_fixed():
    rows = [{"input_ids": list(range(1, 2 + i % 5)), "label": i % 2, "idx": i} for i in range(30)]
    before = torch.get_rng_state()
    a = token_subset_aux(rows, n=6, seed=2, pad_id=99)
    b = token_subset_aux(rows, n=6, seed=2, pad_id=99)
    assert torch.equal(torch.get_rng_state(), before)
    assert list(a) == ["input_ids", "attention_mask"] and all(torch.equal(a[k], b[k]) for k in a)
    ids, mask = a["input_ids"], a["attention_mask"]
    assert ids.dtype == mask.dtype == torch.long and ids.shape == mask.shape and ids.shape[0] == 6
    lengths = mask.sum(1)
    assert ids.shape[1] == int(lengths.max())
    for row, length in zip(ids.tolist(), lengths.tolist(), strict=True):
        assert row[:length] == list(range(1, 1 + length)) and set(row[length:]) <= {99}
    assert token_subset_aux(rows, n=500)["input_ids"].shape[0] == 30
    assert not torch.equal(token_subset_aux(rows, n=6, seed=3)["input_ids"], token_subset_aux(rows, n=6)["input_ids"])


def test_token_subset_aux_from_columns_keeps_given_masks():
    columns = {
        "input_ids": torch.arange(40).view(10, 4),
        "attention_mask": torch.tensor([[1, 1, 0, 0]] * 10),
        "token_type_ids": torch.zeros(10, 4, dtype=torch.int32),
        "labels": torch.arange(10),
    }
    out = token_subset_aux(columns, n=3, seed=0, columns=("input_ids", "attention_mask", "token_type_ids"))
    assert list(out) == ["input_ids", "attention_mask", "token_type_ids"]
    assert out["token_type_ids"].dtype == torch.long
    assert torch.equal(out["attention_mask"], torch.tensor([[1, 1, 0, 0]] * 3))
    starts = (out["input_ids"][:, 0] // 4).tolist()
    assert starts == sorted(starts) and len(set(starts)) == 3  # distinct rows, in dataset order
    assert torch.equal(out["input_ids"], torch.stack([torch.arange(4 * s, 4 * s + 4) for s in starts]))
    ragged = {"input_ids": [[5, 6, 7], [8]]}
    assert token_subset_aux(ragged)["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_token_subset_aux_refuses_bad_input():
    rows = [{"input_ids": [1, 2]}]
    with pytest.raises(ValueError, match=r"n must be an integer >= 1, but got n=0\."):
        token_subset_aux(rows, n=0)
    with pytest.raises(ValueError, match=r"must not include labels \(\['labels'\]\)"):
        token_subset_aux(rows, columns=("input_ids", "labels"))
    with pytest.raises(KeyError, match=r"column\(s\) \['token_type_ids'\] not in the data"):
        token_subset_aux(rows, columns=("input_ids", "token_type_ids"))
    with pytest.raises(ValueError, match="empty dataset"):
        token_subset_aux([])
    with pytest.raises(ValueError, match="columns differ in length"):
        token_subset_aux({"input_ids": [[1], [2]], "attention_mask": [[1]]})
    with pytest.raises(TypeError, match="not a dict of columns"):
        token_subset_aux([[1, 2, 3]])
    with pytest.raises(TypeError, match="mapping of columns"):
        token_subset_aux(5)
    with pytest.raises(ValueError, match="only 1-D"):
        token_subset_aux([{"input_ids": [[1, 2]]}, {"input_ids": [[1]]}])
