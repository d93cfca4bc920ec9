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
- Checkpoints: best.pt (and every epoch_NNN.pt) is a model snapshot: the state dict, the
  tokenizer and a little metadata. last.pt adds what a resume needs once every level has
  stepped: each level's optimizer state (`OPTIMIZER_STATE_COPIES`) and, for levels updated
  every C > 1 steps, the update sum of the chunk in progress and, in the last.pt written when a
  run ends (its open chunks applied), their chunk-start weights (two more copies). Checked against
  the files a run writes (tests/test_checkpoint_size.py).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from nlmm.config import MODALITIES, Config
from nlmm.model.encoders import image_stem_widths, stem_strides
from nlmm.model.losses import PAIR_MODALITIES
from nlmm.model.nlmm import NLMM
from nlmm.optim.levels import level_settings

OPTIMIZER_STATE_COPIES = {
    "adamw": 2,                # exp_avg, exp_avg_sq
    "sgd": 1,                  # momentum buffer
    "dmgd": 3,                 # momentum, previous gradient, previous momentum
    "muon": 1,                 # momentum (matrices; vectors use AdamW's 2, a small share)
    "universal_anderson": 13,  # Adam's 2 + previous residual + 2 x history of 5
}
# The triple `model_info` assumes unless told otherwise: 5 s of speech, a caption of 20 tokens.
TYPICAL_SPEECH_SECONDS = 5.0
TYPICAL_CAPTION_TOKENS = 20
# The tokenizer's JSON in a checkpoint: about 25 bytes per BPE entry (its token and its merge),
# measured on trained vocabularies of 300 to 8000 entries.
TOKENIZER_BYTES_PER_ENTRY = 25
# Around the tensors: the zip record and pickled key of each, and the config, metrics and
# progress once (measured on the files of tiny runs).
CHECKPOINT_BYTES_PER_TENSOR = 300
CHECKPOINT_OVERHEAD_BYTES = 16 * 2**10
# Tensors of optimizer state per parameter (their size is OPTIMIZER_STATE_COPIES): AdamW's step
# counter is one; DMGD adds its memory's weights and scale.
OPTIMIZER_STATE_TENSORS = {"adamw": 3, "sgd": 1, "dmgd": 6, "muon": 1, "universal_anderson": 5}


def parameter_counts(cfg: Config) -> dict[str, Any]:
    """Trainable parameters per part and per CMS level, and the (untrained) TTT adapters."""
    with torch.device("meta"):
        model = NLMM(cfg)
    parts = {m: 0 for m in MODALITIES if m in cfg.modalities} | {"memory": 0, "heads": 0}
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


def _optimizer_state(optimizer: str, orthogonalised: bool) -> tuple[int, int]:
    """(copies of the parameter, tensors) that an optimizer keeps for one parameter;
    `orthogonalised`: the parameter takes Muon's orthogonalised path (it keeps a momentum only),
    not its AdamW path."""
    if optimizer == "muon" and not orthogonalised:
        optimizer = "adamw"
    return OPTIMIZER_STATE_COPIES[optimizer], OPTIMIZER_STATE_TENSORS[optimizer]


def checkpoint_bytes(cfg: Config) -> dict[str, int]:
    """Estimated sizes of a run's checkpoint files: `best` (best.pt, the epoch files) and `last`
    (last.pt once every level has stepped, mid-chunk); see the module docstring."""
    with torch.device("meta"):
        model = NLMM(cfg)
    state = model.state_dict()
    weights = sum(t.numel() * t.element_size() for t in state.values())
    best = (weights + CHECKPOINT_BYTES_PER_TENSOR * len(state)
            + TOKENIZER_BYTES_PER_ENTRY * cfg.vocab_size + CHECKPOINT_OVERHEAD_BYTES)
    no_muon = model.no_muon()
    orthogonalised = {id(p) for name, p in model.named_parameters()
                      if p.ndim >= 2 and name not in no_muon}
    settings = {s.name: s for s in level_settings(cfg, model.backbone_levels(cfg))}
    resume, tensors = torch.get_rng_state().numel(), 0
    for level, params in model.level_params().items():
        # the open chunk's update sum, and once the run's end has applied it (Eq. 31) the
        # chunk-start weights that an exact resume puts back
        chunk_sum = 2 if settings[level].chunk_size > 1 else 0
        for p in params:
            copies, count = _optimizer_state(settings[level].optimizer, id(p) in orthogonalised)
            resume += (copies + chunk_sum) * p.numel() * p.element_size()
            tensors += count + chunk_sum
    return {"best": best, "last": best + resume + CHECKPOINT_BYTES_PER_TENSOR * tensors}


def tokens_per_triple(cfg: Config, audio_seconds: float, text_len: int) -> dict[str, int]:
    frames = cfg.data.mel_frames(round(audio_seconds * cfg.data.sample_rate))
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
        widths = image_stem_widths(cfg.patch_size, d, cfg.image_stem)
        for i, (s, width) in enumerate(zip(strides, widths)):
            if cfg.image_stem == "pool":  # 3x3 conv at the stage's input size, then max-pool
                conv = 2 * channels * 9 * width * side * side
                side //= s
            else:
                side = math.ceil(side / s)
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
        side = cfg.data.image_size
        for s, width in zip(stem_strides(cfg.patch_size),
                            image_stem_widths(cfg.patch_size, d, cfg.image_stem)):
            if cfg.image_stem == "pool":  # conv, norm(+ReLU) at full size, then the pooled map
                values += 2 * width * side * side + width * (side // s) ** 2
                side //= s
            else:
                side = math.ceil(side / s)
                values += 2 * width * side * side  # conv, norm(+ReLU)
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


def model_info(cfg: Config, batch_size: int = 32, audio_seconds: float | None = None,
               text_len: int | None = None) -> dict[str, Any]:
    """Parameter counts, forward+backward FLOPs per (image, caption, spoken caption) triple and
    the training memory estimate at `batch_size` (see the module docstring for the model).

    The triple's speech and caption lengths default to TYPICAL_SPEECH_SECONDS and
    TYPICAL_CAPTION_TOKENS, cut to the config's limits (`data.max_audio_seconds`,
    `data.text_max_len`) as the data cache cuts them."""
    if audio_seconds is None:
        audio_seconds = min(TYPICAL_SPEECH_SECONDS, cfg.data.max_audio_seconds)
    if text_len is None:
        text_len = min(TYPICAL_CAPTION_TOKENS, cfg.data.text_max_len)
    counts = parameter_counts(cfg)
    tokens = tokens_per_triple(cfg, audio_seconds, text_len)
    frames = cfg.data.mel_frames(round(audio_seconds * cfg.data.sample_rate))
    flops: dict[str, float] = {}
    towers = [m for m in MODALITIES if m in cfg.modalities]
    for modality in towers:
        input_layer, rest = _forward_flops(cfg, modality, tokens[modality], frames, batch_size)
        flops[modality] = 2 * input_layer + 3 * rest
    pairs = sum(1 for a, b in PAIR_MODALITIES.values() if a in towers and b in towers)
    flops["loss"] = 3 * pairs * 2 * batch_size * cfg.embed_dim
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
        "checkpoint_bytes": checkpoint_bytes(cfg),
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
