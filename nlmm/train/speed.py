"""Speed switches of a training step and the counter that checks the step for host syncs.

- `train.compile`: `compile_encoders` runs every encoder's stem and NL blocks through
  `torch.compile` while the model trains (evaluation, TTT and search stay eager: their batch
  shapes differ and each new shape would cost another compilation). A part that fails to
  compile, in its forward here or in its backward (compiled lazily, inside `loss.backward()`,
  which the trainer watches), falls back to eager with one warning, for every part at once.
- `precision.tf32`: `tf32_scope` lets the fp32 matmuls and convolutions of a CUDA step without
  autocast use TF32 tensor cores (inputs rounded to 10 mantissa bits, fp32 accumulation).
- `train.channels_last`: `use_channels_last` stores the conv image stem's weights NHWC on CUDA,
  the layout cuDNN's tensor-core convolutions run natively.
- `count_syncs` lists the points where a function makes the host wait for the device: on CUDA
  through torch's sync debug mode, on the CPU (where nothing waits) the tensor reads in code
  outside torch that would wait on a GPU (`.item()`, `bool()`, `float()`, `.tolist()`,
  `nonzero`, boolean indexing). torch's own reads are left out there: on the CPU they include
  reads of counters that torch keeps on the host when training on a GPU (AdamW's step count).
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from nlmm.errors import NlmmError

# Errors that mean the same thing compiled or eager: falling back would only hide them.
NOT_COMPILE_FAILURES = (NlmmError, torch.OutOfMemoryError)


class CompiledForward:
    """A module's forward through `torch.compile` while the module trains with gradients."""

    def __init__(self, module: nn.Module, compiled: Callable[..., Any], owner: CompiledParts):
        self.eager = module.forward
        self.compiled = compiled
        self.module = module
        self.owner = owner

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not (self.owner.active and self.module.training and torch.is_grad_enabled()):
            return self.eager(*args, **kwargs)
        try:
            return self.compiled(*args, **kwargs)
        except NOT_COMPILE_FAILURES:
            raise
        except Exception as exc:  # noqa: BLE001 - any compiler failure: run eagerly instead
            self.owner.fall_back(exc)
            return self.eager(*args, **kwargs)


class CompiledParts:
    """The compiled stems and blocks of one model, switched back to eager together."""

    def __init__(self, warn: Callable[[str], None]) -> None:
        self.warn = warn
        self.parts: list[CompiledForward] = []
        self.active = True
        self.failure: str | None = None

    def fall_back(self, exc: BaseException) -> None:
        """Run every part eagerly from now on, saying why once."""
        if not self.active:
            return
        self.active = False
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        self.failure = f"{type(exc).__name__}: {first}"
        self.warn(f"warning: torch.compile failed ({self.failure}); training continues without "
                  f"it, at eager speed; set train.compile: false to skip the attempt.")


def compile_encoders(model: nn.Module, warn: Callable[[str], None],
                     backend: str = "inductor") -> CompiledParts:
    """Compile the stem and every NL block of each encoder of an NLMM in place (the module
    tree and state-dict keys stay as they are). Where torch.compile is unavailable the parts
    stay eager and `warn` says so."""
    parts = CompiledParts(warn)
    modules = [m for encoder in model.encoders.values() for m in (encoder.stem, *encoder.blocks)]
    for module in modules:
        try:
            # dynamic: caption and clip lengths change from batch to batch; one symbolic-shape
            # graph per part instead of a recompilation per length
            compiled = torch.compile(module.forward, backend=backend, dynamic=True)
        except Exception as exc:  # noqa: BLE001 - e.g. a Python version dynamo does not support
            parts.fall_back(exc)
            return parts
        wrapper = CompiledForward(module, compiled, parts)
        module.forward = wrapper
        parts.parts.append(wrapper)
    return parts


@contextlib.contextmanager
def tf32_scope(device: torch.device, amp: str, enabled: bool) -> Iterator[None]:
    """On CUDA without autocast: fp32 matmuls and cuDNN convolutions in TF32 when `enabled`,
    in full fp32 when not; the previous settings come back on exit. Elsewhere: no change
    (under autocast the heavy matmuls are bf16/fp16, and the parts kept in fp32 on purpose,
    such as the linear attention's running state, keep full precision)."""
    if device.type != "cuda" or amp != "none":
        yield
        return
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def use_channels_last(model: nn.Module, device: torch.device) -> bool:
    """Store the image stem's convolution weights NHWC on CUDA; True when it did. Inputs
    should then be NHWC too (`channels_last_images`)."""
    if "image" not in model.encoders:
        return False
    stem = model.encoders["image"].stem
    if device.type != "cuda" or not any(isinstance(m, nn.Conv2d) for m in stem.modules()):
        return False
    stem.to(memory_format=torch.channels_last)
    return True


def channels_last_images(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch with its pixel images (B, 3, H, W) in NHWC layout; cached features (3-D) as
    they are."""
    image = batch.get("image")
    if image is None or image.dim() != 4:
        return batch
    return {**batch, "image": image.contiguous(memory_format=torch.channels_last)}


# --------------------------------------------------------------------------- host syncs

# Tensor reads that copy a device value to the host, so that on a GPU the host waits for
# every queued kernel first.
HOST_READS = frozenset({"__bool__", "__float__", "__int__", "__index__", "item", "tolist",
                        "numpy", "nonzero", "masked_select"})
_TORCH_DIR = str(Path(torch.__file__).parent)


def _caller() -> str | None:
    """`file:line` of the code that made the read, None when that code is torch's."""
    frame = sys._getframe(2)  # _caller <- __torch_function__ <- the reading code
    if frame is None or frame.f_code.co_filename.startswith(_TORCH_DIR):
        return None
    return f"{frame.f_code.co_filename}:{frame.f_lineno}"


class _HostReads(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.sites: list[str] = []

    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        name = getattr(func, "__name__", "")
        if name in HOST_READS or (name in ("__getitem__", "__setitem__") and len(args) > 1
                                  and _bool_index(args[1])):
            site = _caller()
            if site is not None:
                self.sites.append(site)
        return func(*args, **(kwargs or {}))


def _bool_index(index: Any) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def count_syncs(fn: Callable[[], Any], device: torch.device) -> list[str]:
    """Run `fn` once; return the `file:line` of every host sync it made (see the module
    docstring for how each device finds them)."""
    if device.type != "cuda":
        with _HostReads() as reads:
            fn()
        return reads.sites
    torch.cuda.synchronize(device)
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return [f"{w.filename}:{w.lineno}" for w in caught
            if "synchronizing" in str(w.message).lower()]
