"""`nlmm export`: an existing bundle is replaced only with --force, and every file of a bundle
gets the same mode, the one the umask gives."""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tiny import tiny_config
from nlmm.inference.bundle import CONFIG, META, TOKENIZER, WEIGHTS, load_bundle
from nlmm.data.tokenizer import TextTokenizer
from nlmm.errors import NlmmError
from nlmm.inference.export import export_bundle
from nlmm.model import NLMM
from nlmm.inference.checkpoint import save_checkpoint

BUNDLE_FILES = (WEIGHTS, CONFIG, TOKENIZER, META)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny model saved as a checkpoint whose data cache is gone: export needs
    neither training nor data."""
    cfg = tiny_config()
    tokenizer = TextTokenizer.train(["a red circle on a blue background",
                                     "a green square on a white background"], cfg.vocab_size)
    folder = tmp_path_factory.mktemp("ckpt")
    path = folder / "best.pt"
    save_checkpoint(path, {"config": cfg.to_dict(), "model": NLMM(cfg).state_dict(),
                           "tokenizer": tokenizer.to_json(), "progress": {"global_step": 7},
                           "data": {"cache": str(folder / "deleted-cache")}})
    return path


def export_cli(checkpoint: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    # umask 027 rather than the usual 022: the mode must follow the umask, not be fixed
    command = [sys.executable, "-m", "nlmm.cli", "export", str(checkpoint), "--out", str(out),
               *extra]
    return subprocess.run(["sh", "-c", "umask 027 && exec " + shlex.join(command)],
                          capture_output=True, text=True, env=dict(os.environ, COLUMNS="200"),
                          timeout=180)


def modes(folder: Path) -> dict[str, int]:
    return {name: stat.S_IMODE((folder / name).stat().st_mode) for name in BUNDLE_FILES}


def test_export_refuses_a_folder_in_use_without_force_and_gives_every_file_one_mode(
        checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    first = export_cli(checkpoint, out)
    assert first.returncode == 0, first.stderr
    assert modes(out) == dict.fromkeys(BUNDLE_FILES, 0o640)
    assert load_bundle(out).meta["step"] == 7

    written = {name: (out / name).read_bytes() for name in BUNDLE_FILES}
    (out / WEIGHTS).write_bytes(b"an older bundle's weights")
    (out / "notes.txt").write_text("mine")
    refused = export_cli(checkpoint, out)
    assert refused.returncode != 0
    assert f"{out} is not empty; pass --force" in " ".join(refused.stderr.split())
    assert (out / WEIGHTS).read_bytes() == b"an older bundle's weights"

    forced = export_cli(checkpoint, out, "--force")
    assert forced.returncode == 0, forced.stderr
    assert {name: (out / name).read_bytes() for name in BUNDLE_FILES} == written
    assert (out / "notes.txt").read_text() == "mine"  # --force replaces the bundle, nothing else
    assert modes(out) == dict.fromkeys(BUNDLE_FILES, 0o640)


def test_export_into_an_empty_folder_is_fine_and_into_a_file_is_refused(
        checkpoint: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert export_bundle(str(checkpoint), empty) == empty
    assert sorted(p.name for p in empty.iterdir()) == sorted(BUNDLE_FILES)
    assert len(set(modes(empty).values())) == 1

    a_file = tmp_path / "model.bin"
    a_file.write_bytes(b"keep me")
    with pytest.raises(NlmmError, match="is a file"):
        export_bundle(str(checkpoint), a_file, force=True)
    assert a_file.read_bytes() == b"keep me"
