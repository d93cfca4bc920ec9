"""Size, compute and memory of an NL-MM configuration, for `nlmm model info` and the benchmarks.

Parameters are counted on a model built on the meta device (no memory, no initialisation
cost). FLOPs and activation memory are analytic estimates for one training step:

- FLOPs of a matmul = 2 x multiply-adds; forward + backward = 3 x forward (the backward pass
  computes gradients for both inputs and weights). Per encoder, per token: 2 x (weights used
  in matmuls), plus attention terms — softmax 4*N*d per token (QK^T and AV over N keys);
  linear (chunked causal) 4*C*d + 4*d*d_head (intra-chunk products, then writing and reading
  the d_head x d_head state per head); the shared-memory read 4*L_mem*d. Per row: attention
  pooling and the projection head. Per batch: the slots' key/value projections and the
  B x B similarity matrix of each pair, divided by the batch size. The first layer of a stem
  needs no input gradient, so it counts 2 x forward. Checked against
  torch.utils.flop_counter on a real step (tests/test_model.py).
- Memory: fp32 parameters and gradients; optimiser state as copies of each parameter per
  `OPTIMIZER_STATE_COPIES` (from the optimisers' own documentation in nlmm.optim); activations
  saved for backward per token and block (in d_model units): mixer 8 (norm, qkv, attention out,
  projection input), memory read 5, each CMS level 2 + 2*ffn_mult, plus 4 per token for stem,
  final norm and pooling, at 2 bytes under bf16/fp16 autocast and 4 otherwise. Fused attention
  kernels (flash / memory-efficient, as on GPU) keep no N x N matrix; the linear mixer keeps
  about 4 more d-wide tensors plus its chunk scores and states. With gradient checkpointing only
  each block's input is kept, plus the largest block's activations while it is recomputed.
  Checked against the tensors autograd actually saves (tests/test_model.py). Allocator slack,
  workspaces and the data batch are not included.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from nlmm.config import MODALITIES, PAIRS, Config
from nlmm.model.encoders import stem_strides
from nlmm.model.nlmm import NLMM

OPTIMIZER_STATE_COPIES = {
    "adamw": 2,                # exp_avg, exp_avg_sq
    "sgd": 1,                  # momentum buffer
    "dmgd": 3,                 # momentum, previous gradient, previous momentum
    "muon": 1,                 # momentum (matrices; vectors use AdamW's 2, a small share)
    "universal_anderson": 13,  # Adam's 2 + previous residual + 2 x history of 5
}
MEL_FRAMES_PER_SECOND = 100  # 10 ms hop


def parameter_counts(cfg: Config) -> dict[str, Any]:
    """Trainable parameters per part and per CMS level, and the (untrained) TTT adapters."""
    with torch.device("meta"):
        model = NLMM(cfg)
    parts = {m: 0 for m in MODALITIES} | {"memory": 0, "heads": 0}
    adapters = 0
    for name, p in model.named_parameters():
        pieces = name.split(".")
        if "adapter" in pieces:
            adapters += p.numel()
        elif not p.requires_grad:
            continue  # frozen pretrained backbones are not trained
        elif pieces[0] == "memory" or any(piece.startswith("memory") for piece in pieces):
            parts["memory"] += p.numel()
        elif pieces[0] == "logit_scale" or pieces[2] in ("pool", "head"):
            parts["heads"] += p.numel()
        else:
            parts[pieces[1]] += p.numel()
    levels = {name: sum(p.numel() for p in params) for name, params in model.level_params().items()}
    return {"parts": parts, "levels": levels, "trainable": sum(parts.values()), "ttt_adapters": adapters}


def tokens_per_triple(cfg: Config, audio_seconds: float, text_len: int) -> dict[str, int]:
    frames = math.ceil(audio_seconds * MEL_FRAMES_PER_SECOND)
    return {"text": text_len, "image": (cfg.data.image_size // cfg.patch_size) ** 2,
            "audio": math.ceil(frames / cfg.audio_stride)}


def _forward_flops(cfg: Config, modality: str, n: int, frames: int,
                   batch_size: int) -> tuple[float, float]:
    """Forward FLOPs of one row of `modality` with `n` tokens, batch-level terms shared out:
    (the stem's input layer, everything else)."""
    d, f, k, m = cfg.d_model, cfg.ffn_mult, len(cfg.cms_levels), cfg.L_mem
    depth = getattr(cfg.depth, modality)
    matmul_weights = (4 + (2 if m else 0) + 2 * f * k) * d * d
    if cfg.mixer == "softmax":
        mixing = 4 * n * d
    else:
        mixing = 4 * min(cfg.linear_chunk, n) * d + 4 * d * (d // cfg.n_heads)
    per_token = 2 * matmul_weights + mixing + 4 * m * d
    slots = 2 * 2 * d * d * m / batch_size
    blocks = depth * (n * per_token + slots)
    input_layer, stem = 0.0, 0.0
    if modality == "image" and not cfg.conv_stems:
        input_layer = 2 * 3 * cfg.patch_size ** 2 * d * n
    elif modality == "image":
        side, channels = cfg.data.image_size, 3
        strides = stem_strides(cfg.patch_size)
        for i, s in enumerate(strides):
            side = math.ceil(side / s)
            width = max(16, d >> (len(strides) - 1 - i))
            conv = 2 * channels * (2 * (s // 2) + 1) ** 2 * width * side * side
            if i == 0:
                input_layer = conv
            else:
                stem += conv
            channels = width
        stem += 2 * channels * d * n
    elif modality == "audio":
        length, channels = frames, cfg.data.n_mels
        for i, s in enumerate(stem_strides(cfg.audio_stride)):
            length = math.ceil(length / s)
            kernel = 5 if cfg.conv_stems and s == 2 else 2 * (s // 2) + 1
            conv = 2 * channels * kernel * d * length
            if i == 0:
                input_layer = conv
            else:
                stem += conv
            channels = d
        if cfg.conv_stems:
            stem += 2 * d * d * length
    pooling = n * (2 * 2 * d * d + 4 * d) + 2 * d * cfg.embed_dim
    return input_layer, stem + blocks + pooling


def _conv_stem_values(cfg: Config, frames: int) -> float:
    """Values the BatchNorm conv stems keep for backward per triple (conv, norm and activation
    outputs of every stage; the normalised log-mel), 0 for the plain stems."""
    if not cfg.conv_stems:
        return 0.0
    d, values = cfg.d_model, 0.0
    if cfg.encoders.backbone("image") is None:
        side, strides = cfg.data.image_size, stem_strides(cfg.patch_size)
        for i, s in enumerate(strides):
            side = math.ceil(side / s)
            values += 2 * max(16, d >> (len(strides) - 1 - i)) * side * side  # conv, norm(+ReLU)
    if cfg.encoders.backbone("audio") is None:
        length = frames
        values += 2 * cfg.data.n_mels * frames
        for s in stem_strides(cfg.audio_stride):
            length = math.ceil(length / s)
            values += 3 * d * length
    return values


def _activation_bytes(cfg: Config, tokens: dict[str, int], batch_size: int,
                      frames: int) -> float:
    d, f, k = cfg.d_model, cfg.ffn_mult, len(cfg.cms_levels)
    width = 2 if cfg.precision.amp in ("bf16", "fp16") else 4
    stems = batch_size * _conv_stem_values(cfg, frames) * width
    per_block = 8 + (5 if cfg.L_mem else 0) + k * (2 + 2 * f)
    if cfg.layer_scale_init is not None:  # each gain keeps its branch's output
        per_block += 1 + (1 if cfg.L_mem else 0) + k
    if cfg.mixer == "linear":
        # feature-mapped and masked q, k, v, intra-chunk scores, per-chunk states
        per_block += 4 + cfg.n_heads * cfg.linear_chunk / d + 2 * (d // cfg.n_heads) / cfg.linear_chunk
    rows = {m: batch_size * n * d * width for m, n in tokens.items()}
    if cfg.train.grad_checkpointing:
        kept = sum(rows[m] * (getattr(cfg.depth, m) + 4) for m in rows)
        recomputed = max(rows[m] * per_block for m in rows if getattr(cfg.depth, m)) \
            if any(getattr(cfg.depth, m) for m in rows) else 0.0
        return stems + kept + recomputed
    return stems + sum(rows[m] * (getattr(cfg.depth, m) * per_block + 4) for m in rows)


def model_info(cfg: Config, batch_size: int = 32, audio_seconds: float = 5.0,
               text_len: int = 20) -> dict[str, Any]:
    """Parameter counts, forward+backward FLOPs per (image, caption, spoken caption) triple and
    the training memory estimate at `batch_size` (see the module docstring for the model)."""
    counts = parameter_counts(cfg)
    tokens = tokens_per_triple(cfg, audio_seconds, text_len)
    frames = math.ceil(audio_seconds * MEL_FRAMES_PER_SECOND)
    flops: dict[str, float] = {}
    for modality in MODALITIES:
        input_layer, rest = _forward_flops(cfg, modality, tokens[modality], frames, batch_size)
        flops[modality] = 2 * input_layer + 3 * rest
    flops["loss"] = 3 * len(PAIRS) * 2 * batch_size * cfg.embed_dim
    flops["total"] = sum(flops.values())

    level_optimizer = {lvl.name: cfg.train.optimizer or lvl.optimizer for lvl in cfg.cms_levels}
    optimizer_bytes = sum(4 * OPTIMIZER_STATE_COPIES[level_optimizer[name]] * n
                          for name, n in counts["levels"].items())
    weights = 4 * (counts["trainable"] + counts["ttt_adapters"])
    memory = {
        "params": weights,
        "grads": 4 * counts["trainable"],
        "optimizer": optimizer_bytes,
        "activations": _activation_bytes(cfg, tokens, batch_size, frames),
    }
    memory["total"] = sum(memory.values())
    return {
        "params": counts["parts"] | {"trainable": counts["trainable"],
                                     "ttt_adapters": counts["ttt_adapters"]},
        "params_per_level": counts["levels"],
        "tokens_per_triple": tokens,
        "flops_per_triple": flops,
        "flops_per_step": flops["total"] * batch_size,
        "memory_bytes": memory,
        "batch_size": batch_size,
        "audio_seconds": audio_seconds,
        "text_len": text_len,
    }
