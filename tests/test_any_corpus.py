"""Every corpus layout, end to end: check -> prepare -> a short real training run -> eval ->
search, on tiny corpora written in each real layout (tests/corpus_layouts.py); bi-modal runs
report exactly the directions their corpus has; a mixture reports each corpus; the user's first
commands on a COCO folder and a CSV of image-caption pairs, as subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import corpus_layouts as layouts

from tiny import ListSink, tiny_config
from nlmm.config import resolve_config
from nlmm.data.cache import prepare
from nlmm.data.check import check_corpus
from nlmm.data.corpora.base import CorpusSpec
from nlmm.errors import NlmmError
from nlmm.search.engine import Searcher
from nlmm.eval.evaluate import evaluate_target
from nlmm.train.launcher import check_splits, fit_modalities
from nlmm.train.loop import Trainer

IMAGE_TEXT = {"i2t", "t2i"}
TEXT_AUDIO = {"t2a", "a2t"}
SIZES = (16, 4, 4)

LAYOUTS = {
    "karpathy": (lambda root: layouts.write_karpathy(root, SIZES), IMAGE_TEXT),
    "karpathy-coco": (lambda root: layouts.write_karpathy(root, SIZES, coco=True), IMAGE_TEXT),
    "coco": (lambda root: layouts.write_coco(root, SIZES), IMAGE_TEXT),
    "openclip-csv": (lambda root: layouts.write_openclip_csv(root, (40, 5, 5)), IMAGE_TEXT),
    "manifest-tsv": (lambda root: layouts.write_manifest_tsv(root, SIZES), IMAGE_TEXT),
    "manifest-jsonl": (lambda root: layouts.write_manifest_jsonl(root, SIZES), TEXT_AUDIO),
    "audiocaps": (lambda root: layouts.write_audiocaps(root, SIZES), TEXT_AUDIO),
    "clotho": (lambda root: layouts.write_clotho(root, SIZES), TEXT_AUDIO),
    "librispeech": (lambda root: layouts.write_librispeech(root, SIZES), TEXT_AUDIO),
    "commonvoice": (lambda root: layouts.write_commonvoice(root, SIZES), TEXT_AUDIO),
}


def tiny_cfg(cache):
    cfg = tiny_config("data.image_size=32", "data.max_audio_seconds=1.0", "train.batch_size=8",
                      "train.epochs=2", "train.warmup_steps=2", "train.log_every=1")
    return fit_modalities(cfg, cache.modalities(), None)


def train_briefly(cache, run_dir: Path):
    cfg = tiny_cfg(cache)
    check_splits(cache, cfg)
    sink = ListSink()
    trainer = Trainer(cfg, cache, torch.device("cpu"), run_dir, sink, log=lambda m: None)
    assert trainer.fit() == "finished"
    return trainer, sink


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_each_layout_checks_prepares_trains_evaluates_and_searches(name: str,
                                                                   tmp_path: Path) -> None:
    if name == "commonvoice" and not layouts.MP3:
        pytest.skip("this libsndfile cannot write MP3, so no Common Voice clip can be made")
    build, directions = LAYOUTS[name]
    written = build(tmp_path / name)
    report = check_corpus(written.path, workers=1)
    assert report.format == written.format
    assert report.usable and set(report.modalities()) == (
        {"image", "text"} if directions == IMAGE_TEXT else {"text", "audio"})
    for kind, item in written.defects:  # every known defect of the layout, with its reason
        assert any(d.kind == kind and d.item == item for d in report.defects), (kind, item)

    cfg = resolve_config("tiny_cpu", ["data.image_size=32", "data.max_audio_seconds=1.0"])
    cache = prepare(written.path, cfg.data, cfg.vocab_size, workers=1, progress=False)
    assert cache.manifest["counts"]["total"] == report.counts["total"]
    trainer, sink = train_briefly(cache, tmp_path / "run")
    pair = "loss_i2t" if directions == IMAGE_TEXT else "loss_t2a"
    assert any(pair in row for _, _, row in sink.rows)
    absent = {"loss_i2a", "loss_t2a"} if directions == IMAGE_TEXT else {"loss_i2t", "loss_i2a"}
    assert not any(absent & set(row) for _, _, row in sink.rows)  # never a 0 or chance stand-in
    # the untrained tower is not built, so it is not in the checkpoint either
    missing = "audio" if directions == IMAGE_TEXT else "image"
    assert missing not in trainer.model.encoders
    state = torch.load(tmp_path / "run" / "checkpoints" / "best.pt", map_location="cpu",
                       weights_only=False)["model"]
    assert not any(k.startswith(f"encoders.{missing}.") for k in state)

    results = evaluate_target(str(tmp_path / "run" / "checkpoints" / "best.pt"), device="cpu")
    assert {k[:3] for k in results["metrics"] if k.endswith("_r1") and k != "mean_r1"} == \
        directions
    assert results["modalities"] == list(trainer.model.modalities)

    searcher = Searcher(tmp_path / "run" / "checkpoints" / "best.pt", device="cpu")
    target = "image" if directions == IMAGE_TEXT else "audio"
    hits = searcher.query(text="a red circle", target=target, k=2)
    assert len(hits) == 2 and all(h.modality == target for h in hits)
    with pytest.raises(NlmmError, match=f"this model has no {missing} tower"):
        searcher.query(text="a red circle", target=missing, k=2)


def test_a_mixture_trains_on_both_corpora_and_reports_each(tiny_corpus, tmp_path: Path) -> None:
    csv = layouts.write_openclip_csv(tmp_path / "csv", (40, 5, 5))
    cfg = resolve_config("tiny_cpu", ["data.image_size=32", "data.max_audio_seconds=1.0"])
    specs = [CorpusSpec(tiny_corpus.root), CorpusSpec(csv.path)]
    cache = prepare(specs, cfg.data, cfg.vocab_size, workers=1, progress=False)
    assert cache.modalities() == ("image", "text", "audio")
    assert [s["format"] for s in cache.sources] == ["flickr8k", "manifest"]
    # the tokenizer saw the training captions of both corpora
    assert "kangaroo" in cache.tokenizer.vocab()  # a word only the Flickr corpus's train captions have
    rows = [row for _, _, row in train_briefly(cache, tmp_path / "run")[1].rows]
    assert any("loss_i2a" in row for row in rows) and any("loss_i2t" in row for row in rows)
    results = evaluate_target(str(tmp_path / "run" / "checkpoints" / "best.pt"), device="cpu")
    flickr, manifest = results["sources"]
    assert flickr["format"] == "flickr8k" and manifest["format"] == "manifest"
    assert {k[:3] for k in flickr["metrics"] if k.endswith("_r1") and "_own" not in k} >= \
        {"i2t", "t2i", "i2a", "a2i", "t2a", "a2t"}
    assert {k[:3] for k in manifest["metrics"] if k.endswith("_r1") and k != "mean_r1"} == \
        IMAGE_TEXT
    assert flickr["coverage"]["n_images"] == 3 and manifest["coverage"]["n_wavs"] == 0
    assert results["coverage"]["n_images"] == 3 + manifest["coverage"]["n_images"]


def test_a_split_with_no_rows_is_one_sentence(tmp_path: Path) -> None:
    path = tmp_path / "pairs.csv"
    for i in range(10):
        layouts.picture(tmp_path / f"{i}.jpg", i)
    path.write_text("image,caption,split\n" + "".join(f"{i}.jpg,cap {i},train\n" for i in range(9))
                    + "9.jpg,cap dev,dev\n")
    cfg = resolve_config("tiny_cpu", ["data.image_size=32"])
    cache = prepare(path, cfg.data, cfg.vocab_size, workers=1, progress=False)
    with pytest.raises(NlmmError, match="the test split of .* has no rows; give some rows"):
        check_splits(cache, cfg)


def nlmm(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="200", NLMM_RUNS_DIR=str(cwd / "runs"))
    return subprocess.run([sys.executable, "-m", "nlmm.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


TRAIN = ("--config", "tiny_cpu", "--device", "cpu", "--epochs", "1", "--set",
         "train.batch_size=8", "--set", "data.image_size=32", "--name", "mine")


def test_a_coco_folder_trains_with_one_command_and_scores_under_coco_5k(tmp_path: Path) -> None:
    written = layouts.write_coco(tmp_path / "coco", SIZES)
    out = nlmm("train", "flickr8k", "--data", "coco", *TRAIN, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "coco layout detected" in out.stdout and "download" not in out.stdout
    assert "training image and text only" in out.stdout
    evaluated = nlmm("eval", "mine", "--protocol", "coco-5k", "--json", "--device", "cpu",
                     cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    results = json.loads(evaluated.stdout)
    n_test = written.count("test")
    assert results["protocol"] == "coco-5k" and results["coverage"]["n_images"] == n_test
    assert f"coco-5k scores 5000 test images, but this test split has {n_test}" in \
        results["warnings"][0]
    wrong = nlmm("search", "a red circle", "--run", "mine", "--in", "audio", "--device", "cpu",
                 cwd=tmp_path)
    assert wrong.returncode == 1
    assert wrong.stderr.strip().startswith("error: this model has no audio tower")
    assert "Traceback" not in wrong.stderr


def test_a_csv_of_50_pairs_trains_with_one_command(tmp_path: Path) -> None:
    written = layouts.write_openclip_csv(tmp_path / "mine", (40, 5, 5))
    out = nlmm("train", "--data", str(written.path), *TRAIN, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "manifest layout detected" in out.stdout
    hits = nlmm("search", "a red circle", "--run", "mine", "--json", "-k", "2", "--device", "cpu",
                cwd=tmp_path)
    assert hits.returncode == 0, hits.stderr
    assert [json.loads(line)["modality"] for line in hits.stdout.splitlines()] == ["image"] * 2
    mistyped = nlmm("train", "--data", str(written.path), "--columns", "image=filepath,text=titel",
                    *TRAIN, cwd=tmp_path)
    assert mistyped.returncode == 1
    assert "has no column 'titel'; its columns are filepath, title" in " ".join(
        mistyped.stderr.split())


def test_flickr8k_on_a_folder_of_another_layout_never_offers_a_download(tmp_path: Path) -> None:
    from nlmm.data.corpus_location import ensure_corpus_spec

    layouts.write_audiocaps(tmp_path / "clips", SIZES)
    said: list[str] = []
    spec = ensure_corpus_spec(CorpusSpec(tmp_path / "clips"), said.append)
    assert spec.format == "audiocaps" and said == [f"{tmp_path / 'clips'}: audiocaps layout detected"]
    assert not (tmp_path / "clips" / "downloads").exists()
