"""`nlmm runs compare`: the settings that differ, dev and test figures and final losses."""

from __future__ import annotations

from rich.console import Console

from nlmm import store
from nlmm.config import resolve_config
from nlmm.cli.reports import compare_table


def _run(name: str, overrides: list[str], dev_r1: float, test_r1: float, loss: float) -> None:
    cfg = resolve_config("tiny_cpu", overrides).to_dict()
    run = store.create_run(name, cfg, "data", "cpu", epochs_total=cfg["train"]["epochs"],
                           steps_total=10)
    writer = store.MetricWriter(run.id)
    writer.log(10, 1, {"loss": loss, "loss_i2t": loss / 2, "mean_r1": dev_r1, "i2t_r1": dev_r1,
                       "test/mean_r1": test_r1, "test/i2t_r1": test_r1})
    writer.close()


def _rows(text: str, label: str) -> list[str]:
    return [line for line in text.splitlines() if line.lstrip("│ ").startswith(label + " ")]


def test_compare_shows_what_differs_and_the_test_figures_and_losses(isolated_store):
    _run("adam", [], dev_r1=40.0, test_r1=38.5, loss=1.25)
    _run("muon", ["train.optimizer=muon", "train.batch_size=64"], dev_r1=45.0, test_r1=41.0,
         loss=0.75)
    console = Console(record=True, width=200)
    console.print(compare_table(["adam", "muon"]))
    text = console.export_text()
    assert "settings that differ" in text
    assert _rows(text, "train.batch_size") and "64" in _rows(text, "train.batch_size")[0]
    levels = _rows(text, "levels")[0]
    assert "adamw" in levels and "muon" in levels  # the levels as they trained
    assert not _rows(text, "d_model")  # equal settings are left out
    assert "test Recall@K (%), best dev checkpoint (best.pt)" in text
    test_tables = text.split("best dev checkpoint (best.pt)")[1]
    assert "38.5" in _rows(test_tables, "mean_r1")[0] and "41.0" in _rows(test_tables, "mean_r1")[0]
    assert "final training losses" in text
    assert "1.25" in _rows(text, "loss")[0] and "0.75" in _rows(text, "loss")[0]
