"""The top-level `studies/` folder: its tables are the result files' numbers, and its commands parse."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STUDIES = ROOT / "studies"


def _rows(text: str, header: str) -> dict[str, list[str]]:
    """arm -> cells of the first Markdown table after the line starting with ``header``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows: dict[str, list[str]] = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells
    return rows


@pytest.mark.parametrize("study", ["digits", "mnist1d", "mnist1d-noisy", "listops"])
def test_the_readme_table_over_seeds_is_the_result_files(study: str) -> None:
    readme = (STUDIES / "README.md").read_text()
    section = readme[readme.index(f"### {study}\n") :]
    shown = _rows(section, "| arm | test acc (picked) mean ± std")
    full = _rows((STUDIES / "results" / f"{study}_seeds_0-2.md").read_text(), "| arm | seeds | trials |")
    assert set(shown) == set(full) and {"neve", "asha", "fifo"} <= set(shown)
    for arm, cells in shown.items():
        row = full[arm]
        # picked test acc (mean ± std, min-max), vs fifo, wall time, and each seed's pick: the same numbers
        assert (cells[1], cells[2], cells[4], cells[5], cells[6]) == (row[3], row[4], row[8], row[9], row[11])
        mean, std = (float(x) for x in cells[3].split(" ± "))  # trial-epochs, rounded in the README
        full_mean, full_std = (float(x) for x in row[6].split(" ± "))
        assert (mean, std) == (round(full_mean), round(full_std))


def test_every_command_in_the_studies_readme_parses() -> None:
    from neve_tune.cli import build_parser
    from neve_tune.studies import list_studies

    commands = re.findall(r"^neve-tune (study .+?)(?:\s+#.*)?$", (STUDIES / "README.md").read_text(), re.M)
    assert len(commands) >= 4
    for command in commands:
        args = build_parser().parse_args(shlex.split(command))
        assert args.command == "study" and args.study in list_studies()


def test_the_folder_is_not_a_python_package_and_the_analyses_moved_with_their_scripts() -> None:
    assert not (STUDIES / "__init__.py").exists()
    for name in ("ranking_signals.py", "ranking_signals.md", "consensus_signal.py", "stop_reasons_research.md"):
        assert (STUDIES / name).exists() and not (ROOT / "benchmarks" / name).exists()
    assert not (ROOT / "benchmarks" / "results").exists()
    for path in STUDIES.rglob("*"):
        if path.suffix in (".py", ".md"):
            assert "benchmarks/ranking_signals" not in path.read_text(), path
