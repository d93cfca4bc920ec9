"""Speed switches of training (train.compile, precision.tf32, train.channels_last, fused AdamW)
and the host syncs of a training step. The switches must change speed only: every test that
turns one on checks the training it gives against the same training without it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tiny import ListSink, TINY_DATA, tiny_config
from nlmm.config import ConfigError, resolve_config
from nlmm.model import NLMM
from nlmm.optim import Level, LevelOptimizer, build_optimizer
from nlmm.train import speed
from nlmm.train.loop import Trainer
from nlmm.train.speed import (channels_last_images, compile_encoders, count_syncs, tf32_scope,
                              use_channels_last)

LOOP, LEVELS = "nlmm/train/loop.py", "nlmm/optim/levels.py"


def tiny_cfg(*extra: str):
    """A model small enough that a few steps on the 13-image corpus take a second."""
    return tiny_config(*TINY_DATA, "train.batch_size=8", "train.epochs=2", "train.eval_every=2",
                       "train.log_every=1", "train.checkpoint_minutes=0", *extra)


def fit(cache, tmp_path: Path, name: str, *extra: str, device: torch.device | None = None,
        backend: str = "inductor") -> tuple[Trainer, ListSink, list[str]]:
    sink, messages = ListSink(), []
    trainer = Trainer(tiny_cfg(*extra), cache, device or torch.device("cpu"), tmp_path / name,
                      sink, log=messages.append, compile_backend=backend)
    assert trainer.fit() == "finished"
    return trainer, sink, messages


@pytest.fixture(scope="module")
def eager(tiny_cache, tmp_path_factory):
    """The training every switch is compared with: all switches off."""
    return fit(tiny_cache, tmp_path_factory.mktemp("eager"), "eager")


def same_training(a: tuple[Trainer, ListSink, list[str]], b: tuple[Trainer, ListSink, list[str]],
                  exact: bool = True) -> None:
    assert a[1].series("loss") and a[1].series("loss") == pytest.approx(
        b[1].series("loss"), rel=0 if exact else 1e-4, abs=0 if exact else 1e-5)
    weights_a, weights_b = a[0].model.state_dict(), b[0].model.state_dict()
    for key, value in weights_a.items():
        if exact:
            assert torch.equal(value, weights_b[key]), key
        else:
            torch.testing.assert_close(value, weights_b[key], rtol=1e-4, atol=1e-5, msg=key)


# ----------------------------------------------------------------------------- train.compile

def test_compile_is_a_validated_config_switch_off_by_default():
    assert resolve_config("flickr8k").train.compile is False
    assert tiny_cfg("train.compile=true").train.compile is True
    with pytest.raises(ConfigError, match="train.compile must be true/false"):
        tiny_cfg("train.compile=fast")


@pytest.fixture
def compile_calls(monkeypatch):
    """torch.compile replaced by a stand-in that records what it compiles and counts the
    calls of the compiled functions (it runs them eagerly)."""
    calls = {"compiled": [], "ran": 0}

    def fake_compile(fn, **options):
        calls["compiled"].append((fn.__self__, options))

        def run(*args, **kwargs):
            calls["ran"] += 1
            return fn(*args, **kwargs)
        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    return calls


def test_compile_switch_compiles_every_stem_and_block_for_training_only(tiny_cache, tmp_path,
                                                                       compile_calls, eager):
    assert eager[0].compiled is None
    compiled = fit(tiny_cache, tmp_path, "compiled", "train.compile=true")
    model = compiled[0].model
    parts = [m for enc in model.encoders.values() for m in (enc.stem, *enc.blocks)]
    assert [module for module, _ in compile_calls["compiled"]] == parts
    assert all(opts == {"backend": "inductor", "dynamic": True}
               for _, opts in compile_calls["compiled"])
    # 6 training steps x 6 parts; evaluation (dev, test x 2) ran eagerly
    assert compile_calls["ran"] == 6 * len(parts)
    assert compiled[0].compiled.active and "compiling the encoders" in compiled[2][0]
    same_training(eager, compiled)
    assert set(model.state_dict()) == set(eager[0].model.state_dict())


def test_a_part_that_fails_to_compile_falls_back_to_eager_with_one_warning(
        tiny_cache, tmp_path, monkeypatch, eager):
    def failing_compile(fn, **options):
        def run(*args, **kwargs):
            raise RuntimeError("inductor: no C++ compiler found\nsecond line")
        return run

    monkeypatch.setattr(torch, "compile", failing_compile)
    fallen = fit(tiny_cache, tmp_path, "fallen", "train.compile=true")
    warnings = [m for m in fallen[2] if m.startswith("warning: torch.compile failed")]
    assert warnings == ["warning: torch.compile failed (RuntimeError: inductor: no C++ compiler "
                        "found); training continues without it, at eager speed; set "
                        "train.compile: false to skip the attempt."]
    assert not fallen[0].compiled.active
    same_training(eager, fallen)


class FailingBackward(torch.autograd.Function):
    """Identity whose backward fails, as a compiled graph's backward does when its (lazy)
    compilation fails inside loss.backward()."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("backward graph failed to compile")


def test_a_backward_that_fails_to_compile_redoes_the_step_eagerly(tiny_cache, tmp_path,
                                                                  monkeypatch, eager):
    def poisoned_compile(fn, **options):
        def run(*args, **kwargs):
            first, *rest = fn(*args, **kwargs)
            return (FailingBackward.apply(first), *rest)
        return run

    monkeypatch.setattr(torch, "compile", poisoned_compile)
    redone = fit(tiny_cache, tmp_path, "redone", "train.compile=true")
    assert [m for m in redone[2] if "torch.compile failed" in m] == [
        "warning: torch.compile failed (RuntimeError: backward graph failed to compile); "
        "training continues without it, at eager speed; set train.compile: false to skip "
        "the attempt."]
    # the failed attempt's BatchNorm statistics and gradients were put back: same training
    same_training(eager, redone)


def test_torch_compile_unavailable_leaves_the_model_eager(tiny_cache, monkeypatch):
    def unsupported(fn, **options):
        raise RuntimeError("Dynamo is not supported on Python 3.99+")

    monkeypatch.setattr(torch, "compile", unsupported)
    model = NLMM(tiny_cfg())
    messages: list[str] = []
    parts = compile_encoders(model, messages.append)
    assert not parts.active and parts.parts == []
    assert "forward" not in vars(model.encoders["image"].stem)
    assert messages == ["warning: torch.compile failed (RuntimeError: Dynamo is not supported on "
                        "Python 3.99+); training continues without it, at eager speed; set "
                        "train.compile: false to skip the attempt."]


@pytest.mark.slow  # dynamo traces six parts: about a minute on two CPU cores
def test_dynamo_traces_the_encoders_and_trains_like_eager(tiny_cache, tmp_path, eager):
    """The real torch.compile front end (dynamo + AOT autograd, without inductor's C++/Triton
    code generation, which takes minutes on a CPU): the model traces, nothing falls back, and
    the losses and weights match eager training."""
    compiled = fit(tiny_cache, tmp_path, "aot", "train.compile=true", backend="aot_eager")
    assert compiled[0].compiled.active, compiled[0].compiled.failure
    same_training(eager, compiled, exact=False)


# ----------------------------------------------------------------------------- TF32

@pytest.mark.parametrize("enabled", [True, False])
def test_tf32_applies_to_cuda_steps_without_autocast_only(enabled):
    flags = (torch.backends.cuda.matmul, torch.backends.cudnn)
    before = [f.allow_tf32 for f in flags]
    with tf32_scope(torch.device("cuda"), "none", enabled):
        assert [f.allow_tf32 for f in flags] == [enabled, enabled]
    assert [f.allow_tf32 for f in flags] == before
    for device, amp in (("cuda", "bf16"), ("cpu", "none")):
        with tf32_scope(torch.device(device), amp, not before[0]):
            assert [f.allow_tf32 for f in flags] == before


def test_the_training_step_runs_in_the_tf32_scope(tiny_cache, tmp_path, device, monkeypatch):
    seen = []
    original = NLMM.forward

    def spy(self, batch):
        seen.append(torch.backends.cuda.matmul.allow_tf32)
        return original(self, batch)

    monkeypatch.setattr(NLMM, "forward", spy)
    before = torch.backends.cuda.matmul.allow_tf32
    trainer = Trainer(tiny_cfg("precision.amp=none", "precision.tf32=true"), tiny_cache, device,
                      tmp_path, ListSink(), log=lambda m: None)
    trainer.train_step([next(iter(trainer.loader(0)))])
    assert seen == [True if device.type == "cuda" else before]
    assert torch.backends.cuda.matmul.allow_tf32 == before


# ----------------------------------------------------------------------------- channels_last

def test_channels_last_stem_gives_the_same_embeddings():
    torch.manual_seed(0)
    plain = NLMM(tiny_cfg()).eval()
    nhwc = NLMM(tiny_cfg()).eval()
    nhwc.load_state_dict(plain.state_dict())
    # the conversion itself is device-independent; only the decision looks at the device
    assert not use_channels_last(nhwc, torch.device("cpu"))
    assert use_channels_last(nhwc, torch.device("cuda"))
    conv = nhwc.encoders["image"].stem.convs[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    images = torch.randn(4, 3, 32, 32)
    batch = channels_last_images({"image": images, "text": torch.ones(4, 3, dtype=torch.long)})
    assert batch["image"].is_contiguous(memory_format=torch.channels_last)
    assert batch["text"].is_contiguous()
    with torch.no_grad():
        torch.testing.assert_close(nhwc.encode("image", batch["image"]),
                                   plain.encode("image", images), rtol=1e-5, atol=1e-6)
    features = torch.randn(4, 16, 8)  # cached backbone features are left alone
    assert channels_last_images({"image": features})["image"] is features


def test_channels_last_follows_the_switch_and_the_device(tiny_cache, tmp_path, device):
    for switch in (True, False):
        trainer = Trainer(tiny_cfg(f"train.channels_last={str(switch).lower()}"), tiny_cache,
                          device, tmp_path / str(switch), ListSink(), log=lambda m: None)
        weight = trainer.model.encoders["image"].stem.convs[0].weight
        expected = switch and device.type == "cuda"
        assert trainer.channels_last == expected
        assert weight.is_contiguous(memory_format=torch.channels_last) == expected
        trainer.train_step([next(iter(trainer.loader(0)))])
        assert trainer.progress.global_step == 1


# ----------------------------------------------------------------------------- fused AdamW

def test_adamw_is_fused_when_every_parameter_is_a_cuda_float(device):
    params = [torch.nn.Parameter(torch.randn(4, 4, device=device)),
              torch.nn.Parameter(torch.randn(4, device=device))]
    optimizer = build_optimizer("adamw", params, 1e-3, 0.01, no_decay=params[1:])
    assert bool(optimizer.defaults["fused"]) == (device.type == "cuda")
    assert len(optimizer.param_groups) == 2  # decay and no-decay groups, both fused or neither
    params[0].grad = torch.ones_like(params[0])
    optimizer.step()
    # fused kernels keep the step count on the GPU; torch's other AdamW paths on the host
    assert optimizer.state[params[0]]["step"].device.type == device.type


# ----------------------------------------------------------------------------- host syncs

def sites_in(sites: list[str], suffix: str) -> list[str]:
    return [s for s in sites if s.rsplit(":", 1)[0].endswith(suffix)]


def test_training_reads_the_device_once_per_step_and_once_per_log_window(tiny_cache, tmp_path,
                                                                         device):
    """Over 4 steps logged every 2: the level optimizer's non-finite check reads the device once a
    step, its per-level update ratios once per log window, and the loop once per log window (not
    once per logged key). The model's own reads are not counted here; bench/gpu_check.sh reports
    every sync of a step."""
    trainer = Trainer(tiny_cfg("train.log_every=2", "train_steps=4", "train.epochs=5"),
                      tiny_cache, device, tmp_path, ListSink(), log=lambda m: None)
    trainer._evaluate_and_keep = lambda: None  # evaluation reads its scores: not a step's cost
    trainer._test_best_and_last = lambda: None
    trainer.checkpoint = lambda *args, **kwargs: None
    sites = count_syncs(trainer.fit, device)
    assert trainer.progress.global_step == 4
    assert len(sites_in(sites, LEVELS)) == 4 + 2, sites
    assert len(sites_in(sites, LOOP)) == 2, sites


def test_non_finite_check_reads_the_device_once_for_all_dtypes_and_stays_correct():
    params = [torch.nn.Parameter(torch.zeros(3)),
              torch.nn.Parameter(torch.zeros(3, dtype=torch.float64)),
              torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))]
    optimizer = LevelOptimizer([Level("fast", 1, torch.optim.SGD(params, lr=0.1))])

    def step_with(grads: list[list[float]]) -> list[str]:
        for p, g in zip(params, grads):
            p.grad = torch.tensor(g, dtype=p.dtype)
        return count_syncs(lambda: optimizer.step_all(1), torch.device("cpu"))

    assert len(sites_in(step_with([[1, 1, 1], [1, 1, 1], [1, 1]]), LEVELS)) == 1
    assert not optimizer.last_step_skipped
    # a non-finite value in an earlier dtype group must survive the later groups' checks
    for bad in ([[1, float("nan"), 1], [1, 1, 1], [1, 1]], [[1, 1, 1], [1, 1, 1], [float("inf"), 1]]):
        before = [p.detach().clone() for p in params]
        assert len(sites_in(step_with(bad), LEVELS)) == 1
        assert optimizer.last_step_skipped
        assert all(torch.equal(b, p) for b, p in zip(before, params))


def test_count_syncs_finds_each_read_and_where_it_happened():
    x = torch.arange(6.0)

    def reads() -> None:
        x.sum().item()
        bool(x.max() > 2)
        x[x > 2]
        x.nonzero()
        x + 1  # not a read

    sites = count_syncs(reads, torch.device("cpu"))
    assert len(sites) == 4
    assert all(s.startswith(f"{__file__}:") for s in sites)
    assert speed.HOST_READS >= {"item", "__bool__", "nonzero"}
