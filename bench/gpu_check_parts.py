"""The Python parts of bench/gpu_check.sh: device facts, NVML sampling, checks of the CLI runs and
of the samples, and the summary of everything measured.

    python bench/gpu_check_parts.py device --device cuda --out OUT/device.json
    python bench/gpu_check_parts.py sample --out OUT/sysmon/nvml.jsonl [--interval 1]
    python bench/gpu_check_parts.py check-bench OUT/train_bench/baseline.json
    python bench/gpu_check_parts.py check-run NAME --log OUT/logs/cli_x.log --out OUT/cli/x.json
    python bench/gpu_check_parts.py check-sysmon OUT --device cuda
    python bench/gpu_check_parts.py summarize OUT

Every check exits 1, saying why in one line, when what it checks is missing or wrong.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
from gpu_info import describe_device

from nlmm.metric_names import LOSS_KEYS

RECALL_TITLE = "Recall@K"
RECALL_KEYS = ("mean_r1", "test/mean_r1")


def fail(message: str) -> None:
    print(f"FAILED: {message}", file=sys.stderr)
    raise SystemExit(1)


def write_json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str))


# --------------------------------------------------------------------------- device

def cmd_device(args: argparse.Namespace) -> None:
    if args.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda but torch sees no CUDA GPU")
    info = describe_device(torch.device(args.device))
    info["cuda_available"] = torch.cuda.is_available()
    write_json(Path(args.out), info)
    peak = info.get("peak_bf16_tflops")
    print(f"device: {info['name']} ({info['type']}), bf16 peak "
          f"{'unknown' if peak is None else f'{peak:g} TFLOPS'}, torch {info['torch']}")


# --------------------------------------------------------------------------- NVML samples

def cmd_sample(args: argparse.Namespace) -> None:
    """nlmm.train.sysmon rows (what the dash's GPU panel shows) as JSON lines until SIGTERM."""
    import psutil

    from nlmm.train.sysmon import sample_system

    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    psutil.cpu_percent(interval=None)  # the first reading only starts the CPU interval
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as sink:
        while not stop:
            for row in sample_system():
                sink.write(json.dumps(row) + "\n")
            sink.flush()
            deadline = time.monotonic() + args.interval
            while not stop and time.monotonic() < deadline:
                time.sleep(0.05)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def cmd_check_sysmon(args: argparse.Namespace) -> None:
    folder = Path(args.outdir) / "sysmon"
    rows = read_jsonl(folder / "nvml.jsonl")
    hosts = [r for r in rows if r["device_index"] is None]
    gpus = [r for r in rows if r["device_index"] is not None]
    summary: dict[str, Any] = {"samples": len(hosts), "gpu_rows": len(gpus)}
    if gpus:
        summary.update(max_gpu_util=max((r["gpu_util"] or 0) for r in gpus),
                       max_gpu_mem_used=max((r["gpu_mem_used"] or 0) for r in gpus),
                       max_power_w=max((r["power_w"] or 0) for r in gpus))
    smi = folder / "nvidia-smi.csv"
    summary["nvidia_smi_lines"] = (len(smi.read_text().splitlines()) - 1) if smi.is_file() else 0
    write_json(folder / "check.json", summary)
    print(f"sysmon: {summary}")
    if not hosts:
        fail("no nlmm.train.sysmon samples were written")
    if args.device == "cuda":
        if not gpus:
            fail("NVML gave no GPU rows on a CUDA run")
        if summary["nvidia_smi_lines"] < 1:
            fail("nvidia-smi wrote no samples")


# --------------------------------------------------------------------------- train_bench

def cmd_check_bench(args: argparse.Namespace) -> None:
    """Figures that are all there and finite; a compiled measurement that really compiled."""
    data = json.loads(Path(args.path).read_text())
    r = data["results"]["baseline"]
    problems = [f"{key} is {r.get(key)!r}" for key in ("epoch_s", "triples_per_s", "store_share")
                if not (isinstance(r.get(key), (int, float)) and math.isfinite(r[key])
                        and r[key] >= 0)]
    if r["compile"] and r["compile_fallback"]:
        problems.append(f"train.compile fell back to eager ({r['compile_fallback']})")
    if data["plan"].get("sync_steps") and r.get("syncs_per_step") is None:
        problems.append("the host syncs were not counted")
    if data["device"].get("peak_bf16_tflops") is not None and r.get("mfu") is None:
        problems.append("no MFU although the device's peak is known")
    mfu = r.get("mfu")
    print(f"{data['label']}: {r['epoch_s']:.2f} s/epoch, {r['triples_per_s']:.1f} triples/s, MFU "
          f"{'-' if mfu is None else f'{100 * mfu:.1f} %'}, syncs/step {r.get('syncs_per_step')}")
    if problems:
        fail(f"{data['label']}: " + "; ".join(problems))


# --------------------------------------------------------------------------- CLI runs

def cmd_check_run(args: argparse.Namespace) -> None:
    """A finished run whose every logged loss is finite, with dev and test Recall@K in the
    store and the Recall@K table in the CLI's output; its system samples exported."""
    from nlmm import store

    run = store.find_run(args.name)
    if run is None:
        fail(f"no run named {args.name} in the store")
    losses = {key: [v for _, v in store.metric_series(run.id, key, max_points=100000)]
              for key in LOSS_KEYS}
    recalls = store.latest_metrics(run.id, keys=[*RECALL_KEYS, "triples_per_s"])
    samples = [s.model_dump() for s in store.system_samples(run.id, limit=100000)]
    log_text = Path(args.log).read_text(errors="replace") if Path(args.log).is_file() else ""
    elapsed = (run.ended_at - run.started_at) if run.ended_at and run.started_at else None
    report = {"name": run.name, "status": run.status, "device": run.device, "step": run.step,
              "elapsed_s": elapsed, "final": {k: v[-1] if v else None for k, v in losses.items()},
              "logged_points": {k: len(v) for k, v in losses.items()},
              "recall": recalls, "system_samples": len(samples),
              "recall_table_printed": RECALL_TITLE in log_text, "error": run.error}
    out = Path(args.out)
    write_json(out, report)
    write_json(out.with_name(f"{out.stem}_system_samples.json"), samples)
    print(f"run {run.name}: {run.status}, step {run.step}, final loss {report['final']['loss']}, "
          f"dev mean R@1 {recalls.get('mean_r1')}, test mean R@1 {recalls.get('test/mean_r1')}")
    if run.status != "finished":
        fail(f"run {run.name} ended {run.status}: {run.error}")
    if not losses["loss"]:
        fail(f"run {run.name} logged no loss")
    bad = [k for k, values in losses.items() if any(not math.isfinite(v) for v in values)]
    if bad:
        fail(f"run {run.name} logged non-finite {', '.join(bad)}")
    missing = [k for k in RECALL_KEYS if not math.isfinite(recalls.get(k, math.nan))]
    if missing:
        fail(f"run {run.name} has no {', '.join(missing)} in the store")
    if not report["recall_table_printed"]:
        fail(f"`nlmm train` printed no {RECALL_TITLE} table (log: {args.log})")


# --------------------------------------------------------------------------- summary

def _fmt(value: Any, spec: str = ".2f", scale: float = 1.0, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value * scale:{spec}}{suffix}"


def bench_rows(outdir: Path) -> list[str]:
    rows = ["| measurement | s/epoch | triples/s | MFU | peak memory (GiB) | store share | "
            "host syncs/step | warm-up s |", "|---|---|---|---|---|---|---|---|"]
    for path in sorted((outdir / "train_bench").glob("*.json")):
        data = json.loads(path.read_text())
        r = data["results"]["baseline"]
        mem = r["peak_memory"]
        rows.append(f"| {data['label']} (batch {r['batch_size']}) | {_fmt(r['epoch_s'])} | "
                    f"{_fmt(r['triples_per_s'], '.1f')} | {_fmt(r.get('mfu'), '.1f', 100, ' %')} "
                    f"| {_fmt(mem['bytes'], '.2f', 2 ** -30)}"
                    f"{' (RSS)' if mem['kind'] == 'cpu_peak_rss' else ''} | "
                    f"{_fmt(r['store_share'], '.3f', 100, ' %')} | "
                    f"{_fmt(r.get('syncs_per_step'), '.1f')} | {_fmt(r.get('warmup_s'), '.1f')} |")
    return rows


def cli_rows(outdir: Path) -> list[str]:
    rows = ["| run | status | steps | final loss | dev mean R@1 | test mean R@1 | wall s |",
            "|---|---|---|---|---|---|---|"]
    for path in sorted((outdir / "cli").glob("*.json")):
        if path.stem.endswith("_system_samples"):
            continue
        r = json.loads(path.read_text())
        rows.append(f"| {r['name']} | {r['status']} | {r['step']} | {_fmt(r['final']['loss'], '.3f')} "
                    f"| {_fmt(r['recall'].get('mean_r1'), '.1f')} | "
                    f"{_fmt(r['recall'].get('test/mean_r1'), '.1f')} | {_fmt(r['elapsed_s'], '.1f')} |")
    return rows


def search_rows(outdir: Path) -> list[str]:
    path = outdir / "search" / "search.json"
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    rows = [f"{data['items']:,} x {data['dim']} gallery on {data['device_name']}:", "",
            "| figure | p50 ms | p99 / max ms |", "|---|---|---|"]
    for label, f in data["figures"].items():
        if "p50_ms" in f:
            rows.append(f"| {label} | {f['p50_ms']:.2f} | {f.get('p99_ms', f.get('max_ms')):.2f} |")
    return rows


def cmd_summarize(args: argparse.Namespace) -> None:
    outdir = Path(args.outdir)
    status = [line.split("\t") for line in (outdir / "status.tsv").read_text().splitlines()[1:]
              if line.strip()]
    device = json.loads((outdir / "device.json").read_text()) \
        if (outdir / "device.json").is_file() else {}
    failed = [s[0] for s in status if s[1] != "ok"]
    lines = [f"# gpu_check: {device.get('name', '?')} ({device.get('type', '?')})", "",
             f"torch {device.get('torch')}, CUDA {device.get('cuda', '-')}, bf16 peak "
             f"{device.get('peak_bf16_tflops') or 'unknown'} TFLOPS; "
             f"{'all parts passed' if not failed else 'FAILED: ' + ', '.join(failed)}", "",
             "| part | status | seconds |", "|---|---|---|"]
    lines += [f"| {s[0]} | {s[1]} | {s[2]} |" for s in status]
    lines += ["", "## Training throughput (bench/train_bench.py, timed steps)", ""]
    lines += bench_rows(outdir)
    lines += ["", "## 200-step runs through `nlmm train`", ""] + cli_rows(outdir)
    search = search_rows(outdir)
    if search:
        lines += ["", "## Search latency (bench/search_bench.py)", ""] + search
    check = outdir / "sysmon" / "check.json"
    if check.is_file():
        lines += ["", "## System samples", "", f"`{check.read_text().strip()}`"]
    text = "\n".join(lines) + "\n"
    (outdir / "summary.md").write_text(text)
    write_json(outdir / "summary.json", {"device": device, "failed": failed,
                                         "parts": [{"part": s[0], "status": s[1],
                                                    "seconds": float(s[2])} for s in status]})
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("device")
    p.add_argument("--device", choices=("cpu", "cuda"), required=True)
    p.add_argument("--out", required=True)
    p = sub.add_parser("sample")
    p.add_argument("--out", required=True)
    p.add_argument("--interval", type=float, default=1.0)
    p = sub.add_parser("check-bench")
    p.add_argument("path")
    p = sub.add_parser("check-run")
    p.add_argument("name")
    p.add_argument("--log", required=True)
    p.add_argument("--out", required=True)
    p = sub.add_parser("check-sysmon")
    p.add_argument("outdir")
    p.add_argument("--device", choices=("cpu", "cuda"), required=True)
    p = sub.add_parser("summarize")
    p.add_argument("outdir")
    args = parser.parse_args()
    {"device": cmd_device, "sample": cmd_sample, "check-bench": cmd_check_bench,
     "check-run": cmd_check_run,
     "check-sysmon": cmd_check_sysmon, "summarize": cmd_summarize}[args.command](args)


if __name__ == "__main__":
    main()
