"""The top of the run screen: name, status, device, epoch/step, progress with ETA, and the error."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Label, ProgressBar, Static

from console import formatting as fmt
from nlmm import store
from nlmm.cli.reports import device_text, epoch_text, error_sentence, started_text, status_text


def summary_line(run: store.Run, test_r1: float | None = None) -> Text:
    """`test_r1`: test mean R@1 of the dev-selected best checkpoint, once the run has one."""
    parts = [Text(run.name, style="bold"), Text("  "), status_text(run.status)]
    if run.phase and run.phase != "training" and run.status in store.ACTIVE_STATUSES:
        parts.append(Text(f" ({run.phase} …)", style="italic"))
    parts.append(Text(f"  {device_text(run)}  epoch {epoch_text(run)}"
                      f"  step {run.step or 0}/{run.steps_total or '?'}"))
    if run.best_metric is not None:
        parts.append(Text(f"  best dev R@1 {run.best_metric:.1f}"))
    if test_r1 is not None:
        parts.append(Text(f"  test R@1 {test_r1:.1f} (best.pt)"))
    return Text.assemble(*parts)


def timing_line(run: store.Run, now: float, triples_per_s: float | None = None) -> str:
    """Elapsed, ETA and when the run started (first start, then the latest resume): the
    least needed last, where a narrow terminal cuts. `triples_per_s`: the latest training
    throughput, which the ETA is reckoned at (see store.eta_seconds)."""
    elapsed = store.elapsed_seconds(run, now)
    eta = store.eta_seconds(run, now, triples_per_s)
    text = f"elapsed {fmt.duration(elapsed)}"
    if eta is not None:
        text += f"  ETA {fmt.duration(eta)}"
    elif run.status == store.RunStatus.RUNNING:
        text += "  ETA -"
    return text + f"  started {started_text(run, fmt.local_time)}"


def error_text(run: store.Run) -> Text | None:
    """A failed run's error as one sentence, the one the CLI prints (the traceback is in
    train.log, on the Log tab)."""
    sentence = error_sentence(run.error)
    return None if sentence is None else Text(sentence, style="bold red")


def health_warnings(latest: dict[str, float]) -> list[str]:
    """One line per modality that the last finished epoch flagged as collapsed, and per CMS
    level that the loop flagged (`level/<name>/still`) as barely moving."""
    collapsed = [f"warning: the {key.removeprefix('collapsed/')} embeddings collapsed (mean "
                 f"pairwise cosine above 0.98 for a whole epoch): its retrieval is at chance"
                 for key, value in sorted(latest.items())
                 if key.startswith("collapsed/") and value >= 1.0]
    still = [f"warning: CMS level {key.split('/')[1]} barely moves: its update per step stays "
             f"far below the fastest level's, so it adds next to nothing (tab 8 Levels)"
             for key, value in latest.items()
             if key.startswith("level/") and key.endswith("/still") and value >= 1.0]
    return collapsed + still


class RunHeader(Vertical):
    def compose(self) -> ComposeResult:
        yield Static(id="run-summary")
        with Horizontal(id="run-progress-row"):
            yield ProgressBar(total=1000, show_eta=False, id="run-progress")
            yield Label(id="run-timing")
        yield Static(id="run-error")
        yield Static(id="run-health")

    def show(self, run: store.Run, now: float, health: list[str] | None = None,
             test_r1: float | None = None, triples_per_s: float | None = None) -> None:
        """`health`: warnings about the model itself (a collapsed modality), shown in bold;
        `test_r1`: see summary_line; `triples_per_s`: see timing_line."""
        self.query_one("#run-summary", Static).update(summary_line(run, test_r1))
        bar = self.query_one("#run-progress", ProgressBar)
        # A run without a planned length shows an empty bar, not the pulsing "unknown" one.
        bar.update(progress=round((fmt.progress_fraction(run) or 0.0) * 1000))
        self.query_one("#run-timing", Label).update(timing_line(run, now, triples_per_s))
        error = self.query_one("#run-error", Static)
        message = error_text(run)
        error.display = message is not None
        if message is not None:
            error.update(message)
        warnings = self.query_one("#run-health", Static)
        warnings.display = bool(health)
        if health:
            warnings.update(Text("\n".join(health), style="bold yellow"))
