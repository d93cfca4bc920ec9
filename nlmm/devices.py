"""The torch device a `--device` option names.

Kept apart from the training loop so that inference, search, the server and the launcher pick a
device without importing the loop (DDP, the data loader) that only the workers need.
"""

from __future__ import annotations

import torch

from nlmm.errors import NlmmError


def resolve_device(name: str) -> torch.device:
    """`auto` is the GPU when CUDA sees one, else the CPU; asking for CUDA without it is an error
    here, before any work, rather than deep inside a worker."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        # one wording for the CLI's --device and the library's device= (load_bundle, serve)
        raise NlmmError(f"device {name!r} was asked for but no CUDA GPU is visible; use 'cpu' or "
                        f"'auto' (--device cpu or --device auto).")
    return torch.device(name)
