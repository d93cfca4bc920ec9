"""UniversalAnderson: Adam with a safeguarded Anderson-accelerated (type-II) correction.

Per parameter group, at step k with gradient g_k and Adam's bias-corrected moments m̂_k, v̂_k:

    D_k       = sqrt(v̂_k) + ε                                   (Adam's diagonal preconditioner)
    s_k^adam  = −lr (m̂_k / D_k + λ_wd x_k)                      (the AdamW step: the fallback)
    f_k       = −lr (g_k / D_k + λ_wd x_k)                      (fixed-point residual)

f is the residual of the fixed-point map G(x) = x − lr (∇L(x)/D + λ_wd x), the Adam-preconditioned
gradient step without momentum; its fixed points are the stationary points of the
(decoupled-)regularised loss. The residual leaves out Adam's first moment on purpose: with the
moment inside, Δ_adam(x) depends on the whole trajectory rather than on x, so the secant pairs
below do not describe any map of x and the acceleration loses to plain Adam (measured on the
ill-conditioned quadratic of the tests); with this residual the pairs are secants of G.

History (m most recent pairs, restarted on rejection): ΔX_j = x_{j+1} − x_j (the applied steps)
and ΔF_j = f_{j+1} − f_j. Anderson type-II with mixing β = 1 and Tikhonov regularisation:

    γ  = argmin_γ ‖f_k − ΔF γ‖² + μ ‖γ‖²,   μ = reg · trace(ΔFᵀΔF) / cols (scale-free)
    s_k^aa = f_k − (ΔX + ΔF) γ                 (x_{k+1} = G(x_k) − ΔG γ, ΔG = ΔX + ΔF)

The small normal equations are solved in float64 on the CPU. Safeguards: the accelerated step is
rejected — the plain Adam step is taken and the history restarted — when ‖γ‖ > max_coef_norm,
when ‖s^aa‖ > max_step_ratio · ‖s^adam‖, when anything is non-finite, or when the previous step
was accelerated and the residual grew, ‖f_k‖ > max_residual_growth · ‖f_{k−1}‖. All norms are
over the whole group (its tensors concatenated), so the mixing is one γ per group.

Memory per parameter: Adam's 2 buffers + f_{k−1} + the ΔX and ΔF histories (2m): 2m + 3 copies
of the parameters (13 for m = 5), plus about 4 temporary copies during a step. Two host syncs per
step (the Gram matrix, then the candidate's norm).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.nn import Parameter


class UniversalAnderson(torch.optim.Optimizer):
    """Adam + safeguarded Anderson acceleration (module docstring). Counters: `accepted`, `rejected`."""

    def __init__(self, params: Iterable[Parameter] | Iterable[dict[str, Any]], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, history: int = 5, reg: float = 1e-6,
                 max_coef_norm: float = 1e3, max_step_ratio: float = 100.0,
                 max_residual_growth: float = 2.0) -> None:
        if lr < 0 or weight_decay < 0 or history < 1 or reg < 0:
            raise ValueError(f"UniversalAnderson: invalid lr={lr}, weight_decay={weight_decay}, "
                             f"history={history} or reg={reg}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, history=history,
                        reg=reg, max_coef_norm=max_coef_norm, max_step_ratio=max_step_ratio,
                        max_residual_growth=max_residual_growth)
        super().__init__(params, defaults)
        self.accepted = 0
        self.rejected = 0

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            with_grad = [i for i, p in enumerate(group["params"]) if p.grad is not None]
            if with_grad:
                self._group_step(group, with_grad)
        return loss

    def _group_step(self, group: dict[str, Any], with_grad: list[int]) -> None:
        params = [group["params"][i] for i in with_grad]
        grads = [p.grad for p in params]
        m = group["history"]
        for p in params:
            self._init_state(p, m)
        states = [self.state[p] for p in params]
        # Group-level bookkeeping lives in the first parameter's state so that it is saved with
        # the optimizer's state_dict.
        gstate = self.state[group["params"][0]]
        if gstate.get("aa_signature") != with_grad:
            gstate.update(aa_signature=with_grad, aa_count=0, aa_slot=0, aa_has_prev=False,
                          aa_accelerated=False, aa_prev_res_norm=0.0)

        adam_step, residual = self._adam_directions(params, grads, states, group)
        count, slot = gstate["aa_count"], gstate["aa_slot"]
        if gstate["aa_has_prev"]:
            for st, f in zip(states, residual):
                torch.sub(f, st["prev_residual"], out=st["df_hist"][slot])
            count, slot = min(count + 1, m), (slot + 1) % m

        res_norms = torch.stack(torch._foreach_norm(residual))
        adam_norms = torch.stack(torch._foreach_norm(adam_step))
        summary = [res_norms.pow(2).sum(), adam_norms.pow(2).sum()]
        if count:
            gram = sum(st["df_hist"][:count].reshape(count, -1) @ st["df_hist"][:count].reshape(count, -1).mT
                       for st in states)
            rhs = sum(st["df_hist"][:count].reshape(count, -1) @ f.reshape(-1) for st, f in zip(states, residual))
            summary += [gram.reshape(-1), rhs]
        host = torch.cat([t.reshape(-1).double() for t in summary]).cpu()
        res_norm, adam_norm = math.sqrt(host[0]), math.sqrt(host[1])

        step = adam_step
        accepted = False
        grew = gstate["aa_accelerated"] and res_norm > group["max_residual_growth"] * gstate["aa_prev_res_norm"]
        if count and not grew:
            gram = host[2:2 + count * count].reshape(count, count)
            rhs = host[2 + count * count:]
            gamma = _mixing_coefficients(gram, rhs, group["reg"])
            if gamma is not None and float(gamma.norm()) <= group["max_coef_norm"]:
                g = gamma.to(device=params[0].device, dtype=params[0].dtype)
                candidate = [f - torch.tensordot(g, st["dx_hist"][:count], dims=1)
                             - torch.tensordot(g, st["df_hist"][:count], dims=1)
                             for st, f in zip(states, residual)]
                cand_norm = float(torch.stack(torch._foreach_norm(candidate)).pow(2).sum().sqrt())
                if math.isfinite(cand_norm) and cand_norm <= group["max_step_ratio"] * adam_norm:
                    step, accepted = candidate, True
        if count and not accepted:
            self.rejected += 1
            count, slot = 0, 0
        self.accepted += accepted

        torch._foreach_add_(params, step)
        for st, s, f in zip(states, step, residual):
            st["dx_hist"][slot].copy_(s)
            st["prev_residual"].copy_(f)
        gstate.update(aa_count=count, aa_slot=slot, aa_has_prev=True, aa_accelerated=accepted,
                      aa_prev_res_norm=res_norm)

    def _init_state(self, p: Tensor, history: int) -> None:
        state = self.state[p]
        if "exp_avg" in state:
            return
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(p)
        state["exp_avg_sq"] = torch.zeros_like(p)
        state["prev_residual"] = torch.zeros_like(p)
        state["dx_hist"] = torch.zeros((history, *p.shape), dtype=p.dtype, device=p.device)
        state["df_hist"] = torch.zeros((history, *p.shape), dtype=p.dtype, device=p.device)

    @staticmethod
    def _adam_directions(params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]],
                         group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor]]:
        """Update Adam's moments; return (AdamW step, fixed-point residual f) per tensor."""
        beta1, beta2 = group["betas"]
        lr, wd = group["lr"], group["weight_decay"]
        exp_avgs = [st["exp_avg"] for st in states]
        exp_avg_sqs = [st["exp_avg_sq"] for st in states]
        for st in states:
            st["step"] += 1
        torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, [math.sqrt(1.0 - beta2 ** st["step"]) for st in states])
        torch._foreach_add_(denom, group["eps"])
        adam_step = torch._foreach_div(exp_avgs, denom)
        torch._foreach_mul_(adam_step, [-lr / (1.0 - beta1 ** st["step"]) for st in states])
        residual = torch._foreach_div(grads, denom)
        torch._foreach_mul_(residual, -lr)
        if wd > 0:
            torch._foreach_add_(adam_step, params, alpha=-lr * wd)
            torch._foreach_add_(residual, params, alpha=-lr * wd)
        return adam_step, residual


def _mixing_coefficients(gram: Tensor, rhs: Tensor, reg: float) -> Tensor | None:
    """γ = (ΔFᵀΔF + μI)⁻¹ ΔFᵀf with μ = reg·trace/cols; None when the history carries no signal."""
    cols = gram.shape[0]
    scale = float(torch.trace(gram)) / cols
    if not math.isfinite(scale) or scale <= 0.0 or not bool(torch.isfinite(rhs).all()):
        return None
    try:
        gamma = torch.linalg.solve(gram + reg * scale * torch.eye(cols, dtype=gram.dtype), rhs)
    except torch.linalg.LinAlgError:
        return None
    return gamma if bool(torch.isfinite(gamma).all()) else None
