"""Learning health: every direction learns, collapse and divergence are visible, decay groups."""

from __future__ import annotations

import math

import pytest
import torch

from tiny import ListSink, TINY_DATA, tiny_config
from nlmm.config import resolve_config
from nlmm.errors import NlmmError
from nlmm.metric_names import DIRECTIONS
from nlmm.model import NLMM
from nlmm.train.loop import COLLAPSE_SPREAD, MAX_SKIPPED_IN_A_ROW, Trainer, embedding_spread


def test_shipped_tiny_cpu_lifts_every_direction_above_chance(synth_cache, tmp_path):
    """The shipped tiny_cpu recipe, briefly: dev R@1 of each of the six directions, image ones
    included, reaches 3x chance (a collapsed tower would sit at or below chance)."""
    cfg = resolve_config("tiny_cpu", ["train.epochs=4", "train.eval_every=4"])
    sink = ListSink()
    trainer = Trainer(cfg, synth_cache, torch.device("cpu"), tmp_path, sink, log=lambda m: None)
    assert trainer.fit() == "finished"
    chance = 100.0 / len(synth_cache.split_images("dev"))
    dev = {d: sink.series(f"{d}_r1")[-1] for d in DIRECTIONS}
    print("dev R@1", dev, f"chance {chance:.1f}")
    for direction, r1 in dev.items():
        assert r1 >= 3 * chance, f"{direction} R@1 {r1:.1f}% < 3x chance ({3 * chance:.1f}%)"
    for modality in ("image", "text", "audio"):
        assert sink.series(f"spread/{modality}")[-1] < COLLAPSE_SPREAD


def test_embedding_spread_matches_pairwise_cosines():
    emb = torch.nn.functional.normalize(torch.randn(7, 5), dim=-1)
    sims = emb @ emb.T
    expected = (sims.sum() - sims.diagonal().sum()) / (7 * 6)
    assert float(embedding_spread(emb)) == pytest.approx(float(expected), abs=1e-6)
    same = torch.nn.functional.normalize(torch.ones(4, 5), dim=-1)
    assert float(embedding_spread(same)) == pytest.approx(1.0, abs=1e-6)


def _small(*extra):
    return tiny_config(*TINY_DATA, "train.batch_size=8", "train.log_every=1",
                       "train.eval_every=100", *extra)


def _blank_images(trainer: Trainer) -> None:
    """Every training image becomes the same grey picture: the image tower cannot tell rows apart."""
    original = trainer.loader

    def loader(epoch, start_batch=0):
        for batch in original(epoch, start_batch):
            batch["image"] = torch.zeros_like(batch["image"])
            yield batch
    trainer.loader = loader


def test_collapse_warning_fires_on_a_collapsed_tower_and_not_on_a_healthy_run(synth_cache, tmp_path):
    def small_synth(*extra):
        return tiny_config("train.batch_size=16", "train.log_every=2", "train.eval_every=100",
                           "train.epochs=2", *extra)

    lines: list[str] = []
    sink = ListSink()
    trainer = Trainer(small_synth(), synth_cache, torch.device("cpu"), tmp_path / "a", sink,
                      log=lines.append)
    _blank_images(trainer)
    trainer.fit()
    warnings = [line for line in lines if line.startswith("warning:")]
    assert len(warnings) == 2 and all("image embeddings collapsed" in w for w in warnings), lines
    assert sink.series("collapsed/image") == [1.0, 1.0]
    assert sink.series("collapsed/text") == [0.0, 0.0]
    assert min(sink.series("spread/image")) > COLLAPSE_SPREAD

    lines.clear()
    healthy = ListSink()
    Trainer(small_synth(), synth_cache, torch.device("cpu"), tmp_path / "b", healthy,
            log=lines.append).fit()
    assert not [line for line in lines if line.startswith("warning:")], lines
    for modality in ("image", "text", "audio"):
        assert healthy.series(f"collapsed/{modality}") == [0.0, 0.0]


def test_a_non_finite_step_is_skipped_and_counted(tiny_cache, tmp_path):
    sink = ListSink()
    trainer = Trainer(_small("train.epochs=1"), tiny_cache, torch.device("cpu"), tmp_path, sink,
                      log=lambda m: None)
    original = trainer.loader

    def loader(epoch, start_batch=0):
        for i, batch in enumerate(original(epoch, start_batch)):
            if i == 1:
                batch["audio"] = torch.full_like(batch["audio"], float("nan"))
            yield batch
    trainer.loader = loader
    trainer.fit()
    assert trainer.skipped_steps == 1
    assert sum(sink.series("skipped_steps")) == 1
    assert all(math.isfinite(v) for v in sink.series("loss"))
    assert all(bool(torch.isfinite(t).all()) for t in trainer.model.state_dict().values()
               if t.is_floating_point())


def test_a_streak_of_non_finite_steps_fails_the_run_with_one_sentence(tiny_cache, tmp_path):
    trainer = Trainer(_small("train.epochs=50"), tiny_cache, torch.device("cpu"), tmp_path,
                      ListSink(), log=lambda m: None)
    original = trainer.loader

    def loader(epoch, start_batch=0):
        for batch in original(epoch, start_batch):
            batch["image"] = torch.full_like(batch["image"], float("nan"))
            yield batch
    trainer.loader = loader
    with pytest.raises(NlmmError, match=f"diverged: {MAX_SKIPPED_IN_A_ROW} steps in a row"):
        trainer.fit()
    assert trainer.progress.global_step == 0


def test_weight_decay_skips_vectors_and_lookup_tables():
    model = NLMM(resolve_config("tiny_nlmm"))
    optimizer = model.configure_optimizers(model.cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    decay_of = {}
    for level in optimizer.levels:
        for group in level.optimizer.param_groups:
            for p in group["params"]:
                decay_of[names[id(p)]] = group["weight_decay"]
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(decay_of) == set(trainable)
    must_skip = [n for n, p in trainable.items() if p.ndim < 2 or n.endswith(
        ("positions", "tokens.weight", "slots", "pool.query"))]
    assert "logit_scale" in must_skip and "memory.slots" in must_skip
    assert any(n.endswith("tokens.weight") for n in must_skip)
    assert any(n.endswith("norm.weight") for n in must_skip)
    assert any(n.endswith(".bias") for n in must_skip)
    for name in must_skip:
        assert decay_of[name] == 0.0, name
    matrices = [n for n in trainable if n not in must_skip]
    assert matrices
    for name in matrices:
        assert decay_of[name] > 0.0, name


def test_muon_orthogonalises_only_the_matrices_the_model_does_not_exclude():
    from nlmm.optim.muon import takes_muon_path

    model = NLMM(resolve_config("tiny_nlmm", ["train.optimizer=muon"]))
    excluded = model.no_muon()
    assert "memory.slots" in excluded and any(n.endswith("head.weight") for n in excluded)
    assert any(n.endswith("tokens.weight") for n in excluded)
    model.configure_optimizers(model.cfg)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert takes_muon_path(p) == (p.ndim >= 2 and name not in excluded), name


def test_logged_test_figures_are_what_nlmm_eval_prints_for_best_pt(tiny_cache, tmp_path):
    """`test/…` is the dev-selected best model, scored exactly as `nlmm eval` scores best.pt;
    `test_last/…` is the last model."""
    from nlmm.eval.evaluate import evaluate_target

    sink = ListSink()
    trainer = Trainer(_small("train.epochs=3", "train.eval_every=1"), tiny_cache,
                      torch.device("cpu"), tmp_path, sink, log=lambda m: None)
    assert trainer.fit() == "finished"
    logged = {k.removeprefix("test/"): v for _, _, row in sink.rows for k, v in row.items()
              if k.startswith("test/")}
    assert any(k.startswith("test_last/") for _, _, row in sink.rows for k in row)
    printed = evaluate_target(str(tmp_path / "checkpoints" / "best.pt"), split="test",
                              device="cpu")
    for key, value in printed["metrics"].items():
        assert logged[key] == value, key
    assert printed["coverage"] == {k: int(logged[k]) for k in ("n_images", "n_captions", "n_wavs")}
