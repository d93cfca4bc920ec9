"""Per-modality encoders: a stem that turns the input into tokens, NL blocks, pooling, head.

An encoder is used in three steps so that test-time adaptation can edit the tokens between
them: `tokens(x, mask)` (stem, no position), `trunk(tokens, mask, slots)` (positions, blocks,
final norm) and `embed(states, mask)` (attention pooling, projection, L2 normalisation).

Stems:
- text: token embeddings; learned positions up to max_position_embeddings.
- image (`conv_stems: true`, the default): 3x3 convolutions with BatchNorm, ReLU and
  max-pooling (`image_stem: pool`) or strided 3x3 convolutions (`image_stem: stride`) down to a
  patch_size grid, then a 1x1 projection with BatchNorm; `conv_stems: false`: one patchify
  convolution (kernel = stride = patch_size). Learned positions per grid cell.
- audio: 1-D convolutions over time with the mel bins as channels, strides multiplying to
  audio_stride (stride-2 stages, then one stage for any odd remainder), so a 10 s clip at a
  10 ms hop and stride 4 becomes 250 tokens; with `conv_stems` the log-mel goes through a
  BatchNorm first and every stage has BatchNorm and GELU. Fixed sinusoidal positions, so every
  length up to max_position_embeddings is handled alike. Padded frames are zeroed before every
  convolution and the mask is subsampled with it, so a valid output sees exactly what it would
  see at the end of an unpadded clip (the convolution's own zero padding); in evaluation the
  BatchNorms are per-channel affine maps, so this holds there exactly.
- features (a modality with `encoders.<modality>.backbone`): the backbone's feature tokens
  (B, N, C), cached by `nlmm data prepare` when the backbone is frozen, or computed here from
  raw pixels / waveforms by the backbone the stem holds; LayerNorm over C (backbones differ
  wildly in feature scale) and a linear map to d_model. Learned positions per image token,
  sinusoidal positions over speech frames.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from nlmm.backbones import Backbone, BackboneSpec
from nlmm.config import Config
from nlmm.errors import NlmmError
from nlmm.model.block import NLBlock
from nlmm.model.layers import AttentionPool, sinusoidal_positions, trunc_normal


class TextStem(nn.Module):
    def __init__(self, vocab_size: int, d_model: int) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, d_model)

    def forward(self, ids: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        return self.tokens(ids), mask


class ImageStem(nn.Module):
    """Patchify convolution (kernel = stride = patch_size): the plain ViT stem (`conv_stems: false`)."""

    def __init__(self, patch_size: int, d_model: int) -> None:
        super().__init__()
        self.patchify = nn.Conv2d(3, d_model, kernel_size=patch_size, stride=patch_size)

    def forward(self, image: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        return self.patchify(image).flatten(2).transpose(1, 2), mask


def stem_strides(total: int) -> list[int]:
    """Split a total stride into conv stages: 4 -> [2, 2], 6 -> [2, 3], 1 -> [1]."""
    strides = []
    while total % 2 == 0 and total > 1:
        strides.append(2)
        total //= 2
    if total > 1 or not strides:
        strides.append(total)
    return strides


def image_stem_widths(patch_size: int, d_model: int, kind: str) -> list[int]:
    """Channels of each conv stage of the image stem, doubling up to d_model at the last."""
    n = len(stem_strides(patch_size))
    floor = 32 if kind == "pool" else 16
    return [max(floor, d_model >> (n - 1 - i)) for i in range(n)]


class ConvImageStem(nn.Module):
    """Convolutional stem (`conv_stems: true`): conv stages with BatchNorm and ReLU down to the
    patch_size grid, then a 1x1 projection with BatchNorm. The closing BatchNorm centres the
    tokens over the batch: without it every image's pooled vector starts on one shared offset
    (ReLU outputs are positive) and the image embeddings begin nearly collapsed.

    `image_stem: pool` (default): each stage is a stride-1 3x3 convolution followed by max-pooling
    by the stage's stride, as in a plain CNN; the convolutions see every pixel at full
    resolution. `image_stem: stride`: each stage is one strided 3x3 convolution (Xiao et al.
    2021), 4x cheaper per stage but slower to learn (bench/DESIGN.md, "Image stems").
    """

    def __init__(self, patch_size: int, d_model: int, kind: str = "pool") -> None:
        super().__init__()
        strides = stem_strides(patch_size)
        layers: list[nn.Module] = []
        channels = 3
        for s, width in zip(strides, image_stem_widths(patch_size, d_model, kind)):
            if kind == "pool":
                layers += [nn.Conv2d(channels, width, kernel_size=3, padding=1, bias=False),
                           nn.BatchNorm2d(width), nn.ReLU(inplace=True), nn.MaxPool2d(s)]
            else:
                layers += [nn.Conv2d(channels, width, kernel_size=2 * (s // 2) + 1, stride=s,
                                     padding=s // 2, bias=False),
                           nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            channels = width
        layers += [nn.Conv2d(channels, d_model, kernel_size=1, bias=False), nn.BatchNorm2d(d_model)]
        self.convs = nn.Sequential(*layers)

    def forward(self, image: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        return self.convs(image).flatten(2).transpose(1, 2), mask


class AudioStem(nn.Module):
    """Strided 1-D convolutions over time, the mel bins as channels (`conv_stems: false`)."""

    def __init__(self, n_mels: int, d_model: int, stride: int) -> None:
        super().__init__()
        self.strides = stem_strides(stride)
        # kernel 2*(s//2)+1 with padding s//2 gives ceil(T/s) outputs, matching mask[:, ::s].
        self.convs = nn.ModuleList(
            nn.Conv1d(n_mels if i == 0 else d_model, d_model, kernel_size=2 * (s // 2) + 1,
                      stride=s, padding=s // 2)
            for i, s in enumerate(self.strides))

    def forward(self, mel: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        x = mel[:, 0]
        for i, (conv, s) in enumerate(zip(self.convs, self.strides)):
            if mask is not None:
                x = x * mask[:, None, :].to(x.dtype)
                mask = mask[:, ::s]
            x = conv(x)
            if i < len(self.convs) - 1:
                x = F.gelu(x)
        return x.transpose(1, 2), mask


class ConvAudioStem(nn.Module):
    """Log-mel through BatchNorm, strided convolutions with BatchNorm and GELU, and a 1x1
    projection with BatchNorm (`conv_stems: true`).

    Raw log-mels sit far from zero (about -14 in silence); the input BatchNorm rescales each
    bin with statistics over the training data, keeping what differs between clips (a per-clip
    normalisation would remove each clip's mean, the very thing mean pooling reads at init).
    Kernel 5 at each stride-2 stage: a 4x stem then sees ~130 ms per token, a syllable, so the
    blocks compose words from pieces that already mean something. The closing BatchNorm centres
    the tokens over the batch, so pooled vectors start apart instead of sharing one offset.
    """

    def __init__(self, n_mels: int, d_model: int, stride: int) -> None:
        super().__init__()
        self.strides = stem_strides(stride)
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        self.input_norm = nn.BatchNorm1d(n_mels)
        channels = n_mels
        for s in self.strides:
            # kernel 2*(s//2)+1 (5 at stride 2) with padding s//2 (+1 at stride 2) gives ceil(T/s)
            # outputs, matching mask[:, ::s]
            kernel = 5 if s == 2 else 2 * (s // 2) + 1
            self.convs.append(nn.Conv1d(channels, d_model, kernel_size=kernel, stride=s,
                                        padding=kernel // 2, bias=False))
            self.norms.append(nn.BatchNorm1d(d_model))
            channels = d_model
        self.proj = nn.Conv1d(d_model, d_model, kernel_size=1, bias=False)
        self.proj_norm = nn.BatchNorm1d(d_model)

    def forward(self, mel: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        x = self.input_norm(mel[:, 0])
        for conv, norm, s in zip(self.convs, self.norms, self.strides):
            if mask is not None:
                x = x * mask[:, None, :].to(x.dtype)
                mask = mask[:, ::s]
            x = F.gelu(norm(conv(x)))
        return self.proj_norm(self.proj(x)).transpose(1, 2), mask


class FeatureStem(nn.Module):
    """Backbone features (B, N, C) -> tokens (B, N, d_model); raw input goes through the backbone."""

    def __init__(self, backbone: Backbone, d_model: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.norm = nn.LayerNorm(backbone.out_dim)
        self.proj = nn.Linear(backbone.out_dim, d_model)
        # Unit-variance tokens from the unit-variance normalised features, as the conv stems give
        # about: the small init of the other projections would let the positions drown them.
        nn.init.normal_(self.proj.weight, std=backbone.out_dim ** -0.5)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        if self.backbone.takes_raw(x):
            x, mask = self.backbone(x, mask)
        return self.proj(self.norm(x)), mask


class Encoder(nn.Module):
    def __init__(self, cfg: Config, stem: nn.Module, depth: int, n_positions: int,
                 learned_positions: bool) -> None:
        super().__init__()
        d = cfg.d_model
        self.stem = stem
        if learned_positions:
            self.positions = nn.Parameter(trunc_normal(torch.empty(n_positions, d)))
        else:
            self.register_buffer("positions", sinusoidal_positions(n_positions, d), persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(NLBlock(cfg) for _ in range(depth))
        self.norm = nn.LayerNorm(d)
        self.pool = AttentionPool(d, cfg.n_heads)
        self.head = nn.Linear(d, cfg.embed_dim, bias=False)
        self.grad_checkpointing = cfg.train.grad_checkpointing

    def tokens(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Stem output (B, N, d) before positions, and the token-level mask (None = all valid)."""
        return self.stem(x, mask)

    def trunk(self, tokens: Tensor, mask: Tensor | None, slots: Tensor | None,
              probe: bool = False) -> tuple[Tensor, Tensor | None]:
        """Token states after the blocks and final norm, plus the last block's read entropy."""
        n = tokens.shape[1]
        if n > self.positions.shape[0]:
            raise NlmmError(f"input gives {n} tokens but the model has {self.positions.shape[0]} "
                            f"positions; shorten the input or raise max_position_embeddings.")
        # The residual stream stays fp32 under autocast (conv stems emit bf16); block outputs
        # are added to it in bf16 -> fp32 promotion, as in nanoGPT.
        x = self.drop(tokens.float() + self.positions[:n])
        entropy = None
        for i, block in enumerate(self.blocks):
            want = probe and i == len(self.blocks) - 1
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x, entropy = checkpoint(block, x, mask, slots, want, use_reentrant=False)
            else:
                x, entropy = block(x, mask, slots, want)
        return self.norm(x), entropy

    def embed(self, states: Tensor, mask: Tensor | None) -> Tensor:
        """(B, N, d) token states -> (B, embed_dim) L2-normalised fp32 embeddings."""
        return F.normalize(self.head(self.pool(states, mask)).float(), dim=-1)


def build_encoder(modality: str, cfg: Config) -> Encoder:
    d = cfg.d_model
    depth = getattr(cfg.depth, modality)
    spec = BackboneSpec.from_config(cfg, modality)
    if spec is not None:
        backbone = Backbone(spec, cfg.data.image_size)
        if modality == "image":
            return Encoder(cfg, FeatureStem(backbone, d), depth, backbone.shape.tokens, True)
        return Encoder(cfg, FeatureStem(backbone, d), depth, cfg.max_position_embeddings, False)
    if modality == "text":
        return Encoder(cfg, TextStem(cfg.vocab_size, d), depth, cfg.max_position_embeddings, True)
    if modality == "image":
        n_patches = (cfg.data.image_size // cfg.patch_size) ** 2
        stem = (ConvImageStem(cfg.patch_size, d, cfg.image_stem) if cfg.conv_stems
                else ImageStem(cfg.patch_size, d))
        return Encoder(cfg, stem, depth, n_patches, True)
    if modality == "audio":
        stem = (ConvAudioStem if cfg.conv_stems else AudioStem)(cfg.data.n_mels, d, cfg.audio_stride)
        return Encoder(cfg, stem, depth, cfg.max_position_embeddings, False)
    raise NlmmError(f"unknown modality {modality!r}; use one of image, text, audio.")
