"""--tensorboard / --wandb: the same scalars land in TensorBoard event files and an offline W&B run."""

import torch

from tiny import ListSink, tiny_config
from nlmm.train.loop import Trainer
from nlmm.train.mirrors import TeeSink, build_mirrors


def test_mirrors_receive_the_store_scalars(synth_cache, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tiny_config("train.batch_size=8", "train.log_every=1", "train_steps=3")
    primary = ListSink()
    sink = TeeSink(primary, build_mirrors(["tensorboard", "wandb"], "mirror-run", tmp_path,
                                          cfg.to_dict()))
    Trainer(cfg, synth_cache, torch.device("cpu"), tmp_path, sink, log=lambda m: None).fit()
    sink.close()

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    losses = {(e.step, round(e.value, 5)) for e in events.Scalars("loss")}
    stored = {(step, round(v["loss"], 5)) for step, _, v in primary.rows if "loss" in v}
    assert stored and losses == stored
    assert "mean_r1" in events.Tags()["scalars"]
    offline = list((tmp_path / "wandb").glob("offline-run-*"))
    assert offline, "an offline W&B run folder is written"
    assert any(offline[0].rglob("*.wandb"))
