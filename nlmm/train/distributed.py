"""Data-parallel training over several processes and nodes (torchrun + DistributedDataParallel).

torchrun starts one worker per device and sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE
and the rendezvous address. W ranks with global batch B train exactly like one process with
batch B:
- every rank builds the same model from the same seed and reads the same global batches in the
  same order (the loader's permutation depends on seed and epoch only); rank r trains on rows
  [r*B/W, (r+1)*B/W) of each global batch. Image augmentation is drawn for the whole global
  batch before slicing, so each row is augmented as it would be in one process;
- the contrastive loss is computed on embeddings gathered from all ranks, with gradient, so the
  negatives span the global batch (CLIP-style data parallelism; `ContrastiveLoss` with
  `gather`). Every rank computes the same global loss; the gather's backward sums the gradients
  of a rank's rows over all ranks (W times the gradient of the one loss), and DDP's averaging
  over the W ranks cancels that W;
- DDP averages gradients at the backward of the last micro-batch of a step (`no_sync` before
  it), and every rank steps the level optimizer at the same global step with the same gradients;
- a stop request (SIGTERM reaches rank 0) is OR-reduced after every step, so all ranks stop at
  the same step and rank 0 checkpoints it;
- evaluation: each rank embeds a contiguous share of every modality of the split, the shares are
  gathered to all ranks, and every rank computes the same Recall@K (so all keep the same
  progress, best metric included).
Only rank 0 touches the store and writes checkpoints; it sends the run's configuration and any
resumed state to the other ranks, so nodes other than the first need no access to the store.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from nlmm.data.cache import PreparedCache
from nlmm.errors import NlmmError
from nlmm.model import NLMM
from nlmm.model.gather import gather_ragged
from nlmm.eval.evaluate import embed_split, score_split

# Long enough for rank 0 to write a large checkpoint or evaluate while the others wait.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class DistContext:
    """Where this process sits among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


SINGLE = DistContext()


def context_from_env() -> DistContext:
    """The context torchrun describes in the environment (SINGLE when not started by torchrun)."""
    env = os.environ
    if "WORLD_SIZE" not in env:
        return SINGLE
    return DistContext(rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]),
                       local_rank=int(env.get("LOCAL_RANK", "0")),
                       local_world_size=int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])))


def init_process_group(ctx: DistContext, device: torch.device) -> torch.device:
    """Join the other ranks (NCCL on CUDA, gloo on the CPU); returns this rank's device."""
    if not ctx.enabled:
        return device
    if device.type == "cuda":
        if ctx.local_rank >= torch.cuda.device_count():
            raise NlmmError(f"local rank {ctx.local_rank} has no GPU: this node shows "
                            f"{torch.cuda.device_count()}; lower --nproc to the number of GPUs.")
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    with _native_stdout_silenced():
        dist.init_process_group(backend, rank=ctx.rank, world_size=ctx.world_size,
                                timeout=COLLECTIVE_TIMEOUT)
    return device


@contextlib.contextmanager
def _native_stdout_silenced() -> Iterator[None]:
    """Point file descriptor 1 at /dev/null: gloo prints "[Gloo] Rank R is connected to N peer
    ranks" from C++ for every rank while the group connects, interleaved into train.log.
    Python's stdout is flushed first, and a failure to connect still raises its exception."""
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def destroy_process_group(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_from_main(obj: Any, ctx: DistContext, device: torch.device) -> Any:
    """Rank 0's `obj` on every rank (pickled; tensors inside should be on the CPU)."""
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=device if device.type == "cuda" else None)
    return box[0]


def any_rank(flag: bool, ctx: DistContext, device: torch.device) -> bool:
    """True on every rank when `flag` is True on at least one."""
    if not ctx.enabled:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def wrap_model(model: NLMM, device: torch.device, ctx: DistContext) -> nn.Module | None:
    """The DDP wrapper of `model` (None for one process).

    find_unused_parameters: a rank whose slice holds no spoken caption does not run the audio
    encoder, so its audio parameters get no gradient on that rank. On CUDA the BatchNorm layers
    of the conv stems become SyncBatchNorm, so they normalise over the global batch as one
    process would; on the CPU (gloo), which SyncBatchNorm does not support, each rank normalises
    its own shard.
    """
    if not ctx.enabled:
        return None
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # Most batches do use every parameter, and DDP then warns that the flag costs a traversal;
    # the flag stays for the batches without speech, so the warning would only fill train.log.
    warnings.filterwarnings("ignore", message=".*find_unused_parameters=True was specified",
                            category=UserWarning)

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=True)


def check_batch_size(batch_size: int, ctx: DistContext) -> None:
    if batch_size % ctx.world_size:
        raise NlmmError(f"train.batch_size={batch_size} is the global batch and must split evenly "
                        f"over {ctx.world_size} processes; use a multiple of {ctx.world_size}.")


def shard_batch(batch: dict[str, Tensor], ctx: DistContext) -> dict[str, Tensor]:
    """This rank's contiguous slice of every row-indexed tensor of a global batch."""
    if not ctx.enabled:
        return batch
    out = {}
    for key, value in batch.items():
        rows = value.shape[0] // ctx.world_size
        out[key] = value[ctx.rank * rows:(ctx.rank + 1) * rows]
    return out


def sync_context(ddp: nn.Module | None, last_micro_batch: bool) -> contextlib.AbstractContextManager:
    """DDP averages gradients at the last micro-batch of a step only."""
    if ddp is None or last_micro_batch:
        return contextlib.nullcontext()
    return ddp.no_sync()


def evaluate_split_sharded(model: NLMM, cache: PreparedCache, split: str, device: torch.device,
                           ctx: DistContext, batch_size: int = 128) -> dict[str, float]:
    """`evaluate_split` with the embedding work shared by all ranks; the same figures on each."""
    mine, owner = embed_split(model, cache, split, device, batch_size=batch_size, part=ctx.rank,
                              parts=ctx.world_size)
    emb = {modality: gather_ragged(block) for modality, block in mine.items()}
    return score_split(cache, split, emb, owner)
