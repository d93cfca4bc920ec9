"""Continual learning: `nlmm train --resume RUN --data NEW` continues RUN on another corpus as a
new run that records its parent, and `nlmm runs forgetting` scores every run of the lineage on
every corpus with `nlmm eval`'s figures. The CLI tests train real runs on two hand-written
corpora."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from corpus_factory import write_public_corpus

from nlmm import store
from nlmm.train.worker import continued_start
from test_faults import NLMM, SMALL, TINY_DATA

TINY = ["--config", "tiny_cpu", *TINY_DATA, *SMALL]


def test_a_continued_run_starts_at_step_0_from_the_weights_its_parent_was_tested_with():
    """A level whose open chunk was applied at the parent's end (chunk_start saved beside it)
    keeps the applied weights: the chunk is committed, not put back; a chunk still open in a
    stopped parent (no chunk_start) is carried over."""
    sums = {0: torch.ones(2)}
    payload = {"model": {"w": torch.zeros(2)}, "rng": torch.zeros(1), "loader": {"epoch": 3},
               "progress": {"global_step": 40, "epoch": 2, "batch_in_epoch": 4,
                            "best_metric": 55.0, "last_eval": {"mean_r1": 55.0}},
               "scheduler": {"version": 2, "levels": {
                   "slow": {"chunk_size": 16, "accum": sums, "chunk_start": {0: torch.ones(2)}},
                   "mid": {"chunk_size": 4, "accum": sums}}}}
    start = continued_start(payload)
    assert start["progress"] == {"global_step": 0, "epoch": 0, "batch_in_epoch": 0,
                                 "best_metric": -1.0, "last_eval": {}}
    assert "loader" not in start and start["model"] is payload["model"]
    assert start["scheduler"]["levels"]["slow"] == {"chunk_size": 16, "accum": {}}
    assert start["scheduler"]["levels"]["mid"] == {"chunk_size": 4, "accum": sums}
    assert "chunk_start" in payload["scheduler"]["levels"]["slow"], "the parent's state was changed"


def test_lineage_follows_parents_and_names_a_removed_one():
    for name, parent in (("a", None), ("b", "a"), ("c", "b"), ("orphan", "gone")):
        store.create_run(name, {}, "data", "cpu", 1, None, parent=parent)
    runs, missing = store.lineage(store.get_run("c"))
    assert [r.name for r in runs] == ["a", "b", "c"] and missing is None
    runs, missing = store.lineage(store.get_run("orphan"))
    assert [r.name for r in runs] == ["orphan"] and missing == "gone"


# ---- real runs -----------------------------------------------------------------------------

def nlmm(*args: str, runs: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, NLMM_RUNS_DIR=str(runs), COLUMNS="250", OMP_NUM_THREADS="1")
    env.pop("NLMM_DB_URL", None)
    return subprocess.run([*NLMM, *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def continued(tiny_corpus, tmp_path_factory) -> tuple[Path, Path, Path, dict[str, bytes]]:
    """A runs folder where run `a` trained one epoch on corpus A and `b` continued it for one
    epoch on corpus B (other images, other captions' sizes); with both corpora and the bytes of
    a's files before b existed."""
    root = tmp_path_factory.mktemp("continual")
    corpus_a = root / "a"
    shutil.copytree(tiny_corpus.root, corpus_a)
    corpus_b = write_public_corpus(root / "b", n_images=17, splits=(9, 4, 4),
                                   image_size=(56, 56)).root
    runs = root / "runs"
    out = nlmm("train", "flickr8k", "--data", str(corpus_a), "--name", "a", "--epochs", "1",
               *TINY, runs=runs)
    assert out.returncode == 0, out.stdout + out.stderr
    before = {p.name: p.read_bytes() for p in (runs / "a").rglob("*.pt")}
    out = nlmm("train", "--resume", "a", "--data", str(corpus_b), "--epochs", "1", "--name", "b",
               runs=runs)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "continuing run a" in out.stdout and "as the new run b" in " ".join(out.stdout.split())
    return runs, corpus_a, corpus_b, before


@pytest.mark.slow
def test_continuing_on_another_corpus_makes_a_child_run(continued, monkeypatch):
    runs, corpus_a, corpus_b, before = continued
    monkeypatch.setenv("NLMM_RUNS_DIR", str(runs))
    a, b = store.get_run("a"), store.get_run("b")
    assert b.parent == "a" and a.parent is None
    assert (a.status, a.step, b.status, b.step) == ("finished", 3, "finished", 5)
    assert b.data != a.data and Path(b.data).is_relative_to(corpus_b)
    # the parent is left as it was; the child trained on B with A's tokenizer
    assert {p.name: p.read_bytes() for p in (runs / "a").rglob("*.pt")} == before
    from nlmm.inference.checkpoint import load_checkpoint

    child = load_checkpoint(runs / "b" / "checkpoints" / "last.pt")
    parent = load_checkpoint(runs / "a" / "checkpoints" / "last.pt")
    assert child["tokenizer"] == parent["tokenizer"]
    assert child["progress"]["global_step"] == 5
    assert (runs / "b" / "config.yaml").read_text().startswith("# continues run a ")
    log = (runs / "b" / "train.log").read_text()
    assert "continuing run a on this corpus" in log and "at step 0 of this run" in log
    from rich.console import Console

    from nlmm.cli.reports import run_details

    shown = Console(width=200, record=True)
    shown.print(run_details("b"))
    assert "continues  a on another corpus (`nlmm runs forgetting b` scores both)" in \
        shown.export_text()


@pytest.mark.slow
def test_runs_forgetting_matches_nlmm_eval(continued):
    runs, corpus_a, corpus_b, _ = continued
    out = nlmm("runs", "forgetting", "b", "--json", runs=runs)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["lineage"] == ["a", "b"]
    assert [c["sources"] for c in report["corpora"]] == [[str(corpus_a)], [str(corpus_b)]]
    scores = {(s["run"], s["corpus"]): s for s in report["scores"]}
    assert sorted(scores) == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    assert [k for k, s in scores.items() if s["trained_on"]] == [("a", 0), ("b", 1)]
    for run, corpus, folder in (("a", 1, corpus_b), ("b", 0, corpus_a)):
        score = scores[run, corpus]
        evaluated = nlmm("eval", score["checkpoint"], "--data", str(folder), "--json", runs=runs)
        assert evaluated.returncode == 0, evaluated.stderr
        metrics = json.loads(evaluated.stdout)["metrics"]
        assert score["metrics"] == pytest.approx({k: v for k, v in metrics.items()
                                                  if k.endswith("_r1") and "_own_" not in k})
    table = nlmm("runs", "forgetting", "b", runs=runs)
    assert table.returncode == 0, table.stderr
    text = " ".join(table.stdout.replace("│", " ").split())
    assert str(corpus_a) in text and str(corpus_b) in text and "a (trained on it)" in text
    mean = scores["b", 0]["metrics"]["mean_r1"]
    assert f"{mean:.1f} {mean - scores['a', 0]['metrics']['mean_r1']:+.1f}" in text


@pytest.mark.slow
def test_a_continued_run_keeps_its_parents_model(continued):
    runs, _, corpus_b, _ = continued
    out = nlmm("train", "--resume", "a", "--data", str(corpus_b), "--set", "d_model=64",
               runs=runs)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "d_model would change from 32 to 64" in " ".join(out.stderr.split())
    # --data naming the run's own corpus is a plain resume, refused for a finished run
    again = nlmm("train", "--resume", "a", "--data", str(continued[1]), runs=runs)
    assert again.returncode == 1 and "run a already finished" in again.stderr
