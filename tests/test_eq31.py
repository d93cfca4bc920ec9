"""Nested Learning Eq. 31 in the level optimizer: a level with chunk C changes only every C steps,
by the SUM of the C per-step updates of its optimizer, each computed from that step's (clipped)
gradient at the chunk-start weights. Checked against the update rules written out by hand here
(SGD with momentum, AdamW, Muon), independently of LevelOptimizer; plus per-step clipping, the
open chunk at the end of training (flush), exact resumes mid-chunk, and the level statistics."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from nlmm.config import resolve_config
from nlmm.errors import NlmmError
from nlmm.optim import Level, LevelOptimizer, build_optimizer, newton_schulz

C = 4
LR, WD = 0.05, 0.1
BETAS, EPS = (0.9, 0.98), 1e-8   # the factory's AdamW and Muon betas


def make_layer(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(5, 3).double()


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed inputs of global step `step`."""
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 3, generator=g, dtype=torch.float64)


def loss_of(weight: torch.Tensor, bias: torch.Tensor, step: int) -> torch.Tensor:
    x, y = batch(step)
    return ((x @ weight.T + bias - y) ** 2).mean()


def grads_at(theta: list[torch.Tensor], step: int) -> list[torch.Tensor]:
    params = [t.detach().clone().requires_grad_() for t in theta]
    return list(torch.autograd.grad(loss_of(*params, step), params))


def level_optimizer(layer: nn.Linear, name: str, chunk: int = C, grad_clip: float = 0.0) -> LevelOptimizer:
    return LevelOptimizer([Level("slow", chunk, build_optimizer(name, list(layer.parameters()), LR, WD))],
                          grad_clip=grad_clip)


def train(layer: nn.Linear, optimizer: LevelOptimizer, steps) -> list[list[torch.Tensor]]:
    """One step per global step; the weights after each."""
    seen = []
    for step in steps:
        loss_of(layer.weight, layer.bias, step).backward()
        optimizer.step_all(step)
        seen.append([p.detach().clone() for p in layer.parameters()])
    return seen


# ------------------------------------------------------------------ the rules, by hand

def sgd_update(state: dict, i: int, theta: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """SGDW (momentum 0.9, decoupled decay): b ← 0.9 b + g (b = g at first); u = −η λ θ − η b."""
    b = state.get(i)
    state[i] = g.clone() if b is None else 0.9 * b + g
    return -LR * WD * theta - LR * state[i]


def adamw_update(state: dict, i: int, theta: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """AdamW: m ← β1 m + (1 − β1) g, v ← β2 v + (1 − β2) g², u = −η λ θ − η m̂ / (√v̂ + ε)."""
    t, m, v = state.get(i, (0, torch.zeros_like(g), torch.zeros_like(g)))
    t, m, v = t + 1, BETAS[0] * m + (1 - BETAS[0]) * g, BETAS[1] * v + (1 - BETAS[1]) * g * g
    state[i] = (t, m, v)
    m_hat, v_hat = m / (1 - BETAS[0] ** t), v / (1 - BETAS[1] ** t)
    return -LR * WD * theta - LR * m_hat / (v_hat.sqrt() + EPS)


def muon_update(state: dict, i: int, theta: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Muon for the matrix (momentum 0.95, Nesterov, RMS matched to AdamW's 0.2·√max(A, B));
    AdamW for the bias."""
    if theta.ndim < 2:
        return adamw_update(state, i, theta, g)
    b = 0.95 * state.get(i, torch.zeros_like(g)) + 0.05 * g
    state[i] = b
    direction = 0.05 * g + 0.95 * b
    return -LR * WD * theta - LR * 0.2 * math.sqrt(max(theta.shape)) * newton_schulz(direction)


RULES = {"sgd": sgd_update, "adamw": adamw_update, "muon": muon_update}


def eq31_reference(name: str, theta: list[torch.Tensor], steps: int,
                   chunk: int = C) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
    """θ after each of `steps` steps: frozen within a chunk, θ ← θ + Σ u_t at every multiple of
    `chunk`, with u_t the optimizer's update from the gradient at the chunk-start θ; and the sum
    of the open chunk's updates after the last step."""
    rule, state = RULES[name], {}
    theta = [t.detach().clone() for t in theta]
    total = [torch.zeros_like(t) for t in theta]
    seen = []
    for step in range(1, steps + 1):
        grads = grads_at(theta, step)
        for i, (t, g) in enumerate(zip(theta, grads)):
            total[i] += rule(state, i, t, g)
        if step % chunk == 0:
            theta = [t + s for t, s in zip(theta, total)]
            total = [torch.zeros_like(t) for t in theta]
        seen.append([t.clone() for t in theta])
    return seen, total


# ------------------------------------------------------------------ Eq. 31

@pytest.mark.parametrize("name", ["sgd", "adamw", "muon"])
def test_a_level_moves_by_the_sum_of_its_per_step_updates(name: str) -> None:
    layer = make_layer()
    expected, _ = eq31_reference(name, list(layer.parameters()), 2 * C)
    start = [p.detach().clone() for p in layer.parameters()]
    got = train(layer, level_optimizer(layer, name), range(1, 2 * C + 1))
    for step, (g, e) in enumerate(zip(got, expected), start=1):
        if step < C:
            assert all(torch.equal(a, b) for a, b in zip(g, start)), f"moved within the chunk at {step}"
        for a, b in zip(g, e):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=f"{name}, step {step}")
    # the level did move: C steps' worth, not one
    assert any(not torch.equal(a, b) for a, b in zip(got[C - 1], start))


def test_adamw_on_agreeing_gradients_moves_c_times_lr_where_the_summed_gradient_moved_lr() -> None:
    """The same gradient every step (no decay): each AdamW step is −lr·sign(g) per coordinate, so
    Eq. 31 moves a chunk-C level C·lr; the rule before (one step on the summed gradient) lr."""
    moved = {}
    for rule in ("updates", "gradients"):
        p = nn.Parameter(torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64))
        opt = torch.optim.AdamW([p], lr=1e-3, betas=BETAS, weight_decay=0.0)
        levels = LevelOptimizer([Level("slow", 8, opt)], chunk_rule=rule)
        start = p.detach().clone()
        for step in range(1, 9):
            p.grad = torch.tensor([0.5, 0.1, -4.0], dtype=torch.float64)
            levels.step_all(step)
        moved[rule] = (p.detach() - start).abs()
    torch.testing.assert_close(moved["updates"], torch.full((3,), 8e-3, dtype=torch.float64), rtol=1e-6, atol=0)
    torch.testing.assert_close(moved["gradients"], torch.full((3,), 1e-3, dtype=torch.float64), rtol=1e-6, atol=0)


def test_sgd_clips_every_step_so_a_chunk_of_large_gradients_moves_c_clipped_steps() -> None:
    """Clip 1.0, gradients of norm 100 pointing the same way: C clipped steps of lr each. The
    chunk sum used to be clipped once, which moved the level one clipped step."""
    clip, chunk = 1.0, 8
    p = nn.Parameter(torch.zeros(4, dtype=torch.float64))
    levels = LevelOptimizer([Level("slow", chunk, torch.optim.SGD([p], lr=LR))], grad_clip=clip)
    direction = torch.tensor([3.0, 0.0, -4.0, 0.0], dtype=torch.float64) / 5
    for step in range(1, chunk + 1):
        p.grad = 100.0 * direction
        levels.step_all(step)
        torch.testing.assert_close(levels.grad_norms["slow"], torch.tensor(100.0, dtype=torch.float64))
    factor = clip / (100.0 + 1e-6)    # torch's clip_grad_norm_ divides by norm + 1e-6
    torch.testing.assert_close(p.detach(), -chunk * LR * 100.0 * factor * direction, rtol=1e-12, atol=0)
    assert float(p.detach().norm()) == pytest.approx(chunk * LR, rel=1e-6)


def test_a_skipped_step_leaves_the_open_chunk_and_the_optimizer_state_alone() -> None:
    layer = make_layer()
    optimizer = level_optimizer(layer, "adamw")
    expected, _ = eq31_reference("adamw", list(layer.parameters()), C)
    train(layer, optimizer, range(1, 3))
    loss_of(layer.weight, layer.bias, 3).backward()
    layer.weight.grad[0, 0] = float("nan")
    assert optimizer.step_all(3) == [] and optimizer.last_step_skipped
    train(layer, optimizer, range(3, C + 1))
    for a, b in zip(layer.parameters(), expected[-1]):
        torch.testing.assert_close(a.detach(), b, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------ open chunks

@pytest.mark.parametrize("name", ["sgd", "adamw", "muon"])
def test_flush_applies_the_open_chunk_and_restore_puts_the_chunk_start_back(name: str) -> None:
    layer = make_layer()
    steps = C + 2                      # the second chunk is open with 2 steps in it
    seen, open_sum = eq31_reference(name, list(layer.parameters()), steps)
    optimizer = level_optimizer(layer, name)
    train(layer, optimizer, range(1, steps + 1))
    chunk_start = [p.detach().clone() for p in layer.parameters()]
    for a, b in zip(chunk_start, seen[-1]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)

    assert optimizer.flush() == ["slow"]
    assert optimizer.open_chunks_are_applied
    assert optimizer.flush() == []                      # twice is once
    flushed = [p.detach().clone() for p in layer.parameters()]
    for a, t, s in zip(flushed, seen[-1], open_sum):    # θ_C + u_{C+1} + u_{C+2}
        torch.testing.assert_close(a, t + s, rtol=1e-9, atol=1e-12)
    assert any(not torch.equal(a, b) for a, b in zip(flushed, chunk_start))

    with pytest.raises(NlmmError, match="restore_open_chunks"):
        loss_of(layer.weight, layer.bias, steps + 1).backward()
        optimizer.step_all(steps + 1)
    optimizer.zero_grad()
    optimizer.restore_open_chunks()
    assert all(torch.equal(a, b) for a, b in zip(layer.parameters(), chunk_start))
    with optimizer.open_chunks_applied() as names:
        assert names == ["slow"]
        assert all(torch.equal(a, b) for a, b in zip(layer.parameters(), flushed))
    assert all(torch.equal(a, b) for a, b in zip(layer.parameters(), chunk_start))


def _roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer)


@pytest.mark.parametrize("name", ["sgd", "adamw", "muon", "dmgd", "universal_anderson"])
@pytest.mark.parametrize("how", ["plain", "flushed"])
def test_a_resume_mid_chunk_continues_bit_exactly(name: str, how: str) -> None:
    """Interrupted 2 steps into the second chunk, saved (plainly, or while the open chunks are
    applied, as a checkpoint at the end of training is), loaded into a new layer and optimizer:
    every later step equals the uninterrupted run bit for bit, and so does the run that saved."""
    total, cut = 3 * C + 1, C + 2
    straight = make_layer()
    reference = train(straight, level_optimizer(straight, name), range(1, total + 1))

    layer = make_layer()
    optimizer = level_optimizer(layer, name)
    train(layer, optimizer, range(1, cut + 1))
    if how == "flushed":
        with optimizer.open_chunks_applied():
            saved = _roundtrip({"model": layer.state_dict(), "levels": optimizer.state_dict()})
        assert "chunk_start" in saved["levels"]["levels"]["slow"]
        assert any(not torch.equal(saved["model"][k], v) for k, v in layer.state_dict().items())
    else:
        saved = _roundtrip({"model": layer.state_dict(), "levels": optimizer.state_dict()})
        assert "chunk_start" not in saved["levels"]["levels"]["slow"]
    assert set(saved["levels"]["levels"]["slow"]["accum"]) == {0, 1}

    resumed = make_layer(seed=7)
    resumed.load_state_dict(saved["model"])
    resumed_optimizer = level_optimizer(resumed, name)
    resumed_optimizer.load_state_dict(saved["levels"])
    continued = train(resumed, resumed_optimizer, range(cut + 1, total + 1))
    kept_on = train(layer, optimizer, range(cut + 1, total + 1))
    for step, ref, res, kept in zip(range(cut + 1, total + 1), reference[cut:], continued, kept_on):
        assert all(torch.equal(a, b) for a, b in zip(res, ref)), f"{name}: resumed run differs at step {step}"
        assert all(torch.equal(a, b) for a, b in zip(kept, ref)), f"{name}: saving changed the run at {step}"


def test_a_state_whose_open_chunk_sums_another_rule_is_refused() -> None:
    layer = make_layer()
    old = LevelOptimizer([Level("slow", C, build_optimizer("adamw", list(layer.parameters()), LR, WD))],
                         chunk_rule="gradients")
    train(layer, old, range(1, 3))
    with pytest.raises(NlmmError, match="cms_chunk_rule=gradients"):
        level_optimizer(layer, "adamw").load_state_dict(old.state_dict())
    # a state from before the rules were named (version 1) summed gradients too
    state = old.state_dict()
    state["version"] = 1
    del state["rule"]
    with pytest.raises(NlmmError, match="cms_chunk_rule=gradients"):
        level_optimizer(layer, "adamw").load_state_dict(state)
    LevelOptimizer([Level("slow", C, build_optimizer("adamw", list(layer.parameters()), LR, WD))],
                   chunk_rule="gradients").load_state_dict(state)


# ------------------------------------------------------------------ statistics

def test_update_ratios_are_the_relative_size_of_each_levels_last_applied_update() -> None:
    torch.manual_seed(0)
    fast, slow = nn.Linear(5, 5).double(), nn.Linear(5, 3).double()
    optimizer = LevelOptimizer([
        Level("fast", 1, build_optimizer("adamw", list(fast.parameters()), LR, WD)),
        Level("slow", C, build_optimizer("adamw", list(slow.parameters()), LR, WD)),
    ])

    def norm(ts):
        return math.sqrt(sum(float(t.pow(2).sum()) for t in ts))

    for step in range(1, C + 1):
        before = {n: [p.detach().clone() for p in m.parameters()] for n, m in (("fast", fast), ("slow", slow))}
        x, y = batch(step)
        ((slow(torch.tanh(fast(x))) - y) ** 2).mean().backward()
        optimizer.step_all(step)
        ratios = optimizer.update_ratios()
        assert set(ratios) == ({"fast", "slow"} if step == C else {"fast"})
        for name, module in (("fast", fast), ("slow", slow)) if step == C else (("fast", fast),):
            after = [p.detach() for p in module.parameters()]
            expected = norm([a - b for a, b in zip(after, before[name])]) / norm(before[name])
            assert ratios[name] == pytest.approx(expected, rel=1e-5)
    # the slow level's chunk is about C of its steps, each about the fast level's size here
    assert ratios["slow"] > 2 * ratios["fast"]


def test_level_gain_means_and_gains_stepped_with_the_fast_level() -> None:
    from nlmm.model import NLMM
    from nlmm.model.cms import ContinuumMemory, level_gain_means

    small = ["d_model=32", "embed_dim=32", "L_mem=2", "n_heads=2"]
    model = NLMM(resolve_config("tiny_nlmm", small))
    assert level_gain_means(model) == {"fast": 0.0, "mid": 0.0, "slow": 0.0}
    memories = [m for m in model.modules() if isinstance(m, ContinuumMemory)]
    with torch.no_grad():
        memories[0].levels[2].scale.gain.fill_(-0.3)      # one of 3 encoders' slow gains
    assert level_gain_means(model)["slow"] == pytest.approx(0.1)
    assert level_gain_means(NLMM(resolve_config("tiny_nlmm", ["layer_scale_init=null"]))) == {}

    # shipped (cms_gains fast): every CMS level's gain is stepped with the fastest level
    gains = {id(m.levels[i].scale.gain) for m in memories for i in range(3)}
    groups = model.level_params()
    assert gains <= {id(p) for p in groups["fast"]}
    assert not gains & {id(p) for n in ("mid", "slow") for p in groups[n]}
    # cms_gains level: each gain in its own level's group (the placement before issue 24)
    own_model = NLMM(resolve_config("tiny_nlmm", [*small, "cms_gains=level"]))
    own_memories = [m for m in own_model.modules() if isinstance(m, ContinuumMemory)]
    own = own_model.level_params()
    for i, name in enumerate(("fast", "mid", "slow")):
        assert {id(m.levels[i].scale.gain) for m in own_memories} <= {id(p) for p in own[name]}
    assert len(groups["slow"]) == len(own["slow"]) - len(memories)
    assert len(groups["fast"]) == len(own["fast"]) + 2 * len(memories)


def test_the_shipped_config_sums_updates_and_steps_the_gains_with_the_fast_level() -> None:
    cfg = resolve_config("tiny_nlmm")
    assert cfg.cms_chunk_rule == "updates" and cfg.cms_lr_scaling == "none" and cfg.cms_gains == "fast"
    from nlmm.model import NLMM

    assert NLMM(cfg).configure_optimizers(cfg).chunk_rule == "updates"
