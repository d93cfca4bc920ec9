"""Muon: Nesterov momentum orthogonalised by a quintic Newton–Schulz iteration, for weight matrices.

Nested Learning (Eq. 24) reads Muon as momentum with an output non-linearity σ: the update is
σ(m_{t+1}) where σ maps the momentum matrix to the nearest semi-orthogonal matrix U Vᵀ. Five
Newton–Schulz iterations approximate that map cheaply (Keller Jordan, 2024).

Which tensors take the Muon path: every parameter with at least two dimensions (conv kernels are
flattened to (out_channels, in_channels·kh·kw)) unless marked with `exclude_from_muon` — token
embeddings and output heads usually are, since their rows are looked up or read out one by one
rather than acting as a linear map on a hidden state. All other tensors (biases, norm gains,
excluded matrices) take an AdamW step with the same learning rate and weight decay.

Update scale (`adjust_lr`): an orthogonalised (A, B) update has RMS about 1/sqrt(max(A, B)), far
smaller than an AdamW update, so one learning rate cannot serve both paths without a rescale.
 - "match_rms_adamw" (default; Moonshot AI, "Muon is Scalable for LLM Training", 2025): multiply
   by 0.2·sqrt(max(A, B)), which gives the update the RMS (about 0.2) of a typical AdamW update.
   Chosen because NL-MM gives each CMS level one learning rate, shared by the matrices and the
   AdamW-path tensors of that level, and the configs' learning rates are AdamW-scale.
 - "original" (Keller Jordan): multiply by sqrt(max(1, A/B)); needs a learning rate about 20–50×
   larger than AdamW's (Muon's usual 0.02) and then mismatches the AdamW-path tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.nn import Parameter
from torch.optim.adamw import adamw as _adamw_functional

QUINTIC = (3.4445, -4.7750, 2.0315)
ADJUST_LR = ("match_rms_adamw", "original")
_EXCLUDE_FLAG = "_nlmm_exclude_from_muon"


def exclude_from_muon(*params: Parameter) -> None:
    """Send these matrices down Muon's AdamW path (embeddings, output heads)."""
    for p in params:
        setattr(p, _EXCLUDE_FLAG, True)


def takes_muon_path(p: Tensor) -> bool:
    return p.ndim >= 2 and not getattr(p, _EXCLUDE_FLAG, False)


def newton_schulz(g: Tensor, steps: int = 5, coefficients: tuple[float, float, float] = QUINTIC,
                  eps: float = 1e-7) -> Tensor:
    """Approximate U Vᵀ of the matrix g = U S Vᵀ (g with more than 2 dims is flattened after dim 0).

    X ← g/‖g‖_F (spectral norm ≤ 1), then `steps` times: A = X Xᵀ, X ← a X + (b A + c A²) X,
    run on the short side of the matrix. The quintic coefficients push every singular value
    into roughly [0.7, 1.2] rather than exactly to 1, which trains as well and needs 5 steps.
    Runs in bf16 on CUDA (tensor cores) and in fp32 elsewhere; returns g's dtype and shape.
    """
    a, b, c = coefficients
    x = g.reshape(g.shape[0], -1)
    x = x.to(torch.bfloat16 if x.is_cuda else torch.float32)
    transposed = x.shape[0] > x.shape[1]
    if transposed:
        x = x.mT
    x = x / (x.norm() + eps)
    for _ in range(steps):
        gram = x @ x.mT
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, poly, x, beta=a)
    if transposed:
        x = x.mT
    return x.reshape(g.shape).to(g.dtype)


def update_scale(shape: torch.Size, adjust_lr: str) -> float:
    rows, cols = shape[0], math.prod(shape[1:])
    if adjust_lr == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1.0, rows / cols))


class Muon(torch.optim.Optimizer):
    """Muon for matrices, AdamW for everything else, in one optimizer (see the module docstring).

    Matrix path, per tensor: B ← μ B + (1 − μ) G; U ← (1 − μ) G + μ B if nesterov else B;
    W ← W (1 − lr·wd) − lr · scale · NS5(U). AdamW path: torch's AdamW update (foreach kernels).
    """

    def __init__(self, params: Iterable[Parameter] | Iterable[dict[str, Any]], lr: float = 1e-3,
                 weight_decay: float = 0.0, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, adjust_lr: str = "match_rms_adamw",
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        if lr < 0 or weight_decay < 0 or not 0.0 <= momentum < 1.0 or ns_steps < 1:
            raise ValueError(f"Muon: invalid lr={lr}, weight_decay={weight_decay}, "
                             f"momentum={momentum} or ns_steps={ns_steps}")
        if adjust_lr not in ADJUST_LR:
            raise ValueError(f"Muon: adjust_lr must be one of {ADJUST_LR}, got {adjust_lr!r}")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_steps=ns_steps, adjust_lr=adjust_lr, betas=betas, eps=eps)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            adam_params: list[Tensor] = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if takes_muon_path(p):
                    self._muon_update(p, group)
                else:
                    adam_params.append(p)
            if adam_params:
                self._adamw_update(adam_params, group)
        return loss

    def _muon_update(self, p: Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buf = state["momentum_buffer"]
        mu = group["momentum"]
        buf.lerp_(p.grad, 1.0 - mu)
        direction = p.grad.lerp(buf, mu) if group["nesterov"] else buf
        ortho = newton_schulz(direction, group["ns_steps"])
        lr = group["lr"]
        p.mul_(1.0 - lr * group["weight_decay"])
        p.add_(ortho, alpha=-lr * update_scale(p.shape, group["adjust_lr"]))

    def _adamw_update(self, params: list[Tensor], group: dict[str, Any]) -> None:
        grads, exp_avgs, exp_avg_sqs, steps = [], [], [], []
        for p in params:
            state = self.state[p]
            if "exp_avg" not in state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        beta1, beta2 = group["betas"]
        _adamw_functional(params, grads, exp_avgs, exp_avg_sqs, [], steps, foreach=None,
                          amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
                          weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
