"""Training streamed from a pack: pack -> stream -> train -> eval, and a run stopped mid-epoch
then resumed from last.pt sees exactly the samples, in the same order, that an uninterrupted
run sees (one process here; tests/test_packed.py checks the loader across ranks and workers)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import corpus_layouts as layouts
from tiny import tiny_config
from nlmm.config import resolve_config
from nlmm.data.corpora import read_corpus
from nlmm.data.pack_source import PackedSource
from nlmm.data.packed import pack
from nlmm.inference.checkpoint import load_checkpoint
from nlmm.train.launcher import fit_modalities
from nlmm.train.loop import Trainer

STEPS = 8


@pytest.fixture(autouse=True)
def pack_cache(tmp_path, monkeypatch) -> None:
    """Remote chunks and sha256 memos of each test in its own folder, never in ~/.cache."""
    monkeypatch.setenv("NLMM_PACK_CACHE", str(tmp_path / "pack-cache"))


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("stream")
    written = layouts.write_karpathy(root / "corpus", (48, 6, 6))
    data = resolve_config("tiny_cpu", ["data.image_size=32"]).data
    pack(read_corpus(written.path), root / "pack", vocab_size=400, data_cfg=data, workers=1,
         progress=False, chunk_bytes="8KB")  # several shards, so the shuffle has chunks to permute
    return root / "pack"


def config(source: PackedSource, *extra: str):
    cfg = tiny_config("data.image_size=32", "train.batch_size=8", "train.epochs=3",
                      "train.warmup_steps=2", "train.log_every=1", "train.loader_workers=1",
                      "data.augment=true", *extra)
    return fit_modalities(cfg, source.modalities(), None)


class Sink:
    def log(self, step: int, epoch: int, values: dict[str, float]) -> None:
        pass


def recorded_run(source: PackedSource, run_dir: Path, stop_after: int | None = None,
                 resume: bool = False) -> tuple[list[list[int]], str]:
    """The caption ids of every training batch of one Trainer.fit, in order."""
    seen: list[list[int]] = []
    trainer = Trainer(config(source, f"train_steps={STEPS}"), source, torch.device("cpu"),
                      run_dir, Sink(), log=lambda m: None)
    if resume:
        trainer.load_state_dict(load_checkpoint(run_dir / "checkpoints" / "last.pt"))
    step = trainer.train_step

    def recording(batches):
        seen.extend(b["caption_ids"].tolist() for b in batches)
        out = step(batches)
        if stop_after is not None and len(seen) == stop_after:
            trainer.stop_event.set()  # checked right after this step: last.pt, then "stopped"
        return out

    trainer.train_step = recording
    return seen, trainer.fit()


def test_a_run_stopped_mid_epoch_resumes_with_exactly_the_samples_it_missed(
        packed: Path, tmp_path: Path) -> None:
    source = PackedSource(packed)
    straight, status = recorded_run(source, tmp_path / "straight")
    assert status == "finished" and len(straight) == STEPS
    # 48 groups / batch 8 = 6 steps an epoch: step 8 is two batches into the second epoch
    first, status = recorded_run(source, tmp_path / "resumed", stop_after=STEPS // 2 + 3)
    assert status == "stopped"
    rest, status = recorded_run(source, tmp_path / "resumed", resume=True)
    assert status == "finished"
    assert first + rest == straight
    assert len({tuple(b) for b in straight[:6]}) == 6  # an epoch serves every batch once


def test_pack_stream_train_eval_from_the_command_line(tmp_path: Path) -> None:
    env = dict(os.environ, NLMM_RUNS_DIR=str(tmp_path / "runs"), COLUMNS="200")

    def nlmm(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "nlmm.cli", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)

    written = layouts.write_coco(tmp_path / "coco", (16, 6, 6))
    packed = tmp_path / "coco-packed"
    out = nlmm("data", "pack", str(written.path), str(packed), "--config", "tiny_cpu", "--set",
               "data.image_size=32")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "missing_image" in out.stdout  # the reader's defects, as data check lists them
    again = nlmm("data", "pack", str(written.path), str(tmp_path / "coco"), "--config", "tiny_cpu")
    assert again.returncode == 1 and "--force" in again.stderr  # a non-empty folder is refused
    run = ("--config", "tiny_cpu", "--device", "cpu", "--epochs", "1", "--set",
           "train.batch_size=8", "--set", "data.image_size=32")
    out = nlmm("train", "--data", str(packed), *run, "--name", "streamed")
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"streaming from the pack in {packed}" in out.stdout
    evaluated = nlmm("eval", "streamed", "--json", "--device", "cpu")
    assert evaluated.returncode == 0, evaluated.stderr
    results = json.loads(evaluated.stdout)
    assert results["pack"] == str(packed)
    assert results["coverage"]["n_images"] == written.count("test")
    assert {k[:3] for k in results["metrics"] if k.endswith("_r1") and k != "mean_r1"} == \
        {"i2t", "t2i"}
    # search needs no --data: the run's pack is the gallery (test split, images by group id)
    found = nlmm("search", "a dog on a beach", "--run", "streamed", "--json", "-k", "3",
                 "--device", "cpu", "--no-server")
    assert found.returncode == 0, found.stderr
    hits = [json.loads(line) for line in found.stdout.splitlines()]
    assert [h["rank"] for h in hits] == [1, 2, 3] and all(h["modality"] == "image" for h in hits)
    test_groups = {g for g, split in written.groups.items() if split == "test"}
    assert {h["item"] for h in hits} <= test_groups and hits[0]["caption"]
    # two gloo ranks, each reading its own share of the shards
    out = nlmm("train", "--data", str(packed), *run, "--nproc", "2", "--name", "two")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "test mean R@1" in out.stdout  # finished: the closing test figures


@pytest.mark.parametrize(("before", "after"), [
    ("1", None), ("2", None),
    pytest.param("2", "1", marks=pytest.mark.slow), pytest.param("1", "2", marks=pytest.mark.slow)],
    ids=["one process", "two gloo ranks", "two ranks then one", "one rank then two"])
def test_a_streamed_run_killed_with_sigkill_resumes_with_the_same_samples(
        packed: Path, tmp_path: Path, before: str, after: str | None) -> None:
    """`nlmm train --data PACK --nproc B`, kill -9 of its worker mid-epoch, `nlmm train --resume`
    with --nproc A (or none: the run's own): step by step the global batches (the ranks' rows
    joined in rank order) equal an uninterrupted run's (steps redone after the kill see the same
    samples again; the resumed run's record of a step is what the model learned from)."""
    import signal
    import time

    from nlmm import store

    def run(trace: Path, *extra: str) -> subprocess.Popen:
        env = dict(os.environ, NLMM_RUNS_DIR=str(tmp_path / "runs"), COLUMNS="200",
                   NLMM_SAMPLE_TRACE=str(trace))
        return subprocess.Popen([sys.executable, "-m", "nlmm.cli", "train", *extra, "--device",
                                 "cpu"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    args = ("--data", str(packed), "--config", "tiny_cpu", "--steps", "10", "--set",
            "train.batch_size=8", "--set", "data.image_size=32", "--set",
            "train.checkpoint_minutes=0.0001", "--set", "train.eval_every=5")

    def steps(trace: Path) -> tuple[dict[int, list[int]], dict[int, set[int]]]:
        """Per step of one run: the global batch's ids, and which ranks recorded it."""
        rows: dict[tuple[int, int], list[int]] = {}
        for line in trace.read_text().splitlines():
            step, rank, *ids = line.split()
            rows[int(step), int(rank)] = [int(i) for i in ids]
        joined: dict[int, list[int]] = {}
        ranks: dict[int, set[int]] = {}
        for (step, rank), ids in sorted(rows.items()):
            joined.setdefault(step, []).extend(ids)
            ranks.setdefault(step, set()).add(rank)
        return joined, ranks

    straight = run(tmp_path / "straight.txt", *args, "--nproc", before, "--name", "straight")
    assert straight.wait(timeout=300) == 0, straight.stdout.read()
    killed = run(tmp_path / "killed.txt", *args, "--nproc", before, "--name", "killed")
    os.environ["NLMM_RUNS_DIR"] = str(tmp_path / "runs")
    deadline = time.monotonic() + 180
    while (r := store.find_run("killed")) is None or (r.step or 0) < 4:
        assert time.monotonic() < deadline and killed.poll() is None, killed.stdout.read()
        time.sleep(0.1)
    os.kill(store.find_run("killed").pid, signal.SIGKILL)
    killed.wait(timeout=120)
    resumed = run(tmp_path / "resumed.txt", "--resume", "killed",
                  *(("--nproc", after) if after else ()))
    assert resumed.wait(timeout=300) == 0, resumed.stdout.read()
    first, _ = steps(tmp_path / "killed.txt")
    rest, ranks = steps(tmp_path / "resumed.txt")
    want, _ = steps(tmp_path / "straight.txt")
    assert {**first, **rest} == want and len(want) == 10
    assert all(len(ids) == 8 for ids in want.values()) and min(rest) <= max(first) + 1
    # the resumed run ran on the ranks asked for, or without --nproc on the run's own
    assert all(r == set(range(int(after or before))) for r in ranks.values())


@pytest.mark.slow
def test_a_streamed_run_continued_on_a_prepared_corpus_is_scored_on_both(tmp_path: Path) -> None:
    """A lineage whose first run streamed from a pack: `runs forgetting` scores the pack through
    the streamed evaluation and the second corpus through the cache, with `nlmm eval`'s
    figures."""
    env = dict(os.environ, NLMM_RUNS_DIR=str(tmp_path / "runs"), COLUMNS="250",
               OMP_NUM_THREADS="1")
    env.pop("NLMM_DB_URL", None)

    def nlmm(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "nlmm.cli", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)

    settings = ("--set", "data.image_size=32")
    packed = tmp_path / "a-packed"
    out = nlmm("data", "pack", str(layouts.write_coco(tmp_path / "a", (16, 6, 6)).path),
               str(packed), "--config", "tiny_cpu", *settings)
    assert out.returncode == 0, out.stdout + out.stderr
    out = nlmm("train", "--data", str(packed), "--config", "tiny_cpu", "--device", "cpu",
               "--steps", "3", "--set", "train.batch_size=8", *settings, "--name", "streamed")
    assert out.returncode == 0, out.stdout + out.stderr
    corpus_b = layouts.write_karpathy(tmp_path / "b", (12, 6, 6), seed=1).path
    out = nlmm("train", "--resume", "streamed", "--data", str(corpus_b), "--steps", "3",
               "--name", "cont")
    assert out.returncode == 0, out.stdout + out.stderr
    report = nlmm("runs", "forgetting", "cont", "--json", "--device", "cpu")
    assert report.returncode == 0, report.stderr
    scores = {(s["run"], s["corpus"]): s for s in json.loads(report.stdout)["scores"]}
    assert sorted(scores) == [("cont", 0), ("cont", 1), ("streamed", 0), ("streamed", 1)]
    for run, corpus, data in (("cont", 0, packed), ("streamed", 1, corpus_b)):
        evaluated = nlmm("eval", scores[run, corpus]["checkpoint"], "--data", str(data), "--json",
                         "--device", "cpu")
        assert evaluated.returncode == 0, evaluated.stderr
        metrics = json.loads(evaluated.stdout)["metrics"]
        assert scores[run, corpus]["metrics"] == pytest.approx(
            {k: v for k, v in metrics.items() if k.endswith("_r1") and "_own_" not in k})
    both = nlmm("eval", "cont", "--data", str(packed), "--data", str(corpus_b))
    assert both.returncode == 1 and "score a pack on its own" in both.stderr
