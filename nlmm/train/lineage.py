"""Runs that continue other runs on another corpus (`nlmm train --resume RUN --data NEW`).

A continued run is a new run whose store row names its parent. Before its first checkpoint of
its own, its worker starts from the parent's last.pt (worker.continued_start): the model, the
tokenizer (the new corpus is prepared with it) and every level's optimizer state, at step 0 of a
fresh plan, schedule and dev selection. Its chain of parents is its lineage, which `nlmm runs
forgetting` scores.
"""

from __future__ import annotations

from pathlib import Path

from nlmm.config import Config, save_config


def save_run_config(cfg: Config, path: Path, parent: str | None) -> None:
    """config.yaml of a run; a continued run's names its parent in a first comment line."""
    save_config(cfg, path)
    if parent:
        path.write_text(f"# continues run {parent} on another corpus: its model, tokenizer and "
                        f"optimizer state (nlmm runs forgetting shows both corpora)\n"
                        + path.read_text())
