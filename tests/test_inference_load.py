"""Loading a model for inference: the weights-only copy of a checkpoint is derived on the first
load, memory-mapped by the later ones, and never outlives the checkpoint bytes it came from."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_VOCAB
from safetensors.torch import load_file

import nlmm.inference.checkpoint
from nlmm.config import Config, resolve_config
from nlmm.data.cache import PreparedCache
from nlmm.inference.load import load_for_inference
from nlmm.model import NLMM
from nlmm.paths import run_folder_of
from nlmm.search.engine import index_dir_for
from nlmm.inference.checkpoint import load_checkpoint, save_checkpoint
from nlmm.inference.weights_cache import checkpoint_key, weights_dir_for

CAPTION = "a red circle on a blue background"


def tiny_model_config() -> Config:
    """A small model reading the `tiny_cache` features (32 px images, 2 s clips, 300 words)."""
    return resolve_config("tiny_cpu", [
        "d_model=32", "embed_dim=32", "n_heads=2", "L_mem=2", f"vocab_size={TINY_VOCAB}",
        "data.image_size=32", "data.max_audio_seconds=2.0", "data.text_max_len=16"])


def write_checkpoint(path: Path, cache: PreparedCache, seed: int = 0) -> Path:
    """A randomly initialised model over `cache`, saved as a training run saves best.pt."""
    cfg = tiny_model_config()
    torch.manual_seed(seed)
    model = NLMM(cfg)
    # each tensor in a storage of its own, as after a reload (scale_weights keeps the size)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    save_checkpoint(path, {"model": state, "config": cfg.to_dict(),
                           "tokenizer": cache.tokenizer.to_json(),
                           "data": {"cache": str(cache.path), "key": cache.key},
                           "progress": {"global_step": 7 + seed}, "metrics": {"mean_r1": 1.5}})
    return path


def scale_weights(path: Path, factor: float) -> bytes:
    """The bytes of the checkpoint at `path` with its weight matrices scaled, same size."""
    payload = load_checkpoint(path)
    payload["model"] = {k: v * factor if v.ndim == 2 else v for k, v in payload["model"].items()}
    other = path.with_name("scaled.pt")
    save_checkpoint(other, {k: v for k, v in payload.items()
                            if k not in ("format", "format_version", "nlmm_version")})
    body = other.read_bytes()
    other.unlink()
    return body


def replace_checkpoint(path: Path, new_bytes: bytes, how: str) -> None:
    """Put `new_bytes` at `path` as a worker would (`renamed_over`), or in place keeping size,
    inode and mtime (`rewritten_in_place_same_stamp`: only the content and ctime differ)."""
    if how == "renamed_over":
        incoming = path.with_name("incoming.pt")
        incoming.write_bytes(new_bytes)
        os.replace(incoming, path)
        return
    st = path.stat()
    assert len(new_bytes) == st.st_size
    with open(path, "r+b") as fh:
        fh.write(new_bytes)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_ino, after.st_mtime_ns) == (st.st_size, st.st_ino,
                                                                st.st_mtime_ns)


def embed(model: NLMM, tokenizer, text: str = CAPTION) -> torch.Tensor:
    ids, lengths = tokenizer.encode_batch([text], 16)
    with torch.no_grad():
        return model.encode("text", torch.as_tensor(ids[:, :int(lengths[0])], dtype=torch.long))


def plain_model(path: Path) -> NLMM:
    """The model as loaded before weights-only copies: initialised, then the pickle copied in."""
    payload = load_checkpoint(path)
    model = NLMM(tiny_model_config())
    model.load_state_dict(payload["model"])
    return model.eval()


@pytest.fixture
def checkpoint(tiny_cache: PreparedCache, tmp_path: Path) -> Path:
    return write_checkpoint(tmp_path / "runs" / "r1" / "checkpoints" / "best.pt", tiny_cache)


def copies(checkpoint: Path) -> list[Path]:
    folder = weights_dir_for(checkpoint)
    return sorted(folder.glob("*.safetensors")) if folder.is_dir() else []


def test_first_load_writes_a_weights_copy_that_later_loads_map(checkpoint: Path,
                                                               monkeypatch: pytest.MonkeyPatch):
    first = load_for_inference(checkpoint, device="cpu")
    key = checkpoint_key(checkpoint)
    assert first.source_key == key
    [copy] = copies(checkpoint)
    assert copy == checkpoint.parent.parent / "weights" / f"best-{key[:16]}.safetensors"
    stored = load_file(str(copy))
    pickled = load_checkpoint(checkpoint)["model"]
    assert stored.keys() == pickled.keys()
    assert all(torch.equal(stored[k], pickled[k]) for k in pickled)

    # A later load never unpickles the checkpoint: it maps the copy.
    def no_unpickling(*args, **kwargs):
        raise AssertionError("the checkpoint was read again")

    monkeypatch.setattr(nlmm.inference.checkpoint, "load_checkpoint", no_unpickling)
    second = load_for_inference(str(checkpoint), device="cpu")
    assert torch.equal(embed(second.model, second.tokenizer), embed(first.model, first.tokenizer))
    monkeypatch.undo()
    assert torch.allclose(embed(second.model, second.tokenizer),
                          embed(plain_model(checkpoint), second.tokenizer), atol=1e-6)
    assert not second.model.training
    assert second.payload["progress"] == {"global_step": 7}
    assert second.payload["metrics"] == {"mean_r1": 1.5}
    assert "model" not in second.payload and second.cache is not None
    # the initialisers skipped while building are back for everyone else
    t = torch.zeros(4, 4)
    torch.nn.init.normal_(t)
    assert t.abs().sum() > 0


@pytest.mark.parametrize("how", ["renamed_over", "rewritten_in_place_same_stamp"])
def test_a_replaced_checkpoint_never_loads_the_old_weights(checkpoint: Path, how: str):
    before = load_for_inference(checkpoint, device="cpu")
    [old_copy] = copies(checkpoint)
    replace_checkpoint(checkpoint, scale_weights(checkpoint, 1.5), how)
    after = load_for_inference(checkpoint, device="cpu")
    assert after.source_key == checkpoint_key(checkpoint) != before.source_key
    assert torch.allclose(embed(after.model, after.tokenizer),
                          embed(plain_model(checkpoint), after.tokenizer), atol=1e-6)
    assert not torch.allclose(embed(after.model, after.tokenizer),
                              embed(before.model, before.tokenizer), atol=1e-3)
    [new_copy] = copies(checkpoint)  # the stale copy is deleted
    assert new_copy != old_copy and not old_copy.exists()


def test_a_damaged_copy_is_derived_again(checkpoint: Path):
    first = load_for_inference(checkpoint, device="cpu")
    want = embed(first.model, first.tokenizer)
    [copy] = copies(checkpoint)
    body = copy.read_bytes()
    # Damaged beside the mapping `first` holds: truncating a mapped file in place would fault
    # its reader, which is why nlmm only ever renames new copies into place.
    torn = copy.with_name("torn")
    torn.write_bytes(body[:len(body) // 3])
    os.replace(torn, copy)
    again = load_for_inference(checkpoint, device="cpu")
    assert torch.equal(embed(again.model, again.tokenizer), want)
    assert copy.read_bytes() == body


def test_each_checkpoint_keeps_one_copy_and_the_folder_a_few(tiny_cache: PreparedCache,
                                                             tmp_path: Path):
    folder = tmp_path / "runs" / "r2" / "checkpoints"
    for i, name in enumerate(["epoch_001.pt", "epoch_002.pt", "epoch_003.pt", "best.pt"]):
        load_for_inference(write_checkpoint(folder / name, tiny_cache, seed=i), device="cpu")
    names = sorted(p.name.split("-")[0] for p in copies(folder / "best.pt"))
    assert names == ["best", "epoch_002", "epoch_003"]  # the 3 most recently used


def test_a_text_search_imports_no_image_audio_or_store_library(checkpoint: Path):
    """Start-up cost: torchvision, torchaudio, PIL, SQLAlchemy and the training loop are not
    imported by a text query against a model without backbones, and the search client imports
    no torch at all."""
    load_for_inference(checkpoint, device="cpu")  # the copy exists, as for a repeated search
    script = f"""
import sys
from pathlib import Path
import nlmm.search.client
assert "torch" not in sys.modules and "numpy" not in sys.modules, "client imports torch"
from nlmm.search.engine import Searcher
from nlmm.search.types import SearchRequest
request = SearchRequest(text="a red circle", checkpoint=Path({str(checkpoint)!r}), device="cpu")
hits = Searcher(request.checkpoint, device="cpu").answer(request).hits
assert hits, "no hits"
print(sorted(m for m in ("torchvision", "torchaudio", "PIL.Image", "sqlalchemy", "nlmm.train.loop")
             if m in sys.modules))
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_index_and_weight_copies_of_a_checkpoint_go_to_its_run_folder(tmp_path: Path):
    """One rule for every file made from a checkpoint: beside the run's checkpoints folder, or
    beside a checkpoint kept outside any run."""
    root = tmp_path.resolve()
    in_run, loose = root / "runs" / "r1" / "checkpoints" / "best.pt", root / "copies" / "best.pt"
    assert run_folder_of(in_run) == root / "runs" / "r1" and run_folder_of(loose) is None
    for checkpoint, home in ((in_run, root / "runs" / "r1"), (loose, root / "copies")):
        assert index_dir_for(checkpoint) == home / "index"
        assert weights_dir_for(checkpoint) == home / "weights"
