"""What `nlmm train` (or the dashboard's new-run form) asks the launcher for, and the checks
that refuse a request which cannot work before anything is prepared or started."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nlmm.data.corpora.base import CorpusSpec
from nlmm.errors import NlmmError


@dataclass
class TrainRequest:
    data: Path | list[CorpusSpec] | None = None  # one corpus folder, or corpora with formats
    synthetic: bool = False
    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    device: str = "auto"
    name: str | None = None
    resume: str | None = None
    # with resume: train this many more epochs / steps than where the run stands (plan.py);
    # with resume and data, the epochs / steps of the new run on that corpus
    add_epochs: int | None = None
    add_steps: int | None = None
    nproc: int = 1  # worker processes on this node (one per GPU)
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None  # host:port of node 0, for several nodes

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def check_distributed(req: TrainRequest, device: str) -> None:
    """Refuse process and node counts that torchrun could not start on `device`."""
    if req.nproc < 1 or req.nnodes < 1:
        raise NlmmError("--nproc and --nnodes must be at least 1.")
    if not 0 <= req.node_rank < req.nnodes:
        raise NlmmError(f"--node-rank must be between 0 and --nnodes - 1 = {req.nnodes - 1}, "
                        f"got {req.node_rank}.")
    if req.nnodes > 1 and not req.rdzv_endpoint:
        raise NlmmError("several nodes need --rdzv-endpoint HOST:PORT, an address of node 0 that "
                        "every node can reach.")
    if req.rdzv_endpoint and not re.fullmatch(r"\[?[\w.:-]+\]?:\d+", req.rdzv_endpoint):
        raise NlmmError(f"--rdzv-endpoint must be HOST:PORT, got {req.rdzv_endpoint!r}.")
    if device.startswith("cuda") and req.nproc > torch.cuda.device_count():
        raise NlmmError(f"--nproc {req.nproc} asks for more processes than the "
                        f"{torch.cuda.device_count()} GPU(s) of this node; use --nproc "
                        f"{torch.cuda.device_count()} or fewer.")
