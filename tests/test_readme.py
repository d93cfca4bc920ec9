"""The README's Python blocks run as written, in a fresh interpreter, next to a bundle made by
`nlmm export` in `bundle/`, an image `photo.jpg` and a recording `speech.wav` (every Python
block of the README needs at most that)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from tiny import tiny_config
from nlmm.data.tokenizer import TextTokenizer
from nlmm.inference.export import export_bundle
from nlmm.model import NLMM
from nlmm.inference.checkpoint import save_checkpoint

README = Path(__file__).resolve().parents[1] / "README.md"
# After a block: no tensor it left behind may carry gradients (embedding needs none).
NO_GRADIENTS = """
import torch as _torch
_kept = [k for k, v in list(globals().items()) if isinstance(v, _torch.Tensor) and v.requires_grad]
assert not _kept, f"tensors that keep gradients: {_kept}"
"""


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), re.S | re.M)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding `bundle/`, exported from an untrained tiny model's checkpoint, and
    `photo.jpg` (80x60) and `speech.wav` (1 s at 22.05 kHz) to embed with it."""
    cfg = tiny_config()
    tokenizer = TextTokenizer.train(["a dog runs on the grass", "a red circle on a blue "
                                     "background"], cfg.vocab_size)
    folder = tmp_path_factory.mktemp("readme")
    checkpoint = folder / "run" / "checkpoints" / "best.pt"
    save_checkpoint(checkpoint, {"config": cfg.to_dict(), "model": NLMM(cfg).state_dict(),
                                 "tokenizer": tokenizer.to_json(), "progress": {"global_step": 1},
                                 "data": {"cache": str(folder / "no-cache")}})
    export_bundle(str(checkpoint), folder / "bundle")
    Image.new("RGB", (80, 60), (200, 30, 30)).save(folder / "photo.jpg")
    t = np.arange(22050) / 22050
    sf.write(folder / "speech.wav", 0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(6 * t)), 22050)
    return folder


def test_the_readme_has_a_bundle_block():
    assert any("load_bundle(" in block for block in python_blocks())


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_python_block_runs_as_written(index: int, workdir: Path):
    block = python_blocks()[index]
    done = subprocess.run([sys.executable, "-c", block + NO_GRADIENTS], cwd=workdir,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"README block {index + 1}:\n{block}\n{done.stderr}"


def own_data_block() -> list[str]:
    """The command lines of the bash block under "## Your own data"."""
    section = README.read_text().split("## Your own data", 1)[1].split("\n## ", 1)[0]
    block = re.findall(r"^```bash\n(.*?)^```", section, re.S | re.M)[0]
    return [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]


def test_your_own_data_commands_run_as_written(tmp_path: Path, tiny_corpus) -> None:
    """Each layout the section names is written where its command looks (tiny, synthetic),
    then every command runs as written; training lines get a tiny CPU budget appended."""
    import os
    import shutil

    import corpus_layouts as layouts

    data = tmp_path / "data"
    data.mkdir()
    made = {"coco": layouts.write_coco(tmp_path / "w" / "coco", (16, 4, 4)).path,
            "flickr30k": layouts.write_karpathy(tmp_path / "w" / "f30k", (16, 4, 4)).path,
            "audiocaps": layouts.write_audiocaps(tmp_path / "w" / "ac", (16, 4, 4)).path,
            "clotho": layouts.write_clotho(tmp_path / "w" / "clotho").path,
            "LibriSpeech": layouts.write_librispeech(tmp_path / "w" / "ls").path / "LibriSpeech",
            "pairs.csv": layouts.write_openclip_csv(tmp_path / "w" / "csv", (40, 5, 5)).path,
            "flickr8k": tiny_corpus.root}
    (data / "cv-corpus").mkdir()
    if layouts.MP3:
        made["cv-corpus/en"] = layouts.write_commonvoice(tmp_path / "w" / "cv").path / "en"
    for name, path in made.items():
        if path.is_file():  # the manifest's paths are relative to it: its folders come along
            shutil.copy(path, data / name)
            for item in path.parent.iterdir():
                if item.is_dir():
                    shutil.copytree(item, data / item.name)
        else:
            shutil.copytree(path, data / name, ignore=shutil.ignore_patterns(".nlmm_cache"))
    env = dict(os.environ, NLMM_RUNS_DIR=str(tmp_path / "runs"), COLUMNS="200")
    runs = 0
    for line in own_data_block():
        args = line.split()[1:]
        if "cv-corpus/en" in line and not layouts.MP3:
            continue  # no MP3 writer here: the Common Voice layout could not be made
        if args[0] == "train":
            runs += 1
            args += ["--config", "tiny_cpu", "--device", "cpu", "--epochs", "1", "--name",
                     f"r{runs}", "--set", "train.batch_size=8", "--set", "data.image_size=32"]
        if args[0] == "eval":
            args = [a if a != "RUN" else "r1" for a in args] + ["--device", "cpu"]
        done = subprocess.run([sys.executable, "-m", "nlmm.cli", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{line}\n{done.stdout}\n{done.stderr}"
    assert runs == 3
