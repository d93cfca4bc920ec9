"""LevelOptimizer: CMS update frequencies, chunk sums, loss scaling, clipping, overrides, resume."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from torch import nn

from nlmm.config import config_from_dict, resolve_config
from nlmm.errors import NlmmError
from nlmm.optim import SGDW, Level, LevelOptimizer, UniversalAnderson


class Chain(nn.Module):
    """Three CMS-like levels in a chain: fast → mid → slow."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fast, self.mid, self.slow = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.slow(torch.tanh(self.mid(torch.tanh(self.fast(x)))))

    def level_params(self) -> dict[str, list[nn.Parameter]]:
        return {"fast": list(self.fast.parameters()), "mid": list(self.mid.parameters()),
                "slow": list(self.slow.parameters())}


def batch_loss(model: nn.Module, step: int, part: int = 0) -> torch.Tensor:
    """The loss of a batch that depends only on (global step, micro-batch), as a data loader would give."""
    g = torch.Generator().manual_seed(1000 * step + part)
    x, y = torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g)
    dtype = next(model.parameters()).dtype
    return ((model(x.to(dtype)) - y.to(dtype)) ** 2).mean()


def make_config(**overrides):
    raw = {
        "cms_levels": [
            {"name": "fast", "chunk_size": 1, "lr": 1e-2, "optimizer": "adamw", "weight_decay": 0.01},
            {"name": "mid", "chunk_size": 8, "lr": 5e-3, "optimizer": "adamw", "weight_decay": 0.01},
            {"name": "slow", "chunk_size": 32, "lr": 2.5e-3, "optimizer": "adamw", "weight_decay": 0.01},
        ],
        "precision": {"amp": "none", "grad_clip": 1.0},
    }
    raw.update(overrides)
    return config_from_dict(raw)


def snapshot(model: Chain) -> dict[str, list[torch.Tensor]]:
    return {name: [p.detach().clone() for p in ps] for name, ps in model.level_params().items()}


def train(model: Chain, optimizer: LevelOptimizer, steps, changes: Counter) -> None:
    """One optimizer step per global step; count, per level, the steps that changed its parameters."""
    for step in steps:
        before = snapshot(model)
        optimizer.scale_loss(batch_loss(model, step)).backward()
        stepped = optimizer.step_all(step)
        after = snapshot(model)
        changed = {name for name in before
                   if any(not torch.equal(a, b) for a, b in zip(before[name], after[name]))}
        due = {name for name, chunk in (("fast", 1), ("mid", 8), ("slow", 32)) if step % chunk == 0}
        assert set(stepped) == due == changed, f"step {step}: stepped {stepped}, changed {changed}"
        changes.update(changed)
        assert all(p.grad is None for p in model.parameters())


def epochs(first_epoch: int, first_batch: int, n_epochs: int, batches: int = 32):
    """Global step numbers of a loop whose batch index restarts at 0 every epoch."""
    for epoch in range(first_epoch, n_epochs):
        for batch in range(first_batch if epoch == first_epoch else 0, batches):
            yield epoch * batches + batch + 1


def test_levels_step_at_their_frequency_across_epochs_and_a_mid_chunk_resume(tmp_path) -> None:
    cfg = make_config()
    reference = Chain()
    interrupted = copy.deepcopy(reference)

    ref_changes: Counter = Counter()
    train(reference, LevelOptimizer.from_config(reference.level_params(), cfg), epochs(0, 0, 2), ref_changes)
    assert ref_changes == {"fast": 64, "mid": 8, "slow": 2}

    changes: Counter = Counter()
    optimizer = LevelOptimizer.from_config(interrupted.level_params(), cfg)
    train(interrupted, optimizer, (s for s in epochs(0, 0, 2) if s <= 20), changes)
    state = optimizer.state_dict()
    assert set(state["levels"]["mid"]["accum"]) == {0, 1}      # 4 steps into mid's chunk
    assert set(state["levels"]["slow"]["accum"]) == {0, 1}     # 20 steps into slow's chunk
    torch.save({"model": interrupted.state_dict(), "levels": state}, tmp_path / "ckpt.pt")

    saved = torch.load(tmp_path / "ckpt.pt")
    resumed = copy.deepcopy(interrupted)
    resumed.load_state_dict(saved["model"])
    resumed_optimizer = LevelOptimizer.from_config(resumed.level_params(), cfg)
    resumed_optimizer.load_state_dict(saved["levels"])
    train(resumed, resumed_optimizer, epochs(0, 20, 2), changes)

    assert changes == {"fast": 64, "mid": 8, "slow": 2}
    for name, params in reference.level_params().items():
        for p_ref, p_res in zip(params, resumed.level_params()[name]):
            torch.testing.assert_close(p_res, p_ref, rtol=1e-6, atol=1e-7)


def test_slow_level_moves_by_lr_times_the_sum_of_its_chunk_gradients() -> None:
    """SGD without momentum, chunk 8, two micro-batches per step: after 8 steps the slow level has
    moved by −lr × the sum of the 16 micro-batch gradients, and not at all before."""
    lr = 0.1
    model = Chain()
    optimizer = LevelOptimizer([
        Level("fast", 1, torch.optim.SGD(list(model.fast.parameters()) + list(model.mid.parameters()), lr=lr)),
        Level("slow", 8, torch.optim.SGD(model.slow.parameters(), lr=lr)),
    ])
    slow = list(model.slow.parameters())
    start = [p.detach().clone() for p in slow]
    total = [torch.zeros_like(p) for p in slow]
    for step in range(1, 9):
        for part in range(2):
            loss = batch_loss(model, step, part)
            for acc, g in zip(total, torch.autograd.grad(loss, slow, retain_graph=True)):
                acc += g
            loss.backward()
        assert optimizer.step_all(step) == (["fast", "slow"] if step == 8 else ["fast"])
        if step < 8:
            assert all(torch.equal(p, s) for p, s in zip(slow, start)), f"slow level moved at step {step}"
    for p, s, g in zip(slow, start, total):
        torch.testing.assert_close(p.detach() - s, -lr * g, rtol=1e-5, atol=1e-7)


def test_micro_batches_accumulate_in_grad_before_step_all() -> None:
    lr = 0.05
    model = Chain()
    params = list(model.parameters())
    optimizer = LevelOptimizer([Level("fast", 1, torch.optim.SGD(params, lr=lr))])
    start = [p.detach().clone() for p in params]
    grads = [torch.autograd.grad(batch_loss(model, 1, part), params) for part in range(3)]
    for part in range(3):
        batch_loss(model, 1, part).backward()
    optimizer.step_all(1)
    for p, s, *gs in zip(params, start, *grads):
        torch.testing.assert_close(p.detach() - s, -lr * sum(gs))


def _two_level_sgd(model: Chain, lr: float, **kwargs) -> LevelOptimizer:
    return LevelOptimizer([
        Level("fast", 1, torch.optim.SGD(list(model.fast.parameters()) + list(model.mid.parameters()), lr=lr)),
        Level("slow", 4, torch.optim.SGD(model.slow.parameters(), lr=lr)),
    ], **kwargs)


def test_fp16_gradients_are_unscaled_exactly_once() -> None:
    """Loss scale 1024, loss scale 1 and no scaling at all give bit-identical training."""
    models = [Chain() for _ in range(3)]
    optimizers = [_two_level_sgd(models[0], 0.1, amp="fp16", init_scale=1024.0),
              _two_level_sgd(models[1], 0.1, amp="fp16", init_scale=1.0),
              _two_level_sgd(models[2], 0.1, amp="none")]
    for step in range(1, 9):
        for model, optimizer in zip(models, optimizers):
            optimizer.scale_loss(batch_loss(model, step)).backward()
            optimizer.step_all(step)
        assert optimizers[0].loss_scale == 1024.0
        for p0, p1, p2 in zip(*(m.parameters() for m in models)):
            assert torch.equal(p0, p2) and torch.equal(p1, p2), f"step {step}"


def test_fp16_inf_gradient_skips_the_step_halves_the_scale_and_keeps_chunk_sums() -> None:
    lr = 0.1
    model = Chain()
    optimizer = _two_level_sgd(model, lr, amp="fp16", init_scale=1024.0)
    slow = list(model.slow.parameters())
    start = [p.detach().clone() for p in slow]
    total = [torch.zeros_like(p) for p in slow]

    def good_step(step: int) -> list[str]:
        loss = batch_loss(model, step)
        for acc, g in zip(total, torch.autograd.grad(loss, slow, retain_graph=True)):
            acc += g
        optimizer.scale_loss(loss).backward()
        return optimizer.step_all(step)

    good_step(1)
    good_step(2)
    params_before = [p.detach().clone() for p in model.parameters()]
    sums_before = {i: t.clone() for i, t in optimizer.state_dict()["levels"]["slow"]["accum"].items()}

    optimizer.scale_loss(batch_loss(model, 3)).backward()
    model.fast.weight.grad[0, 0] = float("inf")
    assert optimizer.step_all(3) == []
    assert optimizer.last_step_skipped
    assert optimizer.loss_scale == 512.0
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), params_before))
    assert all(p.grad is None for p in model.parameters())
    sums_after = optimizer.state_dict()["levels"]["slow"]["accum"]
    assert sums_after.keys() == sums_before.keys()
    assert all(torch.equal(sums_after[i], sums_before[i]) for i in sums_before)

    assert good_step(3) == ["fast"]          # the skipped step is retaken with the same number
    assert not optimizer.last_step_skipped
    assert good_step(4) == ["fast", "slow"]
    for p, s, g in zip(slow, start, total):
        torch.testing.assert_close(p.detach() - s, -lr * g, rtol=1e-5, atol=1e-7)


def test_fp16_loss_scale_grows_after_a_run_of_good_steps() -> None:
    model = Chain()
    optimizer = _two_level_sgd(model, 0.01, amp="fp16", init_scale=8.0, growth_interval=3)
    scales = []
    for step in range(1, 8):
        optimizer.scale_loss(batch_loss(model, step)).backward()
        optimizer.step_all(step)
        scales.append(optimizer.loss_scale)
    assert scales == [8.0, 8.0, 16.0, 16.0, 16.0, 32.0, 32.0]


def test_bf16_and_fp32_use_no_loss_scale() -> None:
    for amp in ("none", "bf16"):
        optimizer = _two_level_sgd(Chain(), 0.1, amp=amp)
        loss = torch.tensor(3.0)
        assert optimizer.scale_loss(loss) is loss and optimizer.loss_scale == 1.0


def test_each_level_clips_its_own_unscaled_gradient_at_every_step() -> None:
    """Clip 1e-3 is active on both levels; each level's factor uses only its own gradient norm,
    after unscaling (scale 1024). The slow level clips every step's gradient and moves by the sum
    of the 4 clipped steps (Eq. 31). Until issue 24 it clipped the 4-step gradient SUM once, so a
    chunk of C large gradients moved one clipped step instead of C: this test checked that.
    The factor is clip / (norm + 1e-6), the epsilon torch's clip_grad_norm_ adds."""
    lr, clip = 0.1, 1e-3
    model = Chain().double()   # clipped updates are ~1e-5: float64 resolves them to 1e-7 relative
    optimizer = _two_level_sgd(model, lr, amp="fp16", init_scale=1024.0, grad_clip=clip)
    fast = list(model.fast.parameters()) + list(model.mid.parameters())
    slow = list(model.slow.parameters())
    slow_start = [p.detach().clone() for p in slow]
    total = [torch.zeros_like(p) for p in slow]
    for step in range(1, 5):
        loss = batch_loss(model, step)
        grads = torch.autograd.grad(loss, fast + slow, retain_graph=True)
        fast_g, slow_g = grads[:len(fast)], grads[len(fast):]
        slow_norm = torch.sqrt(sum(g.pow(2).sum() for g in slow_g))
        assert slow_norm > clip
        for acc, g in zip(total, slow_g):
            acc += g * clip / (slow_norm + 1e-6)
        fast_start = [p.detach().clone() for p in fast]
        optimizer.scale_loss(loss).backward()
        optimizer.step_all(step)
        norm = torch.sqrt(sum(g.pow(2).sum() for g in fast_g))
        assert norm > clip
        for p, s, g in zip(fast, fast_start, fast_g):
            torch.testing.assert_close(p.detach() - s, -lr * g * clip / (norm + 1e-6), rtol=1e-7, atol=1e-12)
        torch.testing.assert_close(optimizer.grad_norms["slow"], slow_norm, rtol=1e-5, atol=0.0)
    for p, s, g in zip(slow, slow_start, total):
        torch.testing.assert_close(p.detach() - s, -lr * g, rtol=1e-7, atol=1e-12)


# ----------------------------------------------------------------------------- config

def test_train_lr_sets_the_fastest_level_and_keeps_the_ratios() -> None:
    cfg = make_config(train={"lr": 0.02})
    cfg.cms_levels.reverse()   # the fastest level is found by chunk size, not by position
    optimizer = LevelOptimizer.from_config(Chain().level_params(), cfg)
    lrs = optimizer.lrs()
    assert lrs.keys() == {"fast", "mid", "slow"}
    assert lrs["fast"] == pytest.approx(0.02)
    assert lrs["mid"] == pytest.approx(0.01)
    assert lrs["slow"] == pytest.approx(0.005)
    assert {type(lvl.optimizer) for lvl in optimizer.levels} == {torch.optim.AdamW}


def test_per_level_settings_without_overrides() -> None:
    cfg = make_config()
    cfg.cms_levels[2].optimizer = "universal_anderson"
    optimizer = LevelOptimizer.from_config(Chain().level_params(), cfg)
    assert optimizer.lrs() == {"fast": 1e-2, "mid": 5e-3, "slow": 2.5e-3}
    assert [type(lvl.optimizer) for lvl in optimizer.levels] == [torch.optim.AdamW, torch.optim.AdamW,
                                                            UniversalAnderson]
    assert [lvl.chunk_size for lvl in optimizer.levels] == [1, 8, 32]


def test_each_level_s_beta2_reaches_its_adam_family_optimizer() -> None:
    cfg = make_config()
    cfg.cms_levels[0].beta2 = 0.999
    cfg.cms_levels[1].optimizer, cfg.cms_levels[1].beta2 = "muon", 0.95
    cfg.cms_levels[2].optimizer = "universal_anderson"  # the default β2
    optimizer = LevelOptimizer.from_config(Chain().level_params(), cfg)
    betas = {lvl.name: {g["betas"] for g in lvl.optimizer.param_groups} for lvl in optimizer.levels}
    assert betas == {"fast": {(0.9, 0.999)}, "mid": {(0.9, 0.95)}, "slow": {(0.9, 0.98)}}


def test_train_optimizer_overrides_every_level_and_empty_levels_are_skipped() -> None:
    cfg = make_config(train={"optimizer": "sgd"})
    model = Chain()
    params = model.level_params()
    params["mid"] = []
    optimizer = LevelOptimizer.from_config(params, cfg)
    assert [lvl.name for lvl in optimizer.levels] == ["fast", "slow"]
    assert all(type(lvl.optimizer) is SGDW for lvl in optimizer.levels)
    assert optimizer.lrs() == {"fast": 1e-2, "slow": 2.5e-3}


def test_unknown_level_name_and_shared_parameters_are_user_errors() -> None:
    cfg = make_config()
    model = Chain()
    with pytest.raises(NlmmError, match="'medium'.*fast, mid, slow"):
        LevelOptimizer.from_config({"medium": list(model.mid.parameters())}, cfg)
    shared = model.level_params()
    shared["slow"] = shared["slow"] + shared["fast"]
    with pytest.raises(NlmmError, match="both level"):
        LevelOptimizer.from_config(shared, cfg)
    with pytest.raises(NlmmError, match="global_step"):
        LevelOptimizer.from_config(model.level_params(), cfg).step_all(0)


def test_lr_factor_scales_every_level_and_survives_a_resume() -> None:
    cfg = make_config()
    model = Chain()
    optimizer = LevelOptimizer.from_config(model.level_params(), cfg)
    optimizer.set_lr_factor(0.25)
    assert optimizer.lrs() == pytest.approx({"fast": 2.5e-3, "mid": 1.25e-3, "slow": 6.25e-4})
    restored = LevelOptimizer.from_config(copy.deepcopy(model).level_params(), cfg)
    restored.load_state_dict(optimizer.state_dict())
    assert restored.lrs() == pytest.approx(optimizer.lrs())
    # A resume under a new train.lr keeps the run's lr factor on the new base lrs.
    relaunched = LevelOptimizer.from_config(copy.deepcopy(model).level_params(), make_config(train={"lr": 0.02}))
    relaunched.load_state_dict(optimizer.state_dict())
    assert relaunched.lrs() == pytest.approx({"fast": 5e-3, "mid": 2.5e-3, "slow": 1.25e-3})
    assert relaunched.state_dict()["lr_factor"] == 0.25


def test_resume_with_other_chunk_sizes_is_refused() -> None:
    model = Chain()
    state = LevelOptimizer.from_config(model.level_params(), make_config()).state_dict()
    other = make_config()
    other.cms_levels[1].chunk_size = 16
    with pytest.raises(NlmmError, match="every 8 steps"):
        LevelOptimizer.from_config(model.level_params(), other).load_state_dict(state)


@pytest.mark.parametrize("rule, factor", [("none", 1.0), ("sqrt", 4.0), ("chunk", 16.0)])
def test_cms_lr_scaling_multiplies_normalised_levels_only(rule, factor):
    from nlmm.model import NLMM

    for optimizer, expected in (("adamw", factor), ("sgd", 1.0)):
        cfg = resolve_config("tiny_nlmm", [f"cms_lr_scaling={rule}", f"train.optimizer={optimizer}"])
        lrs = NLMM(cfg).configure_optimizers(cfg).lrs()
        slow = next(level for level in cfg.cms_levels if level.chunk_size == 16)
        assert lrs[slow.name] == pytest.approx(slow.lr * expected), (rule, optimizer)
        assert lrs["fast"] == pytest.approx(cfg.cms_levels[0].lr)
