"""The README's Python blocks run as written, in a fresh interpreter, next to a bundle made by
`nlmm export` in `bundle/` (every Python block of the README needs at most that)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from nlmm.config import resolve_config
from nlmm.data.tokenizer import TextTokenizer
from nlmm.export import export_bundle
from nlmm.model import NLMM
from nlmm.train.checkpoint import save_checkpoint

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
    """A folder holding `bundle/`, exported from an untrained tiny model's checkpoint."""
    cfg = resolve_config("tiny_cpu", ["d_model=32", "embed_dim=32", "n_heads=2", "L_mem=2",
                                      "depth={text: 1, image: 1, audio: 1}"])
    tokenizer = TextTokenizer.train(["a dog runs on the grass", "a red circle on a blue "
                                     "background"], cfg.vocab_size)
    folder = tmp_path_factory.mktemp("readme")
    checkpoint = folder / "run" / "checkpoints" / "best.pt"
    save_checkpoint(checkpoint, {"config": cfg.to_dict(), "model": NLMM(cfg).state_dict(),
                                 "tokenizer": tokenizer.to_json(), "progress": {"global_step": 1},
                                 "data": {"cache": str(folder / "no-cache")}})
    export_bundle(str(checkpoint), folder / "bundle")
    return folder


def test_the_readme_has_a_bundle_block():
    assert any("load_bundle(" in block for block in python_blocks())


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_python_block_runs_as_written(index: int, workdir: Path):
    block = python_blocks()[index]
    done = subprocess.run([sys.executable, "-c", block + NO_GRADIENTS], cwd=workdir,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"README block {index + 1}:\n{block}\n{done.stderr}"
