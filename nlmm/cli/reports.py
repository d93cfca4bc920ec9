"""Rich renderables for the CLI: runs, run details, comparisons, eval results, model info."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable

from rich.console import Group
from rich.table import Table
from rich.text import Text

from nlmm.metric_names import DIRECTIONS, KS, LOSS_KEYS
from nlmm.store.progress import elapsed_seconds
from nlmm.store.sqlite_reader import read_runs
from nlmm.units import file_size, hms, recall_cell, size_on_disk

if TYPE_CHECKING:  # `runs ls` needs neither config machinery (yaml) nor SQLAlchemy, and `nlmm
    # search` through a server no store: each function imports what it uses
    from nlmm import store
    from nlmm.config import Config
    from nlmm.eval.forgetting import Forgetting
    from nlmm.search.types import SearchResults

STATUS_STYLE = {"running": "green", "queued": "cyan", "finished": "bold green",
                "stopped": "yellow", "failed": "bold red", "lost": "magenta"}
ARROWS = {"i2t": "image→text", "t2i": "text→image", "i2a": "image→audio",
          "a2i": "audio→image", "t2a": "text→audio", "a2t": "audio→text"}


def _elapsed(run: store.Run, now: float | None = None) -> str:
    """Wall time of a run over all its workers (store times are seconds since the epoch)."""
    return hms(elapsed_seconds(run, time.time() if now is None else now))


def error_sentence(error: str | None) -> str | None:
    """The one sentence a failed run is reported by, in the terminal, `runs show` and the dash.

    The worker stores the reason, a blank line, then the traceback (which stays in train.log
    for whoever debugs); an error stored as a bare traceback gives its last line, the
    exception's own message."""
    if not error or not error.strip():
        return None
    text = error.strip()
    if text.startswith("Traceback (most recent call last):"):
        return text.splitlines()[-1].strip()
    return " ".join(line.strip() for line in text.split("\n\n")[0].splitlines())


def status_text(status: str) -> Text:
    return Text(status, style=STATUS_STYLE.get(status, ""))


def epoch_text(run: store.Run) -> str:
    """`3/30`: the epoch the run is in, counted from 1 as train.log counts (a run before its
    first step is in its first), of the epochs it plans."""
    return f"{max(run.epoch or 0, 1)}/{run.epochs_total or '?'}"


def started_text(run: store.Run, stamp: Callable[[float], str]) -> str:
    """The run's first start, and its latest resume when a worker before this one ran.

    The first start is created_at: the row is made just before the first worker (the corpus is
    prepared before), and a resume moves started_at (the current worker's start), never it."""
    text = stamp(run.created_at)
    if run.elapsed_before and run.started_at is not None:
        text += f", resumed {stamp(run.started_at)}"
    return text


def runs_table(status: str | None = None) -> Table | Text:
    runs = read_runs(status)
    if runs is None:  # only the store can answer (see nlmm.store.sqlite_reader)
        from nlmm import store

        store.mark_lost()
        runs = store.list_runs(status=status)
    if not runs:
        return Text("no runs yet: start one with `nlmm train flickr8k` (or `--synthetic` offline)")
    table = Table(title="runs")
    for col in ("id", "name", "status", "progress", "epoch", "best R@1", "device", "elapsed"):
        table.add_column(col, justify="right" if col in ("id", "epoch", "best R@1") else "left",
                         no_wrap=col == "name")
    for run in runs:
        progress = f"{run.step or 0}/{run.steps_total}" if run.steps_total else str(run.step or 0)
        best = f"{run.best_metric:.1f}" if run.best_metric is not None else "-"
        table.add_row(str(run.id), run.name, status_text(run.status), progress,
                      epoch_text(run), best, device_text(run),
                      _elapsed(run))
    return table


def device_text(run: store.Run) -> str:
    """The run's device, with the number of worker processes when there are several."""
    device = run.device or "-"
    return f"{device} ×{run.processes}" if (run.processes or 1) > 1 else device


def _cell(value: float | None) -> str:
    return recall_cell(value, missing="n/a")


def recall_table(metrics: Mapping[str, float], title: str = "Recall@K (%)",
                 second: Mapping[str, float] | None = None, second_label: str = "TTT",
                 compact: bool = False) -> Table:
    """Rows = the six directions, columns = R@1/5/10 (and the same with TTT when given).
    `compact` (the dash's panels): no box, left title, `-` for a missing figure, and a row for
    every direction with any figure."""
    if compact:
        table = Table(title=title, title_justify="left", box=None, padding=(0, 1))
        cell = recall_cell
    else:
        table = Table(title=title)
        cell = _cell
    table.add_column("direction")
    labels = ["R@1", "R@5", "R@10"]
    for label in labels:
        table.add_column(label, justify="right")
    if second is not None:
        for label in labels:
            table.add_column(f"{label} {second_label}", justify="right")
    for d in DIRECTIONS:
        if not any(f"{d}_r{k}" in metrics for k in (KS if compact else KS[:1])):
            continue
        row = [ARROWS[d]] + [cell(metrics.get(f"{d}_r{k}")) for k in KS]
        if second is not None:
            row += [cell(second.get(f"{d}_r{k}")) for k in KS]
        table.add_row(*row)
    if "mean_r1" in metrics:
        row = ["mean" if compact else "mean R@1", cell(metrics["mean_r1"]), "", ""]
        if second is not None:
            row += [cell(second.get("mean_r1")), "", ""]
        table.add_row(*row, style="bold")
    return table


def _eval_metrics(run_id: int, prefix: str = "") -> dict[str, float]:
    from nlmm import store

    keys = [f"{prefix}{d}_r{k}" for d in DIRECTIONS for k in KS] + [f"{prefix}mean_r1"]
    latest = store.latest_metrics(run_id, keys=keys)
    return {k[len(prefix):]: v for k, v in latest.items()}


def summary_table(run: store.Run) -> Group:
    """End-of-run summary: status and the best dev figures (plus test ones when present)."""
    from nlmm import store

    parts: list[Any] = [Text.assemble(("run ", ""), (run.name, "bold"), (": ", ""),
                                      status_text(run.status))]
    best = store.best_checkpoint(run.id)
    metrics = (best.metrics if best and best.metrics else None) or _eval_metrics(run.id)
    if metrics:
        parts.append(recall_table(metrics, title="best dev Recall@K (%)"))
    parts += _test_parts(run.id)
    return Group(*parts)


TEST_TITLE = "test Recall@K (%), best dev checkpoint (best.pt)"


def _test_parts(run_id: int) -> list[Any]:
    """The test table of the dev-selected best model and the last model's test mean R@1."""
    from nlmm import store

    test = _eval_metrics(run_id, prefix="test/")
    if not test:
        return []
    parts: list[Any] = [recall_table(test, title=TEST_TITLE)]
    last = store.latest_metrics(run_id, keys=["test_last/mean_r1"]).get("test_last/mean_r1")
    if last is not None:
        parts.append(Text(f"last model (last.pt): test mean R@1 {last:.1f}"))
    return parts


def _levels(run: store.Run) -> str:
    """The levels as the run trains them: its optimizer and lr options applied to cms_levels."""
    from nlmm.config import config_from_dict, with_legacy_defaults
    from nlmm.optim.levels import level_settings

    cfg = config_from_dict(with_legacy_defaults(json.loads(run.config)), f"run {run.name}")
    return ", ".join(f"{lv.name}/{lv.chunk_size} {lv.optimizer} lr {lv.lr:g}"
                     for lv in level_settings(cfg))


@dataclass(frozen=True)
class LevelMotion:
    """What the training loop logged last about one CMS level (Eq. 31 made visible: a slow
    level whose update stays near 0 adds nothing)."""

    name: str
    chunk_size: int
    update_ratio: float | None  # ‖Δθ‖/‖θ‖ of the level's last applied update
    gain: float | None  # mean |LayerScale gain| of its blocks
    still: bool  # the loop warned that it barely moves

    @property
    def per_step(self) -> float | None:
        """The update spread over the C steps its chunk covers: comparable across levels."""
        return None if self.update_ratio is None else self.update_ratio / self.chunk_size


def level_names(run: store.Run) -> list[tuple[str, int]]:
    """(name, chunk_size) of the run's CMS levels, fastest first as configured."""
    return [(lv.get("name"), lv.get("chunk_size", 1))
            for lv in json.loads(run.config).get("cms_levels", [])]


def still_key(level: str) -> str:
    """The flag the loop logs, once, for a level that barely moves."""
    return f"level/{level}/still"


def level_motion(run: store.Run) -> list[LevelMotion]:
    """The levels that logged an update ratio or a gain, with their latest figures."""
    from nlmm import store

    levels = level_names(run)
    keys = [f"level/{n}/{k}" for n, _ in levels for k in ("update_ratio", "gain")]
    latest = store.latest_metrics(run.id, keys=keys + [still_key(n) for n, _ in levels])
    motion = [LevelMotion(name, chunk, latest.get(f"level/{name}/update_ratio"),
                          latest.get(f"level/{name}/gain"), bool(latest.get(still_key(name))))
              for name, chunk in levels]
    return [m for m in motion if m.update_ratio is not None or m.gain is not None]


def _level_motion(run: store.Run) -> list[tuple[str, str]]:
    """A line per CMS level for `runs show`: its latest relative update and mean |gain|."""
    rows = []
    for m in level_motion(run):
        text = (f"update/weights {'n/a' if m.update_ratio is None else f'{m.update_ratio:.2e}'}"
                f", mean |gain| {'n/a' if m.gain is None else f'{m.gain:.4f}'}")
        if m.still:
            text += " (barely moves)"
        rows.append((f"  {m.name}", text))
    return rows


def run_details(ref: str) -> Group:
    from nlmm import store

    store.mark_lost()
    run = store.get_run(ref)
    cfg = json.loads(run.config)
    towers = cfg.get("modalities") or ["image", "text", "audio"]  # runs before bi-modal training
    info = Table.grid(padding=(0, 2))
    info.add_column(style="bold")
    info.add_column()
    now = time.time()
    latest = store.latest_metrics(run.id, keys=[*LOSS_KEYS, "triples_per_s"])
    eta = store.eta_seconds(run, now, latest.get("triples_per_s"))
    processes = run.processes or 1
    status = status_text(run.status)
    if run.phase and run.status in store.ACTIVE_STATUSES:
        status = Text.assemble(status, f" ({run.phase})")
    rows = [("name", run.name), ("status", status),
            ("device", (run.device or "-") + (f", {processes} processes" if processes > 1 else "")),
            ("progress", f"step {run.step or 0}/{run.steps_total or '?'}, epoch "
                         f"{epoch_text(run)}"),
            ("started", started_text(run, lambda t: time.strftime("%Y-%m-%d %H:%M",
                                                                    time.localtime(t)))),
            ("elapsed", _elapsed(run, now) + (f", ETA {store.hms(eta)}" if eta is not None else "")),
            ("data", run.data or "-"), ("log", run.log_path or "-")]
    if run.parent:
        rows.append(("continues", f"{run.parent} on another corpus (`nlmm runs forgetting "
                                  f"{run.name}` scores both)"))
    rows += [("model", f"towers {', '.join(towers)}; d_model {cfg.get('d_model')}, heads "
                      f"{cfg.get('n_heads')}, depth "
                      f"{ {m: d for m, d in (cfg.get('depth') or {}).items() if m in towers} }, "
                      f"mixer {cfg.get('mixer')}"),
            ("levels", _levels(run))]
    rows += _level_motion(run)
    for key, value in rows:
        info.add_row(key, value if isinstance(value, Text) else str(value))
    parts: list[Any] = [info]
    note = store.steps_cap_note(cfg.get("train_steps"), run.steps_total, run.epochs_total)
    if note:
        parts.append(Text(f"note: {note}", style="yellow"))
    sentence = error_sentence(run.error)
    if sentence:
        parts.append(Text(sentence, style="red"))
    if latest:
        parts.append(Text("  ".join(f"{k} {v:.4g}" for k, v in latest.items())))
    metrics = _eval_metrics(run.id)
    if metrics:
        parts.append(recall_table(metrics, title="latest dev Recall@K (%)"))
    parts += _test_parts(run.id)
    ckpts = store.list_checkpoints(run.id)
    if ckpts:
        table = Table(title="checkpoints")
        for col in ("kind", "step", "epoch", "mean R@1", "best", "size", "path"):
            table.add_column(col)
        for c in ckpts:
            size = size_on_disk(c.path)  # as the file is now, not as it was saved
            table.add_row(c.kind, str(c.step), str(c.epoch),
                          f"{c.metrics.get('mean_r1', float('nan')):.1f}" if c.metrics else "-",
                          "★" if c.is_best else "",
                          "missing" if size is None else file_size(size), c.path)
        parts.append(table)
    return Group(*parts)


def _settings(run: store.Run) -> dict[str, str]:
    """What a person compares runs by: every config value, the levels as they trained (the
    run's optimizer and lr options applied) instead of the raw cms_levels list."""
    from nlmm.config import flat_keys

    flat = {k: json.dumps(v) if isinstance(v, (list, dict)) else str(v)
            for k, v in flat_keys(json.loads(run.config)).items() if k != "cms_levels"}
    flat["levels"] = _levels(run)
    return flat


def _figure_rows(table: Table, rows: list[tuple[str, list[float | None]]], best: str) -> None:
    """Rows of figures, the best of each row (max or min) in bold green."""
    for label, values in rows:
        known = [v for v in values if v is not None]
        if not known:
            continue
        top = max(known) if best == "max" else min(known)
        table.add_row(label, *[Text("-") if v is None else
                               Text(f"{v:.3g}" if best == "min" else f"{v:.1f}",
                                    style="bold green" if v == top and len(values) > 1 else "")
                               for v in values])


def compare_table(refs: Iterable[str]) -> Group:
    """Runs side by side: the settings that differ, the best dev figures, the test figures of
    each run's best.pt, and the final training losses."""
    from nlmm import store

    runs = [store.get_run(r) for r in refs]

    def table(title: str) -> Table:
        t = Table(title=title, min_width=len(title) + 4)  # a title never wraps
        t.add_column("")
        for run in runs:
            t.add_column(run.name, justify="right")
        return t

    settings = [_settings(run) for run in runs]
    differs = table("settings that differ")
    for key in sorted(set().union(*settings)):
        values = [s.get(key, "-") for s in settings]
        if len(set(values)) > 1:
            differs.add_row(key, *values)
    parts: list[Any] = [differs if differs.row_count else
                        Text("the runs have the same settings", style="dim")]
    keys = [f"{d}_r{k}" for d in DIRECTIONS for k in KS] + ["mean_r1"]
    dev = []
    for run in runs:
        best = store.best_checkpoint(run.id)
        dev.append((best.metrics if best and best.metrics else None) or _eval_metrics(run.id))
    test = [_eval_metrics(run.id, prefix="test/") for run in runs]
    for title, per_run in (("best dev Recall@K (%)", dev),
                           ("test Recall@K (%), best dev checkpoint (best.pt)", test)):
        figures = table(title)
        _figure_rows(figures, [(k, [m.get(k) for m in per_run]) for k in keys], "max")
        if figures.row_count:
            parts.append(figures)
    latest = [store.latest_metrics(run.id, keys=list(LOSS_KEYS)) for run in runs]
    losses = table("final training losses (last log window)")
    _figure_rows(losses, [(k, [m.get(k) for m in latest]) for k in LOSS_KEYS], "min")
    if losses.row_count:
        parts.append(losses)
    return Group(*parts)


def coverage_line(coverage: dict[str, int], modalities: list[str] | None = None) -> str:
    """"scored on 1000 images, 5000 captions, 5000 audio items": how many items each figure
    rests on, for the modalities the model has, so it can stand beside a paper's."""
    names = {"image": ("n_images", "images"), "text": ("n_captions", "captions"),
             "audio": ("n_wavs", "audio items")}
    shown = [f"{coverage.get(key, 0)} {label}" for m, (key, label) in names.items()
             if modalities is None or m in modalities]
    return "scored on " + ", ".join(shown)


def eval_table(results: dict[str, Any]) -> Group:
    """The figures of `nlmm eval`. Paths go on lines of their own, above the tables: a table's
    title wraps at the table's width, which would cut a path mid-word."""
    title = f"{results['split']} Recall@K (%)"
    parts: list[Any] = [Text(f"checkpoint {results['checkpoint']}"),
                        recall_table(results["metrics"], title=title,
                                     second=results.get("metrics_ttt"))]
    if "coverage" in results:
        # a split partly embedded (some spoken captions missing) is scored on fewer queries
        parts.append(Text(coverage_line(results["coverage"], results.get("modalities"))))
    for warning in results.get("warnings", []):
        parts.append(Text(f"warning: {warning}", style="yellow"))
    for source in results.get("sources", []):
        parts.append(Text(f"{source['format']} corpus {source['path']}"))
        parts.append(recall_table(source["metrics"], title=f"{results['split']} Recall@K (%), "
                                  f"{source['format']} corpus"))
        parts.append(Text(coverage_line(source["coverage"], results.get("modalities"))))
    if "ttt" in results:
        t = results.get("ttt_settings") or {}
        parts.append(Text(
            f"test-time training: on (eta={t.get('eta')}, max_steps={t.get('max_steps')}, "
            f"adapter_rank={t.get('adapter_rank')}); the TTT columns adapt every item"
            if results["ttt"] else "test-time training: off (--ttt to add it)"))
    return Group(*parts)


def model_info_table(cfg: Config, batch_size: int) -> Group:
    from nlmm.model.info import model_info
    from nlmm.optim.levels import level_settings

    info = model_info(cfg, batch_size=batch_size)
    parts = Table(title="parameters")
    parts.add_column("part")
    parts.add_column("params", justify="right")
    parts.add_column("fwd+bwd GFLOPs / triple", justify="right")
    flops = info["flops_per_triple"]
    for name, count in info["params"].items():
        if name in ("trainable", "ttt_adapters"):
            continue
        parts.add_row(name, f"{count:,}", "" if name not in flops else f"{flops[name] / 1e9:.2f}")
    parts.add_row("contrastive loss", "", f"{flops['loss'] / 1e9:.2f}")
    # the sum of the rows above; the adapters below are frozen while training
    parts.add_row("trainable (sum)", f"{info['params']['trainable']:,}",
                  f"{flops['total'] / 1e9:.2f}", style="bold", end_section=True)
    parts.add_row("TTT adapters (test time only)", f"{info['params']['ttt_adapters']:,}", "")
    levels = Table(title="parameters per CMS level (optimizer groups)")
    for col in ("level", "chunk", "optimizer", "lr", "params"):
        levels.add_column(col, justify="left" if col in ("level", "optimizer") else "right")
    for lv in level_settings(cfg):
        levels.add_row(lv.name, str(lv.chunk_size), lv.optimizer, f"{lv.lr:g}",
                       f"{info['params_per_level'].get(lv.name, 0):,}")
    memory = Table(title=f"training memory at batch {batch_size} (estimate)")
    memory.add_column("part")
    memory.add_column("size", justify="right")
    for name, nbytes in info["memory_bytes"].items():
        memory.add_row(name, file_size(nbytes), style="bold" if name == "total" else "")
    files = Table(title="checkpoint files per run (estimate)")
    files.add_column("file")
    files.add_column("size", justify="right")
    files.add_column("holds")
    files.add_row("best.pt", file_size(info["checkpoint_bytes"]["best"]),
                  "weights, config, tokenizer, metrics (eval, search, export)")
    files.add_row("last.pt", file_size(info["checkpoint_bytes"]["last"]),
                  "also the optimizer state of every level (resume)")
    tokens = ", ".join(f"{m} {n}" for m, n in info["tokens_per_triple"].items())
    seconds, text_len = info["audio_seconds"], info["text_len"]
    capped = [f"{key} caps it" for key, limit, value in
              (("data.max_audio_seconds", cfg.data.max_audio_seconds, seconds),
               ("data.text_max_len", cfg.data.text_max_len, text_len)) if value == limit]
    return Group(parts, levels, memory, files, Text(
        f"tokens per triple: {tokens} (audio {seconds:g} s, text {text_len} tokens"
        + "".join(f"; {c}" for c in capped) + ")"))


GALLERY_NOUNS = {"image": "images", "text": "captions", "audio": "spoken captions"}
# Per gallery modality: the two columns after rank and score, and the hit fields they show.
SEARCH_COLUMNS = {"image": (("image", "item"), ("its first caption", "caption")),
                  "text": (("caption", "item"), ("image", "image_id")),
                  "audio": (("spoken caption", "item"), ("what is said", "caption"))}


def search_title(results: SearchResults) -> str:
    """What was searched: the query, the gallery (modality, split, size) and the model."""
    model = results.checkpoint.name if results.run is None else \
        f"run {results.run}, {results.checkpoint.name}"
    if results.step is not None:
        model += f" (step {results.step})"
    return (f"{GALLERY_NOUNS[results.target]} for {results.query_modality} query "
            f"{results.query!r} in the {results.split} split ({results.gallery_size} "
            f"{GALLERY_NOUNS[results.target]}) — {model}")


def search_shortfall(results: SearchResults) -> str | None:
    """A note when -k asked for more results than the gallery holds, else None."""
    if results.k <= results.gallery_size:
        return None
    return (f"-k {results.k} asked for more than the {results.gallery_size} "
            f"{GALLERY_NOUNS[results.target]} of the {results.split} split; all are shown")


def search_table(results: SearchResults) -> Table | Text:
    """The hits of `nlmm search` under a title naming what was searched; a text hit shows its
    image, an image hit its first caption."""
    if not results.hits:
        return Text(f"no results: {search_title(results)}")
    table = Table(title=search_title(results), caption=search_shortfall(results))
    table.add_column("rank", justify="right")
    table.add_column("score", justify="right")
    columns = SEARCH_COLUMNS[results.target]
    for header, _ in columns:
        table.add_column(header)
    for hit in results.hits:
        table.add_row(str(hit.rank), f"{hit.score:.3f}",
                      *(getattr(hit, field) or "" for _, field in columns))
    return table


def forgetting_table(report: Forgetting) -> Table:
    """One block of rows per corpus, one row per checkpoint of the lineage, oldest first; Δ is
    the change in mean R@1 from the checkpoint above."""
    directions = [k for k in DIRECTIONS if any(f"{k}_r1" in s.metrics for s in report.scores)]
    table = Table(title=f"Recall@1 (%) on each corpus's {report.split} split, at the end of each "
                        f"run of {' → '.join(report.lineage)}")
    for col in ("corpus", "run (last.pt)", "step", "mean R@1", "Δ"):
        table.add_column(col, justify="right" if col in ("step", "mean R@1", "Δ") else "left")
    for k in directions:
        table.add_column(ARROWS[k], justify="right")
    for i, corpus in enumerate(report.corpora):
        rows = [s for s in report.scores if s.corpus == i]
        before = None
        for n, s in enumerate(rows):
            mean = s.metrics.get("mean_r1", float("nan"))
            delta = Text("") if before is None else \
                Text(f"{mean - before:+.1f}", style="red" if mean < before else "green")
            run = Text(s.run, style="bold") if s.trained_on else Text(s.run)
            if s.trained_on:
                run.append(" (trained on it)", style="dim")
            table.add_row(corpus.label if n == 0 else "", run, str(s.step), f"{mean:.1f}", delta,
                          *(f"{s.metrics[f'{k}_r1']:.1f}" if f"{k}_r1" in s.metrics else "-"
                            for k in directions),
                          end_section=n == len(rows) - 1)
            before = mean
    return table
