"""Print the markdown tables of ``results.md`` from the ``results_<task>.json`` files plain_loop.py wrote."""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def table(task: str) -> str:
    runs = json.loads((HERE / f"results_{task}.json").read_text())
    variants = [v for v in ("before", "unguarded", "after", "restore") if f"{v}_stop_epoch" in runs[0]["summary"]]
    head = (
        "| seed | best test epoch (acc) | "
        + " | ".join(
            {
                "before": "before (main): stop, reason, acc",
                "unguarded": "no warm-up guard: stop, reason, acc (restored epoch)",
                "after": "after: stop, reason, acc (restored epoch)",
                "restore": "restore only: acc",
            }[v]
            for v in variants
        )
        + " | after - best |"
    )
    lines = [head, "|" + "---|" * (3 + len(variants))]
    for r in (run["summary"] for run in runs):
        cells = [str(r["seed"]), f"{r['best_epoch']} ({r['best_acc']:.3f})"]
        for v in variants:
            acc = r[f"{v}_final_acc"]
            if v == "restore":
                cells.append(f"{acc:.3f}")
                continue
            restored = r[f"{v}_restored_epoch"]
            cells.append(
                f"{r[f'{v}_stop_epoch']}, {r[f'{v}_stop_reason']}, {acc:.3f}"
                + ("" if restored is None else f" ({restored})")
            )
        after = r.get("after_final_acc")
        cells.append("" if after is None else f"{100 * (after - r['best_acc']):+.1f} pt")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    for task in sys.argv[1:]:
        print(f"### {task}\n\n{table(task)}\n")
