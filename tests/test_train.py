"""Training in-process on the synthetic corpus: learning, evaluation, checkpoints, exact resume."""

from __future__ import annotations

import threading

import pytest
import torch

from tiny import ListSink, SMALL_MODEL, TINY_DATA, tiny_config
from nlmm.inference.checkpoint import load_checkpoint
from nlmm.train.loop import Trainer, lr_factor, short_run_warmup


def small_cfg(*extra):
    return tiny_config("train.batch_size=16", "train.log_every=2", *extra, model=SMALL_MODEL)


def test_lr_schedule_warmup_then_cosine():
    assert lr_factor(5, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, "cosine") == pytest.approx(0.0)
    assert lr_factor(70, 100, 10, "constant") == 1.0


def test_steps_make_a_short_run_whose_warmup_fits_it(synth_cache, tmp_path, device):
    assert short_run_warmup(500, 30, 900) == 3   # the flickr8k recipe under --steps 30
    assert short_run_warmup(500, 900, 900) == 500  # uncapped: the configured warmup
    assert short_run_warmup(2, 30, 900) == 2
    trainer = Trainer(small_cfg("train_steps=12", "train.warmup_steps=500"), synth_cache, device,
                      tmp_path, ListSink(), log=lambda m: None)
    assert trainer.total_steps == 12 and trainer.warmup_steps == 1
    # past the first step the lr is the peak and decays over the 12 steps, never a sliver of it
    assert lr_factor(2, 12, trainer.warmup_steps, "cosine") > 0.9


def test_training_learns_retrieval_well_above_chance(synth_cache, tmp_path, device):
    cfg = small_cfg("train.epochs=8", "train.warmup_steps=10")
    sink = ListSink()
    trainer = Trainer(cfg, synth_cache, device, tmp_path, sink, log=lambda m: None)
    assert trainer.fit() == "finished"
    n_test_images = len(synth_cache.split_images("test"))
    chance = 100.0 / n_test_images  # R@1 chance level of every direction: one image in N
    test_r1 = sink.last("test/mean_r1")
    print(f"test mean R@1 {test_r1:.1f}%, chance {chance:.1f}%")
    assert test_r1 >= 5 * chance, f"test mean R@1 {test_r1:.1f}% < 5x chance ({5 * chance:.1f}%)"
    losses = [v["loss"] for _, _, v in sink.rows if "loss" in v]
    assert losses[-1] < 0.7 * losses[0]
    for key in ("loss_i2t", "loss_i2a", "loss_t2a", "triples_per_s", "lr/fast", "lr/slow",
                "i2t_r1", "a2t_r10", "mean_r1", "temperature"):
        assert any(key in v for _, _, v in sink.rows), key
    assert (tmp_path / "checkpoints" / "last.pt").is_file()
    assert (tmp_path / "checkpoints" / "best.pt").is_file()


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_two_epochs_equal_one_plus_resume_plus_one(synth_cache, tmp_path):
    extra = ("train.schedule=constant", "train.warmup_steps=0", "train.eval_every=5")
    cfg2 = small_cfg("train.epochs=2", *extra)
    straight = Trainer(cfg2, synth_cache, torch.device("cpu"), tmp_path / "a", ListSink(),
                       log=lambda m: None)
    straight.fit()

    cfg1 = small_cfg("train.epochs=1", *extra)
    first = Trainer(cfg1, synth_cache, torch.device("cpu"), tmp_path / "b", ListSink(),
                    log=lambda m: None)
    first.fit()
    payload = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")
    assert payload["progress"]["global_step"] == first.steps_per_epoch
    resumed = Trainer(small_cfg("train.epochs=2", *extra), synth_cache, torch.device("cpu"),
                      tmp_path / "b", ListSink(), log=lambda m: None)
    resumed.load_state_dict(payload)
    resumed.fit()
    assert resumed.progress.global_step == straight.progress.global_step
    a, b = _weights(straight.model), _weights(resumed.model)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_stop_mid_epoch_checkpoints_and_resumes_at_that_step(synth_cache, tmp_path, device):
    cfg = small_cfg("train.epochs=2", "train.schedule=constant", "train.warmup_steps=0")
    stop = threading.Event()

    class StopAfter(ListSink):
        def log(self, step, epoch, values):
            super().log(step, epoch, values)
            if step >= 4:
                stop.set()

    trainer = Trainer(cfg, synth_cache, device, tmp_path, StopAfter(), stop_event=stop,
                      log=lambda m: None)
    assert trainer.fit() == "stopped"
    payload = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert payload["progress"]["global_step"] == 4
    assert payload["progress"]["batch_in_epoch"] == 4
    again = Trainer(cfg, synth_cache, device, tmp_path, ListSink(), log=lambda m: None)
    again.load_state_dict(payload)
    assert again.progress.global_step == 4
    for key, value in _weights(trainer.model).items():
        torch.testing.assert_close(again.model.state_dict()[key], value)


def test_last_checkpoint_is_also_written_by_time_within_an_epoch(tiny_cache, tmp_path):
    """With train.checkpoint_minutes elapsed, last.pt is written mid-epoch (here after every
    step: 1e-6 minutes), so a crash in a long first epoch leaves something to resume."""
    cfg = tiny_config(*TINY_DATA, "train.batch_size=8", "train.epochs=1",
                      "train.checkpoint_minutes=1e-6")
    events = []
    trainer = Trainer(cfg, tiny_cache, torch.device("cpu"), tmp_path, ListSink(),
                      on_checkpoint=events.append, log=lambda m: None)
    trainer.fit()
    mid_epoch = [e for e in events if e.kind == "last" and e.progress.batch_in_epoch > 0]
    assert len(mid_epoch) >= 2 and mid_epoch[0].progress.global_step == 1
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["progress"]["global_step"] == 3

def test_epoch_numbers_are_one_based_and_name_the_epoch_a_step_belongs_to():
    from nlmm.train.loop import Progress

    assert Progress().epoch_number == 0  # nothing trained yet
    assert Progress(epoch=0, batch_in_epoch=3).epoch_number == 1  # inside the first epoch
    assert Progress(epoch=1, batch_in_epoch=0).epoch_number == 1  # the first epoch just ended
    assert Progress(epoch=1, batch_in_epoch=1).epoch_number == 2


def test_level_metrics_are_logged_and_a_still_level_is_warned_about(synth_cache, tmp_path,
                                                                    device):
    levels = ("cms_levels=[{name: fast, chunk_size: 1, lr: 2.0e-3}, "
              "{name: slow, chunk_size: 2, lr: 0.0}]")  # a slow level forced to stay still
    said: list[str] = []
    sink = ListSink()
    trainer = Trainer(small_cfg(levels, "train_steps=24", "train.schedule=constant",
                                "train.warmup_steps=1", "train.epochs=1"), synth_cache, device,
                      tmp_path, sink,
                      log=said.append)
    assert trainer.fit() == "finished"
    for key in ("level/fast/update_ratio", "level/fast/gain", "level/slow/gain"):
        assert any(key in v for _, _, v in sink.rows), key
    assert sink.last("level/fast/update_ratio") > 0
    assert any("CMS level slow barely moves" in line for line in said)
    assert sink.last("level/slow/still") == 1.0
