"""Rich renderables for the CLI: runs, run details, comparisons, eval results, model info."""

from __future__ import annotations

import json
import time
from typing import Any, Iterable

from rich.console import Group
from rich.table import Table
from rich.text import Text

from nlmm import store
from nlmm.config import Config

STATUS_STYLE = {"running": "green", "queued": "cyan", "finished": "bold green",
                "stopped": "yellow", "failed": "bold red", "lost": "magenta"}
DIRECTIONS = ("i2t", "t2i", "i2a", "a2i", "t2a", "a2t")
ARROWS = {"i2t": "image→text", "t2i": "text→image", "i2a": "image→audio",
          "a2i": "audio→image", "t2a": "text→audio", "a2t": "audio→text"}


def _elapsed(run: store.Run, now: float | None = None) -> str:
    """Wall time of a run (store times are seconds since the epoch)."""
    if not run.started_at:
        return "-"
    end = run.ended_at or (now if now is not None else time.time())
    seconds = max(0, int(end - run.started_at))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def status_text(status: str) -> Text:
    return Text(status, style=STATUS_STYLE.get(status, ""))


def runs_table(status: str | None = None) -> Table | Text:
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
                      f"{run.epoch or 0}/{run.epochs_total or '?'}", best, run.device or "-",
                      _elapsed(run))
    return table


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def recall_table(metrics: dict[str, float], title: str = "Recall@K (%)",
                 second: dict[str, float] | None = None, second_label: str = "TTT") -> Table:
    """Rows = the six directions, columns = R@1/5/10 (and the same with TTT when given)."""
    table = Table(title=title)
    table.add_column("direction")
    labels = ["R@1", "R@5", "R@10"]
    for label in labels:
        table.add_column(label, justify="right")
    if second is not None:
        for label in labels:
            table.add_column(f"{label} {second_label}", justify="right")
    for d in DIRECTIONS:
        if f"{d}_r1" not in metrics:
            continue
        row = [ARROWS[d]] + [_pct(metrics.get(f"{d}_r{k}")) for k in (1, 5, 10)]
        if second is not None:
            row += [_pct(second.get(f"{d}_r{k}")) for k in (1, 5, 10)]
        table.add_row(*row)
    if "mean_r1" in metrics:
        row = ["mean R@1", _pct(metrics["mean_r1"]), "", ""]
        if second is not None:
            row += [_pct(second.get("mean_r1")), "", ""]
        table.add_row(*row, style="bold")
    return table


def _eval_metrics(run_id: int, prefix: str = "") -> dict[str, float]:
    keys = [f"{prefix}{d}_r{k}" for d in DIRECTIONS for k in (1, 5, 10)] + [f"{prefix}mean_r1"]
    latest = store.latest_metrics(run_id, keys=keys)
    return {k[len(prefix):]: v for k, v in latest.items()}


def summary_table(run: store.Run) -> Group:
    """End-of-run summary: status and the best dev figures (plus test ones when present)."""
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
    test = _eval_metrics(run_id, prefix="test/")
    if not test:
        return []
    parts: list[Any] = [recall_table(test, title=TEST_TITLE)]
    last = store.latest_metrics(run_id, keys=["test_last/mean_r1"]).get("test_last/mean_r1")
    if last is not None:
        parts.append(Text(f"last model (last.pt): test mean R@1 {last:.1f}"))
    return parts


def run_details(ref: str) -> Group:
    run = store.get_run(ref)
    cfg = json.loads(run.config)
    info = Table.grid(padding=(0, 2))
    info.add_column(style="bold")
    info.add_column()
    rows = [("name", run.name), ("status", status_text(run.status)), ("device", run.device or "-"),
            ("progress", f"step {run.step or 0}/{run.steps_total or '?'}, epoch "
                         f"{run.epoch or 0}/{run.epochs_total or '?'}"),
            ("elapsed", _elapsed(run)), ("data", run.data or "-"), ("log", run.log_path or "-"),
            ("model", f"d_model {cfg.get('d_model')}, heads {cfg.get('n_heads')}, depth "
                      f"{cfg.get('depth')}, mixer {cfg.get('mixer')}"),
            ("levels", ", ".join(f"{lv['name']}/{lv['chunk_size']} {lv['optimizer']} "
                                 f"lr {lv['lr']:g}" for lv in cfg.get("cms_levels", [])))]
    for key, value in rows:
        info.add_row(key, value if isinstance(value, Text) else str(value))
    parts: list[Any] = [info]
    if run.error:
        parts.append(Text(run.error.strip().splitlines()[0], style="red"))
    latest = store.latest_metrics(run.id, keys=["loss", "loss_i2t", "loss_i2a", "loss_t2a",
                                                "triples_per_s"])
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
            table.add_row(c.kind, str(c.step), str(c.epoch),
                          f"{c.metrics.get('mean_r1', float('nan')):.1f}" if c.metrics else "-",
                          "★" if c.is_best else "", f"{(c.bytes or 0) / 1e6:.1f} MB", c.path)
        parts.append(table)
    return Group(*parts)


def compare_table(refs: Iterable[str]) -> Table:
    runs = [store.get_run(r) for r in refs]
    table = Table(title="best dev Recall@K (%)")
    table.add_column("metric")
    for run in runs:
        table.add_column(run.name, justify="right")
    per_run = []
    for run in runs:
        best = store.best_checkpoint(run.id)
        per_run.append((best.metrics if best and best.metrics else None) or _eval_metrics(run.id))
    keys = [f"{d}_r{k}" for d in DIRECTIONS for k in (1, 5, 10)] + ["mean_r1"]
    for key in keys:
        values = [m.get(key) for m in per_run]
        if all(v is None for v in values):
            continue
        best_value = max(v for v in values if v is not None)
        cells = [Text("-") if v is None else
                 Text(f"{v:.1f}", style="bold green" if v == best_value and len(runs) > 1 else "")
                 for v in values]
        table.add_row(key, *cells)
    return table


def eval_table(results: dict[str, Any]) -> Group:
    title = f"{results['split']} Recall@K (%) — {results['checkpoint']}"
    parts: list[Any] = [recall_table(results["metrics"], title=title,
                                     second=results.get("metrics_ttt"))]
    if "coverage" in results:
        # a split partly embedded (some spoken captions missing) is scored on fewer queries
        c = results["coverage"]
        parts.append(Text(f"scored on {c['n_images']} images, {c['n_captions']} captions, "
                          f"{c['n_wavs']} spoken captions"))
    if "ttt" in results:
        t = results.get("ttt_settings") or {}
        parts.append(Text(
            f"test-time training: on (eta={t.get('eta')}, max_steps={t.get('max_steps')}, "
            f"adapter_rank={t.get('adapter_rank')}); the TTT columns adapt every item"
            if results["ttt"] else "test-time training: off (--ttt to add it)"))
    return Group(*parts)


def model_info_table(cfg: Config, batch_size: int) -> Group:
    from nlmm.model.info import model_info

    info = model_info(cfg, batch_size=batch_size)
    parts = Table(title="parameters")
    parts.add_column("part")
    parts.add_column("params", justify="right")
    parts.add_column("fwd+bwd GFLOPs / triple", justify="right")
    for name, count in info["params"].items():
        if name == "trainable":
            continue
        flops = info["flops_per_triple"].get(name)
        parts.add_row(name, f"{count:,}", "" if flops is None else f"{flops / 1e9:.2f}")
    parts.add_row("trainable", f"{info['params']['trainable']:,}",
                  f"{info['flops_per_triple']['total'] / 1e9:.2f}", style="bold")
    levels = Table(title="parameters per CMS level (optimizer groups)")
    for col in ("level", "chunk", "optimizer", "lr", "params"):
        levels.add_column(col, justify="left" if col in ("level", "optimizer") else "right")
    for lv in cfg.cms_levels:
        levels.add_row(lv.name, str(lv.chunk_size), cfg.train.optimizer or lv.optimizer,
                       f"{lv.lr:g}", f"{info['params_per_level'].get(lv.name, 0):,}")
    memory = Table(title=f"training memory at batch {batch_size} (estimate)")
    memory.add_column("part")
    memory.add_column("GiB", justify="right")
    for name, nbytes in info["memory_bytes"].items():
        memory.add_row(name, f"{nbytes / 2**30:.2f}", style="bold" if name == "total" else "")
    tokens = ", ".join(f"{m} {n}" for m, n in info["tokens_per_triple"].items())
    return Group(parts, levels, memory, Text(f"tokens per triple: {tokens} (audio "
                                             f"{info['audio_seconds']:g} s, text "
                                             f"{info['text_len']} tokens)"))


def search_table(hits: list[Any]) -> Table | Text:
    if not hits:
        return Text("no results")
    table = Table(title="results")
    table.add_column("rank", justify="right")
    table.add_column("score", justify="right")
    table.add_column("item")
    table.add_column("caption")
    for hit in hits:
        table.add_row(str(hit.rank), f"{hit.score:.3f}", hit.item, hit.caption or "")
    return table
