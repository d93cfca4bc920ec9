"""nlmm: train and use tri-modal (image, text, speech) Nested-Learning retrieval models."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nlmm.inference.bundle import Bundle

__version__ = "0.1.0"


def load_bundle(path: str | os.PathLike[str], device: str = "cpu") -> Bundle:
    """The model that `nlmm export` wrote in the folder `path`, ready to embed texts, image
    files and speech files (see `nlmm.inference.bundle`)."""
    # imported here: every `nlmm` command imports this package, and most never need torch
    from nlmm.inference.bundle import load_bundle as load

    return load(path, device)
