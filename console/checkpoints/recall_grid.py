"""Recall@K figures of a checkpoint as a small table: six directions by K = 1, 5, 10."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.table import Table

from console.formatting import recall
from nlmm.metric_names import DIRECTIONS, KS
from nlmm.reports import ARROWS


def recall_grid(metrics: Mapping[str, Any], title: str) -> Table:
    """Directions the metrics hold, with `-` for any K they lack, and mean R@1 last."""
    table = Table(title=title, title_justify="left", box=None, padding=(0, 1))
    table.add_column("direction")
    for k in KS:
        table.add_column(f"R@{k}", justify="right")
    for d in DIRECTIONS:
        if any(f"{d}_r{k}" in metrics for k in KS):
            table.add_row(ARROWS[d], *(recall(metrics.get(f"{d}_r{k}")) for k in KS))
    if "mean_r1" in metrics:
        table.add_row("mean", recall(metrics["mean_r1"]), "", "", style="bold")
    return table
