"""Checkpoint footprint: best.pt is a model snapshot, last.pt the full training state, both as
large as `nlmm model info` estimates, and no checkpoint is started without room for it."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from tiny import NullSink
from nlmm.config import resolve_config
from nlmm.errors import NlmmError
from nlmm.inference.load import load_for_inference
from nlmm.model.info import checkpoint_bytes
from nlmm.optim.levels import level_settings
from nlmm.inference.checkpoint import MODEL_KEYS, load_checkpoint, save_checkpoint
from nlmm.train.loop import Trainer

# the hand-written corpus of conftest: 30 training captions, 3 steps per epoch at batch 8
TINY = ["d_model=32", "embed_dim=32", "n_heads=2", "L_mem=2", "depth={text: 1, image: 1, audio: 1}",
        "vocab_size=300", "data.image_size=32", "data.max_audio_seconds=2.0",
        "data.text_max_len=16", "train.batch_size=8", "train.epochs=2", "train.checkpoint_minutes=0",
        # 5 steps: every level has stepped (mid at 2 and 4, slow at 4) and both are mid-chunk
        "train_steps=5", "cms_levels=[{name: fast, chunk_size: 1}, {name: mid, chunk_size: 2}, "
        "{name: slow, chunk_size: 4}]"]


@pytest.mark.parametrize("optimizer", ["universal_anderson", "adamw", "muon", "dmgd", "sgd"])
def test_best_is_a_model_snapshot_and_sizes_match_the_estimate(tiny_cache, tmp_path, optimizer):
    cfg = resolve_config("tiny_cpu", [*TINY, f"train.optimizer={optimizer}"])
    trainer = Trainer(cfg, tiny_cache, torch.device("cpu"), tmp_path, NullSink(), log=lambda m: None)
    assert trainer.fit() == "finished" and trainer.progress.global_step == 5
    folder = tmp_path / "checkpoints"
    best, last = load_checkpoint(folder / "best.pt"), load_checkpoint(folder / "last.pt")
    assert set(best) - {"format", "format_version", "nlmm_version"} <= set(MODEL_KEYS)
    assert "scheduler" not in best and "rng" not in best
    assert {"scheduler", "rng"} <= set(last)
    # every level's optimizer has state, and the slower levels hold a chunk in progress
    levels = last["scheduler"]["levels"]
    assert all(entry["optimizer"]["state"] for entry in levels.values())
    assert levels["mid"]["accum"] and levels["slow"]["accum"]

    estimate = checkpoint_bytes(cfg)
    sizes = {"best": (folder / "best.pt").stat().st_size, "last": (folder / "last.pt").stat().st_size}
    for kind in ("best", "last"):
        assert sizes[kind] == pytest.approx(estimate[kind], rel=0.05), kind
    # what eval, search and export load is all there
    loaded = load_for_inference(folder / "best.pt", device="cpu")
    for key, value in trainer.model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[key], value)


def test_model_info_prints_the_checkpoint_footprint():
    from rich.console import Console

    from nlmm.cli.reports import file_size, model_info_table

    cfg = resolve_config("flickr8k")
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(model_info_table(cfg, 32))
    text = console.export_text()
    estimate = checkpoint_bytes(cfg)
    for kind in ("best", "last"):
        assert re.search(rf"{kind}\.pt\s*│\s*{re.escape(file_size(estimate[kind]))} │", text), kind
    # the standard recipe: last.pt carries 13 copies of the weights for universal_anderson,
    # best.pt only the weights
    assert estimate["last"] > 12 * estimate["best"]


def test_the_readme_recipe_table_shows_the_computed_checkpoint_sizes():
    from nlmm.model.info import parameter_counts
    from nlmm.cli.reports import file_size

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    rows = re.findall(r"^\| `(\w+)` \|(.*)\|$", readme, re.M)
    shipped = {p.stem for p in (root / "configs").glob("*.yaml")}
    assert {name for name, _ in rows} == shipped  # a row for every recipe in configs/
    # the verified column is bench/recipes_bench.py's last run of the recipe, as it recorded it
    bench = {r["recipe"]: r for r in json.loads((root / "bench/results/recipes.json").read_text())}
    for name, cells in rows:
        cfg = resolve_config(name)
        epochs, batch, optimizer, params, best, last, verified = (c.strip() for c in cells.split("|"))
        run = bench[name]
        assert run["passed"], name
        assert verified.startswith(
            f"dev R@1 {run['dev']['mean_r1']:.1f} = {run['dev']['mean_r1'] / run['chance']:.1f}× "
            f"chance; loss {run['first']:.2f} → {run['final']:.2f}"), (name, verified)
        estimate = checkpoint_bytes(cfg)
        assert (epochs, batch) == (str(cfg.train.epochs), str(cfg.train.batch_size)), name
        assert optimizer == ", ".join(sorted({s.optimizer for s in level_settings(cfg)})), name
        assert params == f"{parameter_counts(cfg)['trainable'] / 1e6:.1f} M", name
        assert (best, last) == (file_size(estimate["best"]), file_size(estimate["last"])), name


Usage = namedtuple("Usage", "total used free")


def test_too_little_disk_space_fails_before_writing_and_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint(path, {"model": {"w": torch.zeros(1000)}, "progress": {"global_step": 1}})
    before = path.read_bytes()
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: Usage(10**9, 10**9 - 2**20, 2**20))
    with pytest.raises(NlmmError, match=r"not enough disk space for checkpoint .*last\.pt: it needs "
                                        r"about .* GB and .* has 0\.00 GB free; the previous file "
                                        r"there is kept"):
        save_checkpoint(path, {"model": {"w": torch.ones(1000)}, "progress": {"global_step": 2}})
    assert path.read_bytes() == before
    assert load_checkpoint(path)["progress"]["global_step"] == 1
    assert sorted(os.listdir(path.parent)) == ["last.pt"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_optimizer_histories_are_kept_in_the_parameters_dtype(dtype):
    """last.pt saves the optimizer state as it is held: every parameter-sized buffer (Adam's
    moments, Anderson's ΔX/ΔF histories, DMGD's momenta) in the parameter's dtype, never wider;
    only DMGD's memory (3H + 1 numbers per tensor) computes in fp32."""
    from nlmm.optim import DMGD, UniversalAnderson

    torch.manual_seed(0)
    for build in (lambda ps: UniversalAnderson(ps, lr=1e-2, history=3),
                  lambda ps: DMGD(ps, lr=1e-2, hidden=4, inner_lr=1e-2)):
        params = [torch.nn.Parameter(torch.randn(6, 5, dtype=dtype)),
                  torch.nn.Parameter(torch.randn(5, dtype=dtype))]
        optimizer = build(params)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn_like(p)
            optimizer.step()
        for p in params:
            for key, value in optimizer.state[p].items():
                if not isinstance(value, torch.Tensor):
                    continue
                if tuple(value.shape[value.ndim - p.ndim:]) == tuple(p.shape):
                    # a buffer of the parameter's shape, or a history of them
                    assert value.dtype == dtype, (type(optimizer).__name__, key, value.dtype)
                else:
                    assert value.dtype == torch.promote_types(dtype, torch.float32), key
                    assert value.numel() <= 2 * 4, key
