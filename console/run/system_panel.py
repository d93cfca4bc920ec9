"""GPU and host figures of a run: the latest sample per device and a short history of each."""

from __future__ import annotations

from collections.abc import Sequence

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Label, Sparkline, Static

from nlmm import store
from nlmm.units import file_size

HISTORY = 120  # samples kept in each sparkline
NO_GPU = "no GPU found on the worker's machine: host figures only"


def _pct(used: int | None, total: int | None) -> float | None:
    return None if not used or not total else 100.0 * used / total


def _fmt(value: float | None, unit: str, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}{unit}"


def latest_table(samples: Sequence[store.SystemSample]) -> Table | Text:
    """One row per GPU (its newest sample) and one for the host."""
    newest_gpu: dict[int, store.SystemSample] = {}
    newest_host = None
    for sample in samples:  # oldest first, so later rows overwrite earlier ones
        if sample.device_index is None:
            newest_host = sample
        else:
            newest_gpu[sample.device_index] = sample
    if not newest_gpu and newest_host is None:
        return Text("no GPU or host samples for this run yet", style="dim")
    table = Table(box=None, padding=(0, 1), expand=False)
    for column in ("device", "util", "memory", "power", "temp"):
        table.add_column(column, justify="left" if column == "device" else "right")
    for index, s in sorted(newest_gpu.items()):
        memory = (f"{file_size(s.gpu_mem_used)} / {file_size(s.gpu_mem_total)}"
                  if s.gpu_mem_total else "-")
        table.add_row(f"GPU {index}", _fmt(s.gpu_util, "%"), memory, _fmt(s.power_w, " W"),
                      _fmt(s.temperature_c, " °C"))
    if newest_host is not None:
        h = newest_host
        ram = f"{file_size(h.ram_used)} / {file_size(h.ram_total)}" if h.ram_total else "-"
        table.add_row("host CPU/RAM", _fmt(h.cpu_percent, "%"), ram, "", "")
    return table


def histories(samples: Sequence[store.SystemSample]) -> dict[str, list[float]]:
    """Per-sparkline values, oldest first: GPU 0 utilisation and memory, host CPU and RAM."""
    gpu = [s for s in samples if s.device_index == 0]
    host = [s for s in samples if s.device_index is None]
    series = {
        "gpu-util": [s.gpu_util for s in gpu],
        "gpu-mem": [_pct(s.gpu_mem_used, s.gpu_mem_total) for s in gpu],
        "cpu": [s.cpu_percent for s in host],
        "ram": [_pct(s.ram_used, s.ram_total) for s in host],
    }
    return {name: [v for v in values if v is not None][-HISTORY:] for name, values in series.items()}


class SystemPanel(Vertical):
    """Latest figures on top, one labelled sparkline per history below.

    A run whose samples hold no GPU says so in one line instead of two flat GPU sparklines.
    """

    LABELS = {"gpu-util": "GPU 0 util", "gpu-mem": "GPU 0 mem", "cpu": "host CPU", "ram": "host RAM"}

    def compose(self) -> ComposeResult:
        yield Static(id="sys-latest")
        yield Label(NO_GPU, id="sys-no-gpu")
        for name, label in self.LABELS.items():
            classes = "spark-row gpu-row" if name.startswith("gpu") else "spark-row"
            with Horizontal(classes=classes):
                yield Label(label, classes="spark-label")
                yield Sparkline([], id=f"spark-{name}", classes="spark")
                yield Label("", id=f"spark-{name}-now", classes="spark-now")

    def show(self, samples: Sequence[store.SystemSample]) -> None:
        self.query_one("#sys-latest", Static).update(latest_table(samples))
        host_only = bool(samples) and all(s.device_index is None for s in samples)
        self.query_one("#sys-no-gpu").display = host_only
        self.query(".gpu-row").set(display=not host_only)
        for name, values in histories(samples).items():
            self.query_one(f"#spark-{name}", Sparkline).data = values
            self.query_one(f"#spark-{name}-now", Label).update(_fmt(values[-1], "%") if values else "-")
