"""Data-parallel training through torchrun on the CPU (gloo): two processes, on one node or as two
nodes, train exactly like one process with the same global batch, and only rank 0 writes.

The runs use gradient accumulation (no_sync on the first micro-batch) and CMS levels that step
every 1, 2 and 4 steps, so the level optimizer's chunk sums are exercised under DDP too.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading

import pytest
import torch

from tiny import ListSink
from nlmm import store
from nlmm.config import resolve_config
from nlmm.errors import NlmmError
from nlmm.train.launcher import launch
from nlmm.train.request import TrainRequest
from nlmm.train.loop import Trainer

STEPS = 6
CONFIG = ["d_model=32", "embed_dim=32", "n_heads=2", "L_mem=2", "depth.text=1", "depth.image=1",
          "depth.audio=1", "train.batch_size=16", "train.accumulate=2", "train.log_every=1",
          f"train_steps={STEPS}", "train.warmup_steps=2",
          "cms_levels=[{name: fast, chunk_size: 1, lr: 2.0e-3}, {name: mid, chunk_size: 2, "
          "lr: 1.0e-3}, {name: slow, chunk_size: 4, lr: 5.0e-4}]",
          # BatchNorm stems normalise each rank's shard on its own (SyncBatchNorm needs CUDA), so
          # the exact one-process equivalence is checked on the norm-free stems
          "conv_stems=false"]
LOSSES = ("loss", "loss_i2t", "loss_i2a", "loss_t2a", "temperature")
RECALLS = tuple(f"{d}_r{k}" for d in ("i2t", "t2i", "i2a", "a2i", "t2a", "a2t") for k in (1, 5, 10))


@pytest.fixture(scope="module")
def one_process(synth_cache, tmp_path_factory) -> dict[str, dict[int, float]]:
    """Per-step losses and dev recalls of the run in one process, global batch 16."""
    sink = ListSink()
    trainer = Trainer(resolve_config("tiny_cpu", CONFIG), synth_cache, torch.device("cpu"),
                      tmp_path_factory.mktemp("one"), sink, log=lambda _msg: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers (OMP_NUM_THREADS=1): same reduction order
    try:
        assert trainer.fit() == "finished"
    finally:
        torch.set_num_threads(threads)
    return sink.by_key()


def train_args(synth_root, *extra: str) -> list[str]:
    args = [sys.executable, "-m", "nlmm.cli", "train", "flickr8k", "--synthetic", "--data",
            str(synth_root), "--device", "cpu", *extra]
    for item in CONFIG:
        args += ["--set", item]
    return args


@pytest.fixture
def env(isolated_store):
    # one thread per process: on a shared 2-core machine more threads only thrash
    return dict(os.environ, NLMM_RUNS_DIR=str(isolated_store), COLUMNS="200", OMP_NUM_THREADS="1")


def assert_same_training(run: store.Run, one_process) -> None:
    assert run.status == "finished" and run.step == STEPS
    for key in LOSSES:
        series = dict(store.metric_series(run.id, key, max_points=1000))
        assert sorted(series) == list(range(1, STEPS + 1)), key
        for step, value in one_process[key].items():
            assert series[step] == pytest.approx(value, rel=1e-4, abs=1e-6), (key, step)
    latest = store.latest_metrics(run.id, keys=RECALLS)
    for key in RECALLS:  # dev evaluation: embeddings gathered from both ranks
        assert latest[key] == pytest.approx(one_process[key][STEPS], abs=1e-6), key


def test_two_gloo_processes_train_like_one_with_the_same_global_batch(synth_root, env, one_process):
    out = subprocess.run(train_args(synth_root, "--name", "ddp", "--nproc", "2"), env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    run = store.get_run("ddp")
    log = open(run.log_path).read()
    assert "training ddp on 2 processes (cpu)" in log
    # the run's own lines only: no per-rank Gloo connection lines, no DDP flag warning
    assert "Gloo" not in log and "find_unused_parameters" not in log, log
    assert run.processes == 2
    shown = subprocess.run([sys.executable, "-m", "nlmm.cli", "runs", "ls"], env=env,
                           capture_output=True, text=True, timeout=60)
    assert "cpu ×2" in shown.stdout, shown.stdout + shown.stderr
    assert [r.name for r in store.list_runs()] == ["ddp"]  # rank 1 registered nothing
    assert_same_training(run, one_process)
    checkpoints = {os.path.basename(c.path) for c in store.list_checkpoints(run.id)}
    assert checkpoints == {"best.pt", "last.pt"}


@pytest.mark.slow  # two more torchrun launches; the 2-process test covers the training maths
def test_two_nodes_meet_at_the_rendezvous_endpoint(synth_root, env, one_process):
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    nodes = ["--nproc", "1", "--nnodes", "2", "--rdzv-endpoint", f"127.0.0.1:{port}"]
    second = {}

    def run_second_node():
        second["out"] = subprocess.run(train_args(synth_root, *nodes, "--node-rank", "1"),
                                       env=env, capture_output=True, text=True, timeout=300)

    thread = threading.Thread(target=run_second_node)
    thread.start()
    first = subprocess.run(train_args(synth_root, *nodes, "--name", "nodes"), env=env,
                           capture_output=True, text=True, timeout=300)
    thread.join(300)
    assert first.returncode == 0, first.stdout + first.stderr
    assert second["out"].returncode == 0, second["out"].stdout + second["out"].stderr
    assert [r.name for r in store.list_runs()] == ["nodes"]  # node 1 registered nothing
    assert_same_training(store.get_run("nodes"), one_process)


def test_options_that_cannot_work_are_refused_before_anything_starts(synth_root):
    def launch_with(**options):
        with pytest.raises(NlmmError) as caught:
            launch(TrainRequest(data=synth_root, synthetic=True, device="cpu",
                                overrides=["train.batch_size=16"], **options))
        return str(caught.value)

    assert "must split evenly over 3 processes" in launch_with(nproc=3)
    assert "need --rdzv-endpoint" in launch_with(nnodes=2)
    assert "--node-rank must be between 0 and" in launch_with(nnodes=2, node_rank=2,
                                                              rdzv_endpoint="h:1")
    assert "HOST:PORT" in launch_with(nnodes=2, rdzv_endpoint="no-port")
    assert store.list_runs() == []
    store.create_run("parent", {}, "data", "cpu", 1, None)
    # another corpus is prepared with the parent's tokenizer, which only node 0 holds
    assert "runs on one node; drop --nnodes" in launch_with(nnodes=2, rdzv_endpoint="h:1",
                                                            resume="parent")
    assert [run.name for run in store.list_runs()] == ["parent"]


def test_more_processes_than_gpus_are_refused_on_cuda(synth_root, device):
    """One GPU holds one NCCL rank: --nproc beyond the GPUs of the node fails before anything
    starts (the CPU's gloo ranks have no such limit, so this runs on --device cuda only)."""
    if device.type != "cuda":
        pytest.skip("a CPU run may start any number of gloo ranks; run with --device cuda")
    too_many = torch.cuda.device_count() + 1
    with pytest.raises(NlmmError, match="more processes than the"):
        launch(TrainRequest(data=synth_root, synthetic=True, device="cuda", nproc=too_many,
                            overrides=[f"train.batch_size={2 * too_many}"]))
    assert store.list_runs() == []
