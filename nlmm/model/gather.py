"""Row gathers across the training processes (torch.distributed's default group).

`gather_rows` keeps the gradient, so a loss computed on the gathered rows trains every rank's
encoders (CLIP-style data parallelism); `gather_ragged` is for labels and evaluation
embeddings, which need none. Both concatenate the blocks in rank order, so every rank sees the
same global batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


class _GatherRows(torch.autograd.Function):
    """Concatenate equal-sized row blocks of all ranks in rank order; the backward hands each
    rank the gradient of its own rows summed over every rank's loss."""

    @staticmethod
    def forward(ctx: Any, block: Tensor) -> Tensor:
        parts = [torch.empty_like(block) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, block.contiguous())
        ctx.rows, ctx.rank = block.shape[0], dist.get_rank()
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_rows(block: Tensor) -> Tensor:
    """All ranks' equal-sized (rows, ...) blocks, concatenated in rank order, with gradient."""
    return _GatherRows.apply(block)


def gather_ragged(block: Tensor) -> Tensor:
    """All ranks' blocks of different row counts, concatenated in rank order (no gradient)."""
    if block.dtype == torch.bool:  # gloo has no collectives on bool tensors
        return gather_ragged(block.to(torch.uint8)).bool()
    world_size = dist.get_world_size()
    counts = torch.tensor([block.shape[0]], device=block.device)
    all_counts = [torch.empty_like(counts) for _ in range(world_size)]
    dist.all_gather(all_counts, counts)
    sizes = [int(c.item()) for c in all_counts]
    padded = block.new_zeros((max(sizes), *block.shape[1:]))
    padded[:block.shape[0]] = block
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])
