"""bench/gpu_check.sh and its pieces: the GPU peak table and MFU, train_bench's timed-step mode,
the checks and the summary, and (slow) the whole script at toy sizes on the CPU."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
sys.path.insert(0, str(BENCH))

from gpu_info import model_flop_utilisation, peak_bf16_tflops  # noqa: E402

SCRIPT = BENCH / "gpu_check.sh"
PARTS = BENCH / "gpu_check_parts.py"
BENCH_LABELS = ("baseline", "batch64", "batch128", "grad_ckpt", "compile")
ALL_PARTS = ("device", "data", "tests", *(f"bench_{b}" for b in BENCH_LABELS), "cli_flickr8k",
             "cli_tiny_cpu", "search", "sysmon")


def run(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def env(isolated_store) -> dict[str, str]:
    return dict(os.environ, NLMM_RUNS_DIR=str(isolated_store), OMP_NUM_THREADS="1",
                COLUMNS="160")


# ----------------------------------------------------------------------------- device facts

@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0), ("NVIDIA GH200 480GB", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0), ("NVIDIA L4", 121.0), ("NVIDIA L40S", 362.0),
    ("NVIDIA A10", 125.0), ("Tesla V100-SXM2-16GB", None), ("NVIDIA A10G", None),
    ("NVIDIA GeForce RTX 3090", None)])
def test_bf16_peak_is_read_from_the_device_name_or_unknown(name, peak):
    assert peak_bf16_tflops(name) == peak


def test_mfu_is_model_flops_per_second_over_the_peak():
    # 126 GFLOPs a triple at 3,000 triples/s = 378 TFLOP/s: 38.2 % of an H100 SXM
    assert model_flop_utilisation(126e9, 3000.0, 989.0) == pytest.approx(378 / 989)
    assert model_flop_utilisation(126e9, 3000.0, None) is None


# ----------------------------------------------------------------------------- train_bench

@pytest.fixture(scope="module")
def bench_json(synth_root, tmp_path_factory) -> dict:
    """train_bench's timed-step mode on the shared synthetic corpus, tiny_cpu at batch 8."""
    out = tmp_path_factory.mktemp("bench") / "baseline.json"
    env = dict(os.environ, OMP_NUM_THREADS="1",
               NLMM_RUNS_DIR=str(tmp_path_factory.mktemp("runs")))
    done = run([sys.executable, str(BENCH / "train_bench.py"), "--corpus", str(synth_root),
                "--modes", "baseline", "--steps", "3", "--warmup", "1", "--sync-steps", "2",
                "--set", "train.batch_size=8", "--label", "baseline", "--json", str(out)], env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "host syncs per step (baseline), by place: " in done.stdout
    return json.loads(out.read_text())


def test_train_bench_times_steps_and_counts_syncs(bench_json):
    r = bench_json["results"]["baseline"]
    assert bench_json["timing"] == "steps"
    assert bench_json["plan"] == {"warmup": 1, "steps": 3, "sync_steps": 2}
    assert r["steps"] == 6 and r["batch_size"] == 8
    assert r["epoch_s"] == pytest.approx(r["timed_s"] / 3 * r["steps_per_epoch"])
    assert r["triples_per_s"] == pytest.approx(8 * 3 / r["timed_s"])
    assert r["timed_s"] > 0 and r["warmup_s"] > 0 and 0 <= r["store_share"] < 1
    # the finite check of every step, plus the model's own reads
    levels = [n for site, n in r["sync_sites"].items()
              if site.rsplit(":", 1)[0].endswith("nlmm/optim/levels.py")]
    assert levels == [1]
    assert r["syncs_per_step"] == pytest.approx(sum(r["sync_sites"].values()))
    assert r["mfu"] is None and bench_json["device"]["peak_bf16_tflops"] is None  # a CPU
    assert r["flops_per_triple"] > 0 and r["mean_triple"]["text_len"] > 0
    assert r["peak_memory"]["kind"] == "cpu_peak_rss" and r["peak_memory"]["bytes"] > 0
    assert r["compile"] is False and r["compile_fallback"] is None


def test_check_bench_passes_good_figures_and_fails_a_compile_that_fell_back(bench_json, tmp_path,
                                                                            env):
    good = tmp_path / "good.json"
    good.write_text(json.dumps(bench_json))
    done = run([sys.executable, str(PARTS), "check-bench", str(good)], env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("baseline: ")
    fell_back = json.loads(json.dumps(bench_json))
    fell_back["results"]["baseline"].update(compile=True,
                                            compile_fallback="RuntimeError: no compiler")
    fell_back["results"]["baseline"]["epoch_s"] = math.nan
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(fell_back))
    done = run([sys.executable, str(PARTS), "check-bench", str(bad)], env)
    assert done.returncode == 1
    assert "epoch_s is nan" in done.stderr
    assert "train.compile fell back to eager (RuntimeError: no compiler)" in done.stderr


# ----------------------------------------------------------------------------- samples, summary

def test_sampler_writes_nvml_rows_until_terminated_and_the_check_reads_them(tmp_path, env):
    out = tmp_path / "sysmon" / "nvml.jsonl"
    sampler = subprocess.Popen([sys.executable, str(PARTS), "sample", "--out", str(out),
                                "--interval", "0.2"], cwd=REPO, env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(out.read_text().splitlines() if out.exists() else []) < 2:
        time.sleep(0.2)
    sampler.send_signal(signal.SIGTERM)
    assert sampler.wait(timeout=10) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    hosts = [r for r in rows if r["device_index"] is None]
    assert len(hosts) >= 2 and all(r["ram_total"] > 0 for r in hosts)
    done = run([sys.executable, str(PARTS), "check-sysmon", str(tmp_path), "--device", "cpu"], env)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "sysmon" / "check.json").read_text())["samples"] == len(hosts)
    # a CUDA check needs GPU rows and nvidia-smi lines, which this host-only file lacks
    done = run([sys.executable, str(PARTS), "check-sysmon", str(tmp_path), "--device", "cuda"], env)
    assert done.returncode == 1 and "NVML gave no GPU rows" in done.stderr


def test_summary_collects_every_part(bench_json, tmp_path, env):
    (tmp_path / "train_bench").mkdir()
    (tmp_path / "train_bench" / "baseline.json").write_text(json.dumps(bench_json))
    (tmp_path / "cli").mkdir()
    (tmp_path / "cli" / "flickr8k.json").write_text(json.dumps({
        "name": "gc_flickr8k", "status": "finished", "step": 200, "elapsed_s": 31.5,
        "final": {"loss": 1.25}, "recall": {"mean_r1": 20.5, "test/mean_r1": 19.0}}))
    (tmp_path / "status.tsv").write_text("part\tstatus\tseconds\tlog\n"
                                         "device\tok\t1.000\tlogs/device.log\n"
                                         "search\ttimed out after 150 s\t150.000\tlogs/search.log\n")
    done = run([sys.executable, str(PARTS), "summarize", str(tmp_path)], env)
    assert done.returncode == 0, done.stderr
    text = (tmp_path / "summary.md").read_text()
    assert "FAILED: search" in text and "| search | timed out after 150 s | 150.000 |" in text
    assert "| baseline (batch 8) |" in text and "(RSS)" in text
    assert "| gc_flickr8k | finished | 200 | 1.250 | 20.5 | 19.0 | 31.5 |" in text
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["failed"] == ["search"]


# ----------------------------------------------------------------------------- the script

def test_script_refuses_bad_arguments(tmp_path, env):
    for args, message in ((["--device", "tpu"], "--device must be cuda or cpu, got tpu"),
                          (["--budget", "soon"], "--budget must be whole seconds, got soon"),
                          (["--fast"], "unknown option --fast")):
        done = run(["bash", str(SCRIPT), str(tmp_path / "out"), *args], env)
        assert done.returncode == 2 and message in done.stderr, done.stderr
    done = run(["bash", str(SCRIPT)], env)
    assert done.returncode == 2 and "usage: bench/gpu_check.sh OUTDIR" in done.stderr


def test_a_part_the_budget_does_not_reach_fails_the_script(tmp_path, env):
    out = tmp_path / "out"
    done = run(["bash", str(SCRIPT), str(out), "--device", "cpu", "--budget", "5"], env)
    assert done.returncode == 1, done.stdout + done.stderr
    status = (out / "status.tsv").read_text().splitlines()
    assert status[1].startswith("device\tnot run: the 5 s budget was spent")
    assert (out / "summary.md").is_file() and (out / "env.txt").is_file()


@pytest.mark.slow  # 2-4 minutes on two CPU cores
def test_whole_check_runs_at_toy_sizes_on_the_cpu(tmp_path, env):
    out = tmp_path / "out"
    done = run(["bash", str(SCRIPT), str(out), "--device", "cpu"], env, timeout=1500)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    status = [line.split("\t") for line in (out / "status.tsv").read_text().splitlines()[1:]]
    assert sorted(s[0] for s in status) == sorted(ALL_PARTS)
    assert all(s[1] == "ok" and float(s[2]) > 0 for s in status), status
    assert json.loads((out / "device.json").read_text())["type"] == "cpu"

    suite = ET.parse(out / "tests" / "junit.xml").getroot().find("testsuite")
    assert int(suite.get("tests")) >= 20 and suite.get("failures") == suite.get("errors") == "0"

    for label in BENCH_LABELS:
        data = json.loads((out / "train_bench" / f"{label}.json").read_text())
        r = data["results"]["baseline"]
        assert data["label"] == label and data["config"] == "flickr8k"
        assert r["epoch_s"] > 0 and r["triples_per_s"] > 0 and r["syncs_per_step"] >= 1
    batches = {label: json.loads((out / "train_bench" / f"{label}.json").read_text())
               ["results"]["baseline"] for label in BENCH_LABELS}
    assert [batches[b]["batch_size"] for b in ("baseline", "batch64", "batch128")] == [8, 64, 128]
    assert batches["grad_ckpt"]["grad_checkpointing"] and batches["compile"]["compile"]
    assert batches["compile"]["compile_fallback"] is None

    for name in ("flickr8k", "tiny_cpu"):
        report = json.loads((out / "cli" / f"{name}.json").read_text())
        assert report["status"] == "finished" and report["recall_table_printed"]
        assert all(math.isfinite(v) for v in report["final"].values() if v is not None)
        assert 0 <= report["recall"]["test/mean_r1"] <= 100
        assert isinstance(json.loads((out / "cli" / f"{name}_system_samples.json").read_text()),
                          list)

    search = json.loads((out / "search" / "search.json").read_text())
    assert search["items"] == 2000 and "Searcher.query(text, target=audio, k=10)" in search["figures"]
    assert len((out / "sysmon" / "nvml.jsonl").read_text().splitlines()) >= 2
    summary = (out / "summary.md").read_text()
    assert "all parts passed" in summary and "| compile (batch 8) |" in summary
