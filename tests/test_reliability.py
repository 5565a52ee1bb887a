"""Issue 23: what a new user does wrong gets an error or a warning that says what is wrong and names the fix.

One test per case of the issue, named after it.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import neve_tune as nt


def _token_model(vocab: int = 10) -> nn.Module:
    return nn.Sequential(nn.Embedding(vocab, 8), nn.Flatten(), nn.Linear(8 * 5, 3))


class _KwargsTokenModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = _token_model(10)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.body(input_ids * attention_mask)


def _float_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))


def _neve(model: nn.Module, aux: object) -> nt.NeVe:
    return nt.NeVe(model, torch.optim.SGD(model.parameters(), lr=0.1), aux)  # type: ignore[arg-type]


def test_case07_wrong_dtype_aux_names_the_fix() -> None:
    with pytest.raises(
        ValueError, match=r"floating-point inputs \(float32\).*nn\.Embedding '0'.*token_aux\(vocab_size=10"
    ):
        _neve(_token_model(), torch.randn(16, 5))
    with pytest.raises(ValueError, match=r"integer inputs \(int64\).*float32.*aux\.float\(\)"):
        _neve(_float_model(), torch.randint(0, 5, (16, 5)))
    with pytest.raises(TypeError, match=r"numpy\.ndarray of shape \(16, 5\).*torch\.as_tensor"):
        _neve(_float_model(), np.random.default_rng(0).standard_normal((16, 5)).astype("float32"))
    with pytest.raises(TypeError, match=r"numpy\.ndarray of shape \(4, 5\).*torch\.as_tensor"):
        _neve(_float_model(), [np.zeros((4, 5), dtype="float32")] * 3)
    # the right dtypes still measure
    neve = _neve(_float_model(), torch.randn(16, 5))
    assert neve.step().model_velocity is not None


def test_case08_token_vocabulary_larger_than_embedding_says_which_sizes() -> None:
    aux = nt.token_aux(vocab_size=50, seq_len=5, n=16)
    top = int(aux.max())  # type: ignore[union-attr]
    assert top >= 10
    with pytest.raises(ValueError, match=rf"token ids reach {top}.*'0' has 10 rows \(ids 0\.\.9\).*vocab_size=10"):
        _neve(_token_model(10), aux)
    with pytest.raises(ValueError, match=r"has 10 rows"):
        _neve(_KwargsTokenModel(), nt.token_aux(vocab_size=50, seq_len=5, n=16, attention_mask="full"))
    _neve(_token_model(50), aux)  # fits


def test_case09_loader_of_pairs_says_labels_were_passed() -> None:
    data = TensorDataset(torch.randn(32, 5), torch.randint(0, 3, (32,)))
    with pytest.raises(ValueError, match=r"2 items \[\(8, 5\), \(8,\)\].*labels were passed to forward.*subset_aux"):
        _neve(_float_model(), DataLoader(data, batch_size=8))
    neve = _neve(_float_model(), nt.subset_aux(data, n=32))
    assert neve.step().model_velocity is not None


def test_case10_meta_model_or_meta_aux_is_refused_clearly() -> None:
    with pytest.raises(ValueError, match=r"'meta' device \(e\.g\. '0\.weight', shape \(16, 5\)\).*to_empty"):
        _neve(_float_model().to("meta"), torch.randn(16, 5))
    with pytest.raises(ValueError, match=r"Aux batch 0 is a tensor on the 'meta' device \(shape \(16, 5\)\)"):
        _neve(_float_model(), torch.randn(16, 5, device="meta"))
    with pytest.raises(ValueError, match=r"'meta' device"):
        nt.VelocityMonitor(_float_model().to("meta"), torch.randn(16, 5))


def test_case11_one_sample_aux_warns() -> None:
    with pytest.warns(UserWarning, match=r"only 1 sample\(s\) \(fewer than 8\).*noise.*n=100"):
        _neve(_float_model(), torch.randn(1, 5))
    with pytest.warns(UserWarning, match=r"only 6 sample\(s\)"):
        _neve(_float_model(), [torch.randn(3, 5), torch.randn(3, 5)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _neve(_float_model(), torch.randn(8, 5))  # 8 samples: no warning


def test_case15_report_epoch_with_none() -> None:
    import optuna

    from neve_tune.optuna import report_epoch as optuna_report
    from neve_tune.ray import report_epoch as ray_report

    model = _float_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    neve = nt.NeVe(model, optimizer, torch.randn(16, 5))
    neve.step(1.0)
    trial = optuna.create_study().ask()
    with pytest.raises(TypeError, match=r"value is this epoch's objective value.*got None.*train_loss=epoch_loss"):
        optuna_report(trial, neve, None)  # type: ignore[arg-type]
    assert optuna_report(trial, neve, 1.0) is None  # a number still reports
    # Ray: None as train_loss means "the loop stepped NeVe"; a NeVe never stepped is refused, not reported as epoch 0
    fresh = nt.NeVe(model, optimizer, torch.randn(16, 5))
    with pytest.raises(ValueError, match=r"train_loss=None.*neve/epoch is 0.*train_loss=epoch_loss"):
        ray_report(fresh, None, model=model, optimizer=optimizer)
    with pytest.raises(
        TypeError, match=r"got float 0\.5\. To give NeVe the epoch's training loss, pass train_loss=0\.5"
    ):
        ray_report(fresh, 0.5, model=model, optimizer=optimizer)  # type: ignore[arg-type]


def test_case14_multi_objective_report_epoch_says_how_to_use_neve() -> None:
    import optuna

    from neve_tune.optuna import report_epoch

    model = _float_model()
    neve = nt.NeVe(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.randn(16, 5))
    study = optuna.create_study(directions=["minimize", "maximize"])
    trial = study.ask()
    with pytest.raises(
        NotImplementedError, match=r"multi-objective study \(this one has 2 directions.*neve\.should_stop"
    ):
        report_epoch(trial, neve, 0.5, train_loss=1.0)
    assert neve.last_epoch == 0  # refused before NeVe was stepped: the loop can still step it itself
    single = optuna.create_study().ask()
    assert report_epoch(single, neve, 0.5, train_loss=1.0) is None
