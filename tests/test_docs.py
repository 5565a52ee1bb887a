"""README.md and the docs pages: every runnable example is run by a test, the README's snippets use the names
the package exports, and the cheap ones run as written (the site itself is built by `make test`:
`mkdocs build --strict`)."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tests.readme import README, all_examples, readme_example

TESTS = Path(__file__).resolve().parent
#: README snippets: what NeVe adds to a loop the reader already has (``model``, ``train_one_epoch``, ...).
SNIPPETS = sorted(name for name, (page, _) in all_examples().items() if page == README)


def test_every_docs_example_is_run_by_a_test() -> None:
    sources = "\n".join(p.read_text() for p in TESTS.glob("test_*.py"))
    examples = {name: page for name, (page, _) in all_examples().items() if page != README}
    assert len(examples) >= 7, "the docs pages lost their runnable examples"
    untested = sorted(f"{name} ({page.name})" for name, page in examples.items() if f'"{name}"' not in sources)
    assert not untested, f"docs examples that no test runs: {untested}"


def test_the_readme_has_one_snippet_per_loop_and_stays_short() -> None:
    loops = ("pytorch", "ray", "optuna", "mlflow", "lightning", "hf-trainer")
    assert sorted(f"readme-{loop}" for loop in loops) == SNIPPETS
    assert len(README.read_text().splitlines()) <= 250


@pytest.mark.parametrize("name", SNIPPETS)
def test_readme_snippets_compile_and_import_what_the_package_exports(name: str) -> None:
    code = readme_example(name)
    tree = ast.parse(code, filename=f"README.md:{name}")
    imports = [node for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)]
    assert any(isinstance(node, ast.ImportFrom) and (node.module or "").startswith("neve_tune") for node in imports)
    exec(compile(ast.Module(body=imports, type_ignores=[]), f"README.md:{name}", "exec"), {})
    for node in imports:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("neve_tune"):
            module = __import__(node.module, fromlist=["_"])
            exported = getattr(module, "__all__", ())
            hidden = [a.name for a in node.names if a.name not in exported]
            assert not hidden, f"README snippet {name} imports {hidden} that {node.module}.__all__ does not export"


def _digits_loop() -> dict[str, Any]:
    """What the README's snippets assume: a digits CNN, its optimizer and a ``train_one_epoch`` (mean loss)."""
    from neve_tune.studies.builtin.digits import DigitsCNN, load_digits_splits

    torch.manual_seed(0)
    data = load_digits_splits()
    model = DigitsCNN(width=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def train_one_epoch(model: nn.Module, optimizer: torch.optim.Optimizer) -> float:
        model.train()
        total = 0.0
        for xb, yb in zip(data.x_train.split(64), data.y_train.split(64), strict=True):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(xb), yb)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(yb) / len(data.y_train)
        return total

    return {"model": model, "optimizer": optimizer, "train_one_epoch": train_one_epoch}


def test_readme_pytorch_snippet_runs_and_stops_converged(capsys: pytest.CaptureFixture[str]) -> None:
    namespace = _digits_loop()
    exec(compile(readme_example("readme-pytorch"), "README.md:readme-pytorch", "exec"), namespace)
    neve, epoch = namespace["neve"], namespace["epoch"]
    assert neve.should_stop and str(neve.stop_reason) == "converged" and 5 < epoch < 60
    assert len(capsys.readouterr().out.splitlines()) == epoch + 1  # one message per epoch


def test_readme_mlflow_snippet_logs_one_finished_child_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)  # the snippet's store is ./mlflow.db
    namespace = _digits_loop()
    exec(compile(readme_example("readme-mlflow"), "README.md:readme-mlflow", "exec"), namespace)
    client = MlflowClient("sqlite:///mlflow.db")
    parent = namespace["parent"]
    (run,) = client.search_runs([namespace["experiment_id"]], f"tags.`mlflow.parentRunId` = '{parent}'")
    epoch = namespace["epoch"]
    assert run.info.status == "FINISHED" and run.data.tags["neve/stop_reason"] == "converged"
    assert run.data.params == {"lr": "0.1"} and run.data.tags["neve/stop_epoch"] == str(epoch)
    history = client.get_metric_history(run.info.run_id, "neve/model_velocity")
    assert sorted(m.step for m in history) == list(range(1, epoch + 1))  # one value per epoch, step = epoch
