"""The optimizers of nlmm.optim against reference math written out plainly here."""

from __future__ import annotations

import math

import pytest
import torch

from nlmm.config import OPTIMIZERS
from nlmm.errors import NlmmError
from nlmm.optim import (DMGD, SGDW, Muon, UniversalAnderson, build_optimizer, exclude_from_muon,
                        newton_schulz)

A, B, C = 3.4445, -4.7750, 2.0315


def _param(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Parameter:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter(torch.randn(shape, generator=g, dtype=dtype))


def _grads(shape: tuple[int, ...], n: int, seed: int = 1, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=dtype) for _ in range(n)]


# ----------------------------------------------------------------------------- factory

def test_unknown_optimizer_name_names_the_allowed_ones() -> None:
    with pytest.raises(NlmmError) as err:
        build_optimizer("adam", [_param(3)], 1e-3, 0.0)
    for name in OPTIMIZERS:
        assert name in str(err.value)
    assert "'adam'" in str(err.value)


def test_empty_parameter_list_is_a_user_error() -> None:
    with pytest.raises(NlmmError, match="no parameters"):
        build_optimizer("adamw", [], 1e-3, 0.0)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_configured_name_builds_steps_and_resumes_exactly(name: str, tmp_path) -> None:
    """3 steps, save to a file, load into a fresh optimizer on copied params, 3 more steps: the
    result equals 6 uninterrupted steps (the optimizer's whole state survives torch.save)."""
    expected = {"adamw": torch.optim.AdamW, "sgd": SGDW, "dmgd": DMGD, "muon": Muon,
                "universal_anderson": UniversalAnderson}[name]
    w, b, t = _param(5, 4, seed=2), _param(4, seed=3), _param(seed=6)   # t: a 0-d temperature
    grads = _grads((5, 4), 6, seed=4), _grads((4,), 6, seed=5), _grads((), 6, seed=7)

    def run(params, opt, steps):
        for t in steps:
            for p, gs in zip(params, grads):
                p.grad = gs[t].clone()
            opt.step()

    ref_params = [p.detach().clone().requires_grad_() for p in (w, b, t)]
    ref = build_optimizer(name, ref_params, 1e-2, 0.1)
    assert type(ref) is expected
    run(ref_params, ref, range(6))
    assert all(not torch.equal(r, p) for r, p in zip(ref_params, (w, b, t)))

    first = build_optimizer(name, [w, b, t], 1e-2, 0.1)
    run([w, b, t], first, range(3))
    torch.save({"opt": first.state_dict(), "params": [p.detach() for p in (w, b, t)]}, tmp_path / "opt.pt")
    saved = torch.load(tmp_path / "opt.pt")
    resumed = [torch.nn.Parameter(p.clone()) for p in saved["params"]]
    second = build_optimizer(name, resumed, 1e-2, 0.1)
    second.load_state_dict(saved["opt"])
    run(resumed, second, range(3, 6))
    for r, p in zip(ref_params, resumed):
        torch.testing.assert_close(p, r, rtol=0, atol=0)


def test_sgd_has_momentum_09_and_decoupled_weight_decay() -> None:
    p = _param(6)
    w0 = p.detach().clone()
    opt = build_optimizer("sgd", [p], 0.1, 0.5)
    buf = torch.zeros(6)
    w = w0.clone()
    for u in _grads((6,), 3):
        p.grad = u.clone()
        opt.step()
        buf = 0.9 * buf + u
        w = w * (1 - 0.1 * 0.5) - 0.1 * buf
    torch.testing.assert_close(p.detach(), w)


# ----------------------------------------------------------------------------- DMGD

def _dmgd_reference(w0: torch.Tensor, grads: list[torch.Tensor], lr: float, alpha: float,
                    inner_lr: float, hidden: int, bound: float, wd: float = 0.0):
    """DMGD from the equations of nlmm/optim/dmgd.py; the inner gradient comes from autograd."""
    def rms(z):
        return z.pow(2).mean().sqrt()

    theta = math.pi * (torch.arange(hidden, dtype=torch.float64) + 0.5) / hidden
    w_in = torch.stack([theta.cos(), theta.sin()], 1).to(w0.dtype)   # W₁ rows at angles π(k+½)/H
    w_out = torch.zeros(hidden, dtype=w0.dtype)                         # w₂ = 0: classical momentum
    w, b = w0.clone(), torch.zeros_like(w0)
    prev = None
    trajectory = []
    for u in grads:
        sigma = rms(u) + (1 - alpha) * rms(b) + 1e-12
        if prev is not None:
            u_prev, b_prev2, sigma_prev = prev
            w_in_ = w_in.clone().requires_grad_()
            w_out_ = w_out.clone().requires_grad_()
            x_prev = torch.stack([u_prev.flatten(), (1 - alpha) * b_prev2.flatten()], 1) / sigma_prev
            memory = (alpha * b_prev2.flatten() + u_prev.flatten()
                      + sigma_prev / (1 - alpha) * (torch.tanh(x_prev @ w_in_.T) @ w_out_))
            assert torch.allclose(memory.detach(), b.flatten(), atol=1e-6)  # M_φ(u_{t−1}, b_{t−2}) = b_{t−1}
            loss = 0.5 * (((1 - alpha) * memory - u.flatten()) / sigma).pow(2).mean()
            g_in, g_out = torch.autograd.grad(loss, [w_in_, w_out_])
            w_in = w_in - inner_lr * g_in
            w_out = (w_out - inner_lr * g_out).clamp(-bound, bound)
        prev = (u, b, sigma)
        x = torch.stack([u.flatten(), (1 - alpha) * b.flatten()], 1) / sigma
        b = alpha * b + u + (sigma / (1 - alpha) * (torch.tanh(x @ w_in.T) @ w_out)).reshape(u.shape)
        w = w * (1 - lr * wd) - lr * b
        trajectory.append((w.clone(), w_in.clone(), w_out.clone()))
    return trajectory


def test_dmgd_with_frozen_memory_is_torch_sgd_momentum() -> None:
    p = _param(4, 3)
    q = torch.nn.Parameter(p.detach().clone())
    dmgd = DMGD([p], lr=0.05, momentum=0.9, inner_lr=0.0)
    sgd = torch.optim.SGD([q], lr=0.05, momentum=0.9)
    for u in _grads((4, 3), 6):
        p.grad, q.grad = u.clone(), u.clone()
        dmgd.step()
        sgd.step()
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_dmgd_first_steps_match_the_documented_equations() -> None:
    lr, alpha, inner_lr, hidden, mem_bound, wd = 0.1, 0.9, 0.5, 4, 0.5, 0.01
    p = _param(5, 3, dtype=torch.float64)
    w0 = p.detach().clone()
    grads = _grads((5, 3), 4, dtype=torch.float64)
    opt = DMGD([p], lr=lr, momentum=alpha, weight_decay=wd, hidden=hidden, inner_lr=inner_lr,
               memory_bound=mem_bound)
    reference = _dmgd_reference(w0, grads, lr, alpha, inner_lr, hidden,
                                mem_bound * (1 - alpha) / hidden, wd)
    for t, (u, (w_ref, w_in_ref, w_out_ref)) in enumerate(zip(grads, reference)):
        p.grad = u.clone()
        opt.step()
        state = opt.state[p]
        torch.testing.assert_close(p.detach(), w_ref, rtol=1e-10, atol=1e-12, msg=lambda m: f"step {t + 1}: {m}")
        torch.testing.assert_close(state["w_in"].double(), w_in_ref, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(state["w_out"].double(), w_out_ref, rtol=1e-6, atol=1e-7)
        if t == 0:  # first step: no inner step yet, b₁ = u₁
            torch.testing.assert_close(p.detach(), w0 * (1 - lr * wd) - lr * u)
    assert state["w_out"].abs().sum() > 0, "the memory never learned"


def test_dmgd_memory_damps_oscillating_gradients_and_stays_in_its_box() -> None:
    """Gradients that flip sign every step: classical momentum keeps a large buffer that fights
    them; the learned memory must learn to damp it. The box on w₂ must hold throughout."""
    signs = torch.tensor([1.0, -1.0, 1.0, -1.0])
    grads = [((-1.0) ** t) * signs * (1.0 + 0.1 * (t % 3)) for t in range(300)]
    alpha, mem_bound, hidden = 0.9, 0.5, 4
    p, q = _param(4), _param(4)
    learned = DMGD([p], lr=1e-3, momentum=alpha, inner_lr=0.5, memory_bound=mem_bound, hidden=hidden)
    frozen = DMGD([q], lr=1e-3, momentum=alpha, inner_lr=0.0)
    bound = mem_bound * (1 - alpha) / hidden
    for u in grads:
        p.grad, q.grad = u.clone(), u.clone()
        learned.step()
        frozen.step()
        assert learned.state[p]["w_out"].abs().max() <= bound * (1 + 1e-6)
    b_learned = learned.state[p]["momentum_buffer"].norm()
    b_frozen = frozen.state[q]["momentum_buffer"].norm()
    assert b_learned < 0.9 * b_frozen, f"learned |b|={b_learned:.4f}, classical |b|={b_frozen:.4f}"


def test_dmgd_output_orthogonalisation_is_newton_schulz_of_the_momentum() -> None:
    p = _param(6, 4)
    w0 = p.detach().clone()
    (u,) = _grads((6, 4), 1)
    opt = DMGD([p], lr=0.1, momentum=0.9, inner_lr=0.0, orthogonalize=True)
    p.grad = u.clone()
    opt.step()
    torch.testing.assert_close(p.detach(), w0 - 0.1 * 0.2 * math.sqrt(6) * _ns5_reference(u))


# ----------------------------------------------------------------------------- Muon

def _ns5_reference(g: torch.Tensor) -> torch.Tensor:
    """Five quintic Newton–Schulz iterations, X ← aX + (bA + cA²)X with A = XXᵀ, on the wide side."""
    x = g.reshape(g.shape[0], -1).double()
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / torch.linalg.matrix_norm(x, ord="fro")
    for _ in range(5):
        a = x @ x.T
        x = A * x + (B * a + C * torch.linalg.matrix_power(a, 2)) @ x
    return (x.T if tall else x).reshape(g.shape).float()


@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (48, 48)])
def test_newton_schulz_singular_values_lie_in_the_quintic_band(shape) -> None:
    g = _grads(shape, 1, seed=7)[0]
    out = newton_schulz(g)
    sv = torch.linalg.svdvals(out)
    assert sv.min() > 0.6 and sv.max() < 1.3, f"singular values in [{sv.min():.3f}, {sv.max():.3f}]"
    assert torch.linalg.svdvals(g).max() / torch.linalg.svdvals(g).min() > 3  # far from orthogonal
    torch.testing.assert_close(out, _ns5_reference(g), rtol=1e-4, atol=1e-4)


def test_muon_two_steps_match_reference_for_matrices_conv_kernels_and_the_adamw_path() -> None:
    lr, wd, mu = 0.02, 0.1, 0.95
    weight, conv, bias, embed = _param(6, 4, seed=1), _param(3, 2, 2, 2, seed=2), _param(4, seed=3), _param(5, 4, seed=4)
    exclude_from_muon(embed)
    params = [weight, conv, bias, embed]
    init = [p.detach().clone() for p in params]
    grads = [_grads(tuple(p.shape), 2, seed=10 + i) for i, p in enumerate(params)]
    opt = Muon(params, lr=lr, weight_decay=wd, momentum=mu)

    adam_ref = [torch.nn.Parameter(init[2].clone()), torch.nn.Parameter(init[3].clone())]
    adam = torch.optim.AdamW(adam_ref, lr=lr, weight_decay=wd)
    matrices = [init[0].clone(), init[1].clone()]
    bufs = [torch.zeros_like(init[0]), torch.zeros_like(init[1])]
    for t in range(2):
        for p, gs in zip(params, grads):
            p.grad = gs[t].clone()
        opt.step()
        for i in range(2):
            g = grads[i][t]
            bufs[i] = mu * bufs[i] + (1 - mu) * g               # momentum
            nesterov = (1 - mu) * g + mu * bufs[i]              # look-ahead
            rows, cols = g.shape[0], g[0].numel()
            scale = 0.2 * math.sqrt(max(rows, cols))            # AdamW-matched RMS
            matrices[i] = matrices[i] * (1 - lr * wd) - lr * scale * _ns5_reference(nesterov)
        for p, gs in zip(adam_ref, grads[2:]):
            p.grad = gs[t].clone()
        adam.step()
        torch.testing.assert_close(weight.detach(), matrices[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(conv.detach(), matrices[1], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(bias.detach(), adam_ref[0].detach())
        torch.testing.assert_close(embed.detach(), adam_ref[1].detach())


def test_muon_original_scale_is_sqrt_of_max_1_rows_over_cols() -> None:
    tall, wide = _param(8, 2, seed=1), _param(2, 8, seed=2)
    before = [tall.detach().clone(), wide.detach().clone()]
    (gt,), (gw,) = _grads((8, 2), 1, seed=3), _grads((2, 8), 1, seed=4)
    opt = Muon([tall, wide], lr=0.1, weight_decay=0.0, momentum=0.9, nesterov=False, adjust_lr="original")
    tall.grad, wide.grad = gt, gw
    opt.step()
    torch.testing.assert_close(tall.detach(), before[0] - 0.1 * 2.0 * _ns5_reference(gt), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(wide.detach(), before[1] - 0.1 * 1.0 * _ns5_reference(gw), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- Anderson

D = torch.tensor([1.0, 10.0, 100.0], dtype=torch.float64)


def _adam_moments(grads: list[torch.Tensor], beta1: float = 0.9, beta2: float = 0.999):
    m = v = torch.zeros(3, dtype=torch.float64)
    for g in grads:
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
    k = len(grads)
    return m / (1 - beta1 ** k), v / (1 - beta2 ** k)


def test_anderson_matches_hand_computed_mixing_with_history_one_and_two() -> None:
    lr, reg, eps = 0.05, 1e-3, 1e-8
    x0 = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)
    p = torch.nn.Parameter(x0.clone())
    opt = UniversalAnderson([p], lr=lr, reg=reg, eps=eps, history=5, max_coef_norm=math.inf,
                            max_step_ratio=math.inf, max_residual_growth=math.inf)
    xs, gs, fs = [x0.clone()], [], []
    for k in range(1, 4):
        g = D * xs[-1]                                  # gradient of ½ Σ d x²
        p.grad = g.clone()
        opt.step()
        gs.append(g)
        m_hat, v_hat = _adam_moments(gs)
        denom = v_hat.sqrt() + eps
        adam_step = -lr * m_hat / denom
        f = -lr * g / denom                             # residual of x ↦ x − lr g/D
        fs.append(f)
        if k == 1:                                       # no history: the Adam step
            step = adam_step
        elif k == 2:                                     # one secant pair: scalar least squares
            dx, df = xs[1] - xs[0], fs[1] - fs[0]
            gamma = (df @ f) / ((df @ df) * (1 + reg))
            step = f - gamma * (dx + df)
        else:                                            # two pairs: Tikhonov least squares via lstsq
            dX = torch.stack([xs[1] - xs[0], xs[2] - xs[1]], 1)
            dF = torch.stack([fs[1] - fs[0], fs[2] - fs[1]], 1)
            mu = reg * torch.trace(dF.T @ dF) / 2
            aug = torch.cat([dF, mu.sqrt() * torch.eye(2, dtype=torch.float64)])
            rhs = torch.cat([f, torch.zeros(2, dtype=torch.float64)])
            gamma = torch.linalg.lstsq(aug, rhs[:, None]).solution[:, 0]
            step = f - (dX + dF) @ gamma
        xs.append(xs[-1] + step)
        torch.testing.assert_close(p.detach(), xs[-1], rtol=1e-9, atol=1e-12)
    assert (opt.accepted, opt.rejected) == (2, 0)


def test_anderson_first_step_and_every_rejected_step_are_torch_adamw() -> None:
    """max_coef_norm = 0 rejects every accelerated point: the trajectory is AdamW's exactly."""
    p = _param(10, seed=3)
    q = torch.nn.Parameter(p.detach().clone())
    aa = UniversalAnderson([p], lr=0.01, weight_decay=0.1, max_coef_norm=0.0)
    adamw = torch.optim.AdamW([q], lr=0.01, weight_decay=0.1)
    d = torch.logspace(0, 2, 10)
    for _ in range(8):
        p.grad, q.grad = d * p.detach(), d * q.detach()
        aa.step()
        adamw.step()
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert (aa.accepted, aa.rejected) == (0, 7)


@pytest.mark.parametrize("guard", ["max_step_ratio", "max_residual_growth"])
def test_anderson_safeguards_fall_back_to_the_adam_step_and_restart(guard: str) -> None:
    """A zero step ratio rejects every candidate; a zero growth allowance rejects the step after
    each accelerated one (its residual is > 0), which restarts the history, so acceptances and
    rejections alternate. Each rejected step must be exactly Adam's step from the current state."""
    lr = 0.05
    p = torch.nn.Parameter(torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64))
    guards = {"max_coef_norm": math.inf, "max_step_ratio": math.inf, "max_residual_growth": math.inf}
    opt = UniversalAnderson([p], lr=lr, **{**guards, guard: 0.0})
    outcomes, xs, fs = [], [], []
    for _ in range(7):
        before, counts = p.detach().clone(), (opt.accepted, opt.rejected)
        g = D * before
        p.grad = g.clone()
        opt.step()
        st = opt.state[p]
        k = st["step"]
        denom = (st["exp_avg_sq"] / (1 - 0.999 ** k)).sqrt() + 1e-8
        adam_step = -lr * (st["exp_avg"] / (1 - 0.9 ** k)) / denom
        xs.append(before)
        fs.append(-lr * g / denom)
        if opt.rejected > counts[1]:
            outcomes.append("rejected")
            torch.testing.assert_close(p.detach() - before, adam_step, rtol=1e-12, atol=1e-15)
        elif opt.accepted > counts[0]:
            outcomes.append("accepted")
            # Every acceptance here follows a start or a restart: the history holds one pair.
            dx, df, f = xs[-1] - xs[-2], fs[-1] - fs[-2], fs[-1]
            gamma = (df @ f) / ((df @ df) * (1 + opt.defaults["reg"]))
            torch.testing.assert_close(p.detach() - before, f - gamma * (dx + df), rtol=1e-9, atol=1e-12)
        else:
            outcomes.append("plain")
    if guard == "max_step_ratio":
        assert outcomes == ["plain"] + ["rejected"] * 6
    else:
        assert outcomes == ["plain", "accepted", "rejected", "accepted", "rejected", "accepted", "rejected"]


def test_anderson_beats_adam_on_an_ill_conditioned_quadratic() -> None:
    """½ Σ d_i x_i², d log-spaced over [1, 1e3] (condition number 1e3), dim 50, same lr."""
    d = torch.logspace(0, 3, 50)
    x0 = _grads((50,), 1, seed=11)[0]
    f0 = 0.5 * (d * x0 * x0).sum()

    def steps_to_tolerance(make, budget=2000, tol=1e-6):
        x = torch.nn.Parameter(x0.clone())
        opt = make([x])
        for k in range(budget):
            if 0.5 * (d * x.detach() ** 2).sum() < tol * f0:
                return k
            x.grad = d * x.detach()
            opt.step()
        return budget

    lr = 0.03
    adam = steps_to_tolerance(lambda ps: torch.optim.Adam(ps, lr=lr))
    anderson = steps_to_tolerance(lambda ps: UniversalAnderson(ps, lr=lr))
    assert anderson < adam, f"Anderson took {anderson} steps, Adam {adam} (lr {lr}, tol 1e-6)"
    assert anderson < 0.5 * adam, f"Anderson took {anderson} steps, Adam {adam}: less than a 2x gain"
