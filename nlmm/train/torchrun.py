"""The command line and environment of a run's worker process(es).

Data-parallel runs start torchrun in module form (`python -m torch.distributed.run ...
-m nlmm.train.worker RUN_ID`), so that the worker runs with this interpreter and nothing needs to
be on PATH; a one-process run starts the worker module directly.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from nlmm import store
from nlmm.train.request import TrainRequest


def worker_command(req: TrainRequest, run_id: int | None, cache: Path | str,
                   device: str) -> list[str]:
    """The command that starts this node's share of the run. `run_id` None: a node other than
    node 0, whose ranks take the run from rank 0 and read the feature cache at `cache`."""
    if not req.distributed:
        return [sys.executable, "-m", "nlmm.train.worker", str(run_id)]
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={req.nproc}",
               f"--nnodes={req.nnodes}", f"--node-rank={req.node_rank}", "--max-restarts=0"]
    # one node without an endpoint: torchrun picks a free local port itself
    command += [f"--rdzv-endpoint={req.rdzv_endpoint}"] if req.rdzv_endpoint else ["--standalone"]
    command += ["-m", "nlmm.train.worker"] + ([str(run_id)] if run_id is not None else [])
    return command + ["--data", str(cache), "--device", device]


def worker_env(req: TrainRequest) -> dict[str, str]:
    """This process's environment, pointed at the same store and runs folder."""
    # the worker resolves the store's relative paths against the same runs folder
    env = dict(os.environ, NLMM_DB_URL=store.current_url(), NLMM_RUNS_DIR=str(store.runs_dir()),
               PYTHONUNBUFFERED="1")
    if req.distributed:
        # torchrun would otherwise set 1 thread per process (and say so in the log)
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // req.nproc)))
        # train.log holds the run's own lines, not Gloo's per-rank connection chatter
        env.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    return env
