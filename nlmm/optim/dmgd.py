"""DMGD: Deep Momentum Gradient Descent (Nested Learning, Behrouz et al. 2025, Eq. 23–24).

Classical momentum (Eq. 17–18) is a key-less linear memory of past gradients:
    m_{t} = α m_{t−1} − η u_t,   W_t = W_{t−1} + m_t,   u_t = ∇L(W_{t−1}; x_t).
DMGD replaces that linear memory by a small learned memory M_φ applied to the gradient, whose
own parameters φ take one gradient step per outer step on an internal L2 objective L⁽²⁾:
    W_t = W_{t−1} + m_t(u_t),   φ ← φ − η_in ∇_φ L⁽²⁾(φ; u_t).

The memory used here, per parameter tensor (all operations per coordinate j, φ shared by the
coordinates of the tensor; b is the momentum in gradient units, so m = −η b):

    σ_t   = RMS(u_t) + (1 − α)·RMS(b_{t−1}) + ε                       (scale of the inputs)
    x_t   = (u_t / σ_t,  (1 − α) b_{t−1} / σ_t)                       (features, RMS ≤ 1)
    M_φ(u_t, b_{t−1}) = α b_{t−1} + u_t + (σ_t / (1 − α)) · w₂ᵀ tanh(W₁ x_t)
    b_t   = M_φ(u_t, b_{t−1})
    W_t   = W_{t−1}·(1 − η λ) − η · σ_out(b_t)                        (λ: decoupled weight decay)

φ = (W₁ ∈ R^{H×2}, w₂ ∈ R^H). The linear part α b + u is the classical momentum and is fixed;
the learned part is a residual with no bias, so M_φ is odd in (u, b): flipping the sign of every
gradient flips the update. w₂ starts at 0, so the initial memory IS classical momentum, and with
η_in = 0 it stays so (b_t equals torch.optim.SGD's momentum buffer, the update −η b_t).
W₁ starts deterministic: row k = (cos θ_k, sin θ_k), θ_k = π(k + ½)/H, directions spread over a
half-circle (the other half is their negation, redundant for an odd memory).

Internal objective (the value the memory must produce for its key): the momentum b_{t−1} it
produced at the previous step is scored against the momentum that the gradient which followed
would call for, u_t / (1 − α) (the steady-state momentum of a constant gradient u_t):

    L⁽²⁾_t(φ) = ½ · mean_j [ ((1 − α) · M_φ(u_{t−1}, b_{t−2})_j − u_{t,j}) / σ_t ]²

evaluated at t ≥ 2 before b_t is produced (M_φ(u_{t−1}, b_{t−2}) = b_{t−1} with the current φ).
Where successive gradients agree, the classical momentum already meets the target and the
residual stays near 0; where they alternate (oscillation across a steep direction) or are
noise, the memory learns to damp the momentum along them. Dividing by σ_t keeps the error's RMS
≤ 1 whatever the gradient scale, so η_in needs no tuning per layer.

Stability: after each inner step w₂ is clipped to the box |w₂ₖ| ≤ ρ(1 − α)/H (ρ = memory_bound,
default 0.5). Since |tanh| ≤ 1 the residual is then at most ρ(RMS(u_t) + (1 − α)RMS(b_{t−1})) at
every coordinate, so RMS(b_t) ≤ (α + ρ(1 − α)) RMS(b_{t−1}) + (1 + ρ) RMS(u_t): the momentum
recursion stays a contraction for ρ < 1. Without the box the momentum diverged to NaN within a
few hundred steps on a small MLP regression (lr 0.03, η_in 0.01). Within it the memory can move
the momentum's persistence by up to ρ(1 − α) and its gain on the fresh gradient by up to ρ.

σ_out (Eq. 24) is the identity by default; `orthogonalize=True` applies Newton–Schulz to the
momentum of ≥2-D tensors (with a linear memory this is Muon) scaled like Muon's AdamW-matched
update.

Memory: three buffers of the parameter's size (b_{t−1}, u_{t−1}, b_{t−2}) plus 3H + 1 scalars
(φ and σ_{t−1}), and an (n × H) temporary while a tensor of n coordinates is updated. Compute:
two (n × H) tanh passes per tensor and step, about 20× an AdamW step on CPU (tanh-bound); on
GPU these are elementwise passes, a few times AdamW's memory traffic.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.nn import Parameter

from nlmm.optim.muon import newton_schulz, update_scale

_EPS = 1e-12


def initial_input_weights(hidden: int) -> Tensor:
    """W₁ at initialisation: unit rows at angles π(k + ½)/H."""
    theta = math.pi * (torch.arange(hidden, dtype=torch.float64) + 0.5) / hidden
    return torch.stack([theta.cos(), theta.sin()], dim=1)


def _compute_dtype(t: Tensor) -> torch.dtype:
    """At least fp32: the memory's statistics are means over whole tensors."""
    return torch.promote_types(t.dtype, torch.float32)


def _rms(t: Tensor) -> Tensor:
    return torch.linalg.vector_norm(t, dtype=_compute_dtype(t)) / math.sqrt(t.numel())


def _scale(u: Tensor, b: Tensor, alpha: float) -> Tensor:
    return _rms(u) + (1.0 - alpha) * _rms(b) + _EPS


def _hidden(u: Tensor, b: Tensor, sigma: Tensor, w_in: Tensor, alpha: float) -> Tensor:
    """tanh(W₁ x) for every coordinate, (n, H), with x = (u, (1 − α) b)/σ folded into W₁'s columns."""
    dtype = w_in.dtype
    z = torch.outer(u.reshape(-1).to(dtype), w_in[:, 0] / sigma)
    z.addr_(b.reshape(-1).to(dtype), w_in[:, 1] * ((1.0 - alpha) / sigma))
    return z.tanh_()


class DMGD(torch.optim.Optimizer):
    """Deep Momentum Gradient Descent with a per-tensor learned momentum memory (module docstring).

    Args: lr (η), momentum (α), weight_decay (decoupled λ), hidden (H units of the memory),
    inner_lr (η_in; 0 freezes the memory at classical momentum), memory_bound (ρ of the
    stability box on w₂), orthogonalize (σ_out = NS5).
    """

    def __init__(self, params: Iterable[Parameter] | Iterable[dict[str, Any]], lr: float = 1e-3,
                 momentum: float = 0.9, weight_decay: float = 0.0, hidden: int = 4,
                 inner_lr: float = 1e-2, memory_bound: float = 0.5,
                 orthogonalize: bool = False) -> None:
        if (lr < 0 or weight_decay < 0 or inner_lr < 0 or not 0.0 <= momentum < 1.0 or hidden < 1
                or not 0.0 <= memory_bound < 1.0):
            raise ValueError(f"DMGD: invalid lr={lr}, momentum={momentum}, weight_decay="
                             f"{weight_decay}, hidden={hidden}, inner_lr={inner_lr} or "
                             f"memory_bound={memory_bound}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, hidden=hidden,
                        inner_lr=inner_lr, memory_bound=memory_bound, orthogonalize=orthogonalize)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            alpha, lr = group["momentum"], group["lr"]
            for p in params:
                self._init_state(p, group)
            buffers = [self.state[p]["momentum_buffer"] for p in params]
            grads = [p.grad for p in params]
            if group["inner_lr"] > 0 or "w_out" in self.state[params[0]]:
                for p, u, b in zip(params, grads, buffers):
                    self._memory_step(p, u, b, group)
            else:
                # Frozen at init (w₂ = 0): b ← α b + u, one fused kernel per op over all tensors.
                torch._foreach_mul_(buffers, alpha)
                torch._foreach_add_(buffers, grads)
            if group["weight_decay"] > 0:
                torch._foreach_mul_(params, 1.0 - lr * group["weight_decay"])
            if group["orthogonalize"]:
                for p, b in zip(params, buffers):
                    if p.ndim >= 2:
                        p.add_(newton_schulz(b), alpha=-lr * update_scale(p.shape, "match_rms_adamw"))
                    else:
                        p.add_(b, alpha=-lr)
            else:
                torch._foreach_add_(params, buffers, alpha=-lr)
        return loss

    def _init_state(self, p: Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        if group["inner_lr"] > 0 and "w_out" not in state:
            state["step"] = 0
            state["prev_grad"] = torch.zeros_like(p)
            state["prev_momentum"] = torch.zeros_like(p)
            dtype = _compute_dtype(p)
            state["w_in"] = initial_input_weights(group["hidden"]).to(device=p.device, dtype=dtype)
            state["w_out"] = torch.zeros(group["hidden"], device=p.device, dtype=dtype)
            state["prev_sigma"] = torch.ones((), device=p.device, dtype=dtype)

    def _memory_step(self, p: Tensor, u: Tensor, b: Tensor, group: dict[str, Any]) -> None:
        """Inner L2 step on φ (from t = 2), then b ← M_φ(u, b); b is updated in place."""
        state = self.state[p]
        alpha = group["momentum"]
        w_in, w_out = state["w_in"], state["w_out"]
        sigma = _scale(u, b, alpha)
        if state["step"] >= 1 and group["inner_lr"] > 0:
            u_prev, b_prev2, sigma_prev = state["prev_grad"], state["prev_momentum"], state["prev_sigma"]
            h_prev = _hidden(u_prev, b_prev2, sigma_prev, w_in, alpha)
            err = ((1.0 - alpha) * b - u).reshape(-1).to(w_in.dtype)
            # ∂L/∂(w₂ᵀh_j) = e_j σ_{t−1}/σ_t / n with e_j = err_j/σ_t: the residual enters M as
            # σ_{t−1}/(1−α) · w₂ᵀh and the error is scaled by (1−α)/σ_t.
            coef = err.mul_(sigma_prev / (sigma * sigma * err.numel()))
            grad_out = h_prev.mT @ coef
            q = h_prev.mul_(h_prev).neg_().add_(1.0).mul_(coef[:, None])     # (1 − h²) ∂L/∂(w₂ᵀh)
            grad_in = torch.stack([q.mT @ u_prev.reshape(-1).to(q.dtype),
                                   q.mT @ b_prev2.reshape(-1).to(q.dtype) * (1.0 - alpha)], dim=1)
            grad_in.mul_(w_out[:, None] / sigma_prev)
            w_out.sub_(grad_out, alpha=group["inner_lr"])
            w_in.sub_(grad_in, alpha=group["inner_lr"])
            bound = group["memory_bound"] * (1.0 - alpha) / w_out.numel()
            w_out.clamp_(-bound, bound)
        state["prev_momentum"].copy_(b)
        state["prev_grad"].copy_(u)
        state["prev_sigma"] = sigma
        residual = _hidden(u, b, sigma, w_in, alpha) @ w_out
        residual.mul_(sigma / (1.0 - alpha))
        b.mul_(alpha).add_(u).add_(residual.reshape(b.shape).to(b.dtype))
        state["step"] += 1
