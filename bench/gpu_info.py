"""What the benchmarks need to know about the device: its name and dense bf16 peak, model FLOP
utilisation, peak memory, and the mean (clip, caption) lengths of a corpus for the FLOP count.

Peaks are NVIDIA's dense (no sparsity) bf16 tensor-core figures from the product datasheets;
a device not in the table has an unknown peak, and its MFU is reported as unknown, never
guessed.
"""

from __future__ import annotations

import platform
import re
import resource
from typing import Any

import numpy as np
import torch

# (pattern on the lower-cased device name, TFLOPS); the first match wins, so the more specific
# names come first ("gh200" contains "h200", "l40s" would match a loose "l4").
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"\bgh200\b", 989.0),
    (r"\bh200 nvl\b", 835.0),
    (r"\bh200\b", 989.0),
    (r"\bh100 nvl\b", 835.0),
    (r"\bh100 pcie\b", 756.0),
    (r"\bh100\b", 989.0),  # SXM5 (the name reads "H100 80GB HBM3")
    (r"\bb200\b", 2250.0),
    (r"\ba100\b", 312.0),
    (r"\bl40s\b", 362.0),
    (r"\bl4\b", 121.0),
    (r"\ba10\b", 125.0),
)


def peak_bf16_tflops(device_name: str) -> float | None:
    """Dense bf16 peak of a GPU named `device_name` (as torch.cuda.get_device_name gives it),
    None when the table does not know it."""
    name = device_name.lower()
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, name):
            return tflops
    return None


def model_flop_utilisation(flops_per_triple: float, triples_per_s: float,
                           peak_tflops: float | None) -> float | None:
    """Achieved model FLOP/s over the peak (0-1); None for an unknown peak."""
    if peak_tflops is None or peak_tflops <= 0:
        return None
    return flops_per_triple * triples_per_s / (peak_tflops * 1e12)


def describe_device(device: torch.device) -> dict[str, Any]:
    """Name, bf16 peak and software versions of the device a benchmark ran on."""
    info: dict[str, Any] = {"type": device.type, "torch": torch.__version__,
                            "python": platform.python_version()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, capability=f"{props.major}.{props.minor}",
                    memory_bytes=props.total_memory, cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(),
                    peak_bf16_tflops=peak_bf16_tflops(props.name))
    else:
        info.update(name=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                    peak_bf16_tflops=None)
    return info


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, Any]:
    """Peak bytes since the last reset: allocated by torch on a GPU; on the CPU the process's
    peak resident set (all of it, since the process started)."""
    if device.type == "cuda":
        return {"kind": "cuda_max_allocated", "bytes": torch.cuda.max_memory_allocated(device),
                "reserved_bytes": torch.cuda.max_memory_reserved(device)}
    return {"kind": "cpu_peak_rss", "bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def mean_triple(cache: Any, max_audio_seconds: float, split: str = "train") -> dict[str, float]:
    """Mean caption tokens and spoken-caption seconds (cut at `max_audio_seconds`, as training
    cuts them) of a split: the sizes the FLOP count of one triple is taken at."""
    rows = cache.split_captions(split)
    frames_per_second = cache.data_cfg.sample_rate / cache.data_cfg.hop_length
    frames = cache.mel_lengths[rows].astype(np.float64)
    frames = np.minimum(frames[frames > 0], max_audio_seconds * frames_per_second)
    return {"text_len": float(cache.token_lengths[rows].mean()),
            "audio_seconds": float(frames.mean() / frames_per_second) if len(frames) else 0.0}
