"""Optional copies of the run's scalars in TensorBoard or Weights & Biases (`--tensorboard`,
`--wandb`). The store stays the source of truth; a mirror that fails to start is an error up
front, never a silent gap."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

from nlmm.errors import NlmmError

MIRRORS = ("tensorboard", "wandb")


class Sink(Protocol):
    def log(self, step: int, epoch: int, values: dict[str, float]) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


class TensorBoardMirror:
    def __init__(self, run_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise NlmmError("--tensorboard needs the tensorboard package; install it with "
                            "`pip install tensorboard` (or `pip install nlmm[mirrors]`).") from None
        self.logdir = Path(run_dir) / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.logdir))

    def log(self, step: int, epoch: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbMirror:
    def __init__(self, run_name: str, run_dir: Path, config: dict[str, Any]):
        try:
            import wandb
        except ImportError:
            raise NlmmError("--wandb needs the wandb package; install it with `pip install wandb` "
                            "(or `pip install nlmm[mirrors]`).") from None
        # without credentials W&B would prompt; offline mode keeps a local copy to sync later
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY")
                                                else "offline")
        # silent: W&B's banners and end-of-run summary would fill the run's train.log
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "nlmm"), name=run_name,
                              config=config, dir=str(run_dir), mode=mode, resume="allow",
                              id=run_name.replace("/", "-"), settings=wandb.Settings(silent=True))

    def log(self, step: int, epoch: int, values: dict[str, float]) -> None:
        self.run.log({**values, "epoch": epoch}, step=step)

    def flush(self) -> None:
        pass  # wandb streams from its own process

    def close(self) -> None:
        self.run.finish()


class TeeSink:
    """Writes to the store first, then to every mirror."""

    def __init__(self, primary: Sink, mirrors: list[Sink]):
        self.primary, self.mirrors = primary, mirrors

    def log(self, step: int, epoch: int, values: dict[str, float]) -> None:
        self.primary.log(step, epoch, values)
        for mirror in self.mirrors:
            mirror.log(step, epoch, values)

    def flush(self) -> None:
        self.primary.flush()
        for mirror in self.mirrors:
            mirror.flush()

    def close(self) -> None:
        self.primary.close()
        for mirror in self.mirrors:
            mirror.close()


def build_mirrors(names: list[str], run_name: str, run_dir: Path,
                  config: dict[str, Any]) -> list[Sink]:
    mirrors: list[Sink] = []
    for name in names:
        if name == "tensorboard":
            mirrors.append(TensorBoardMirror(run_dir))
        elif name == "wandb":
            mirrors.append(WandbMirror(run_name, run_dir, config))
        else:
            raise NlmmError(f"unknown metrics mirror {name!r}; use tensorboard or wandb.")
    return mirrors
