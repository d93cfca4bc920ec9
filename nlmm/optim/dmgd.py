"""DMGD: Deep Momentum Gradient Descent (Nested Learning, Behrouz et al. 2025, Eq. 23-24).

Classical momentum with a small learned memory on top: per parameter tensor, a bounded residual
M_phi(u, b) added to alpha*b + u, its parameters phi stepped once per outer step on an internal
L2 objective (the momentum it produced vs the one the next gradient calls for). phi starts at
classical momentum; a box on w2 keeps the recursion a contraction. The update rule, the
objective, the stability bound and the costs: bench/DESIGN.md, "DMGD".
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
