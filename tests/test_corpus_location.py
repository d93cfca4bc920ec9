"""Where `nlmm train` takes its corpus from: a download happens only into the default folder
(./data/flickr8k); any other --data folder without a corpus is an error that creates nothing, not even the store."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import nlmm.data.download
from nlmm.config import resolve_config
from nlmm.data.corpus_location import prepare_corpus
from nlmm.errors import NlmmError


def tree(root: Path) -> set[Path]:
    return set(root.rglob("*"))


@pytest.mark.parametrize("exists", [False, True], ids=["missing folder", "folder without corpus"])
def test_a_data_folder_without_a_corpus_is_refused_and_nothing_is_created(
        tmp_path: Path, isolated_store: Path, exists: bool) -> None:
    data = tmp_path / "nonexistent"
    if exists:
        data.mkdir()
        (data / "holiday.jpg").write_bytes(b"not a corpus")
    before = tree(tmp_path)
    out = subprocess.run([sys.executable, "-m", "nlmm.cli", "train", "flickr8k", "--data", str(data),
                          "--device", "cpu"], cwd=tmp_path, capture_output=True, text=True,
                         env=dict(os.environ, NLMM_RUNS_DIR=str(isolated_store), COLUMNS="300"),
                         timeout=180)
    assert out.returncode == 1, out.stdout + out.stderr
    message = " ".join(out.stderr.split())
    assert f"no corpus at {data};" in message
    assert f"nlmm data download --dest {data}" in message
    assert f"nlmm data synth --out {data}" in message
    assert "download" not in out.stdout
    assert tree(tmp_path) == before  # no downloads/, data/, cache or runs/


def test_an_incomplete_corpus_in_the_default_folder_is_completed_by_a_download(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Caption and split files but no images: the default folder is the one place where
    # nlmm may download, and it must not take this for a corpus.
    monkeypatch.chdir(tmp_path)
    text = tmp_path / "data" / "flickr8k" / "Flickr8k_text"
    text.mkdir(parents=True)
    (text / "Flickr8k.token.txt").write_text("1000_0a1b2c3d4e.jpg#0\tA red circle .\n")
    for split in ("train", "dev", "test"):
        (text / f"Flickr_8k.{split}Images.txt").write_text("1000_0a1b2c3d4e.jpg\n")
    asked: list[Path] = []

    def offline(dest: Path, **kwargs: object) -> Path:
        asked.append(Path(dest).resolve())
        raise NlmmError("offline")

    monkeypatch.setattr(nlmm.data.download, "download_flickr8k", offline)
    cfg = resolve_config("tiny_cpu", [])
    for data in (None, tmp_path / "data" / "flickr8k"):  # implied, or named explicitly
        with pytest.raises(NlmmError, match="offline"):
            prepare_corpus(data, False, cfg)
    assert asked == [(tmp_path / "data" / "flickr8k").resolve()] * 2
