"""NL-MM: three encoders (text, image, audio) that meet in a shared memory and one embedding space.

Reading order: the state object, the model's construction and initialisation, input checks,
`encode` (one modality to embeddings) and `encode_ttt` (the same after test-time training),
`forward` (a batch to the embeddings and temperature that `ContrastiveLoss` scores), and the
parameter grouping by CMS level that the level optimizer consumes.

Pretrained backbones (`cfg.encoders`) live in the image/audio stems and are part of the state
dict, so a checkpoint carries the exact weights its queries must go through. They are built
with random weights; `load_pretrained_backbones` (which the training worker calls when a run
starts) loads the configured ones, and a checkpoint load replaces them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from nlmm.backbones import Backbone
from nlmm.config import MODALITIES, CMSLevel, Config
from nlmm.errors import NlmmError
from nlmm.model.encoders import FeatureStem, build_encoder
from nlmm.model.layers import trunc_normal
from nlmm.model.losses import INIT_LOGIT_SCALE, ForwardOutput, logit_scale_value
from nlmm.model.memory import SharedMemory
from nlmm.model.ttt import MASK_TOKEN_ID, adapt_and_encode, ssl_loss

if TYPE_CHECKING:
    from nlmm.optim import LevelOptimizer

# Parameters that are looked up or read row by row rather than applied as a linear map.
LOOKUP_TABLES = ("positions", "tokens.weight", "slots", "pool.query")


@dataclass
class NLMMState:
    """Cheap per-forward diagnostics (detached scalars; reading them as floats syncs a GPU).

    memory_entropy: mean entropy (nats) of the last block's shared-memory read, over heads and
        valid tokens, per encoded modality; log(L_mem) means the slots are read uniformly.
    tokens: number of valid tokens that entered each encoder.
    rows: number of rows encoded per modality (audio counts only rows that have audio).
    """

    memory_entropy: dict[str, Tensor] = field(default_factory=dict)
    tokens: dict[str, Tensor] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)


class NLMM(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.memory = SharedMemory(cfg.L_mem, cfg.d_model) if cfg.L_mem > 0 else None
        # Only the towers of the modalities the corpus has: an image-text model carries no
        # untrained audio tower in its checkpoints.
        self.encoders = nn.ModuleDict({m: build_encoder(m, cfg) for m in MODALITIES
                                       if m in cfg.modalities})
        self.logit_scale = nn.Parameter(torch.tensor(INIT_LOGIT_SCALE))
        # Feature stems (with their backbones, whose weights come from load_pretrained) keep
        # their own initialisation.
        own_init = {id(m) for enc in self.encoders.values() if isinstance(enc.stem, FeatureStem)
                    for m in enc.stem.modules()}
        for module in self.modules():
            if id(module) not in own_init:
                self._init_weights(module)
        self._scale_residual_outputs()

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """Linear maps at std 1/sqrt(fan_in), token embeddings at unit scale.

        Adam moves every weight by about lr per step whatever its scale, so the init scale sets
        the relative step: at GPT-2's fixed 0.02, lr 2e-3 rewrites a weight in ten steps, and the
        towers lurched into collapse (every embedding alike, pair losses pinned at ln(batch)).
        At 1/sqrt(fan_in) the same lr changes a 128-wide layer by ~2 % per step. Unit-scale token
        embeddings let a caption's words, not the positions shared by every caption, decide its
        pooled vector at init, so captions start spread apart.
        """
        if isinstance(module, nn.Linear):
            trunc_normal(module.weight, module.weight.shape[1] ** -0.5)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            trunc_normal(module.weight, 1.0)

    def _scale_residual_outputs(self) -> None:
        """Each projection writing into the residual stream gets std 1/sqrt(fan_in · number of
        residual branches of its encoder) (GPT-2's scaled init, on the fan-in base), so the
        stream's variance does not grow with depth. Not zero: every weight then gets a gradient
        from the first step."""
        for encoder in self.encoders.values():
            branches = sum(2 + len(block.cms.levels) for block in encoder.blocks)
            for block in encoder.blocks:
                outs = [block.mixer.out] + [level.mlp.down for level in block.cms.levels]
                if block.memory is not None:
                    outs.append(block.memory.out)
                for linear in outs:
                    trunc_normal(linear.weight, (linear.weight.shape[1] * max(branches, 1)) ** -0.5)

    def memory_slots(self) -> Tensor | None:
        return None if self.memory is None else self.memory.slots

    def backbones(self) -> dict[str, Backbone]:
        """The pretrained backbone of each modality that has one."""
        return {m: enc.stem.backbone for m, enc in self.encoders.items()
                if isinstance(enc.stem, FeatureStem)}

    def load_pretrained_backbones(self, progress: bool = True) -> None:
        """Load every backbone's configured weights (named weights download on first use)."""
        for backbone in self.backbones().values():
            backbone.load_pretrained(progress)

    # ----------------------------------------------------------------------- inputs

    def _checked_backbone_input(self, modality: str, backbone: Backbone, x: Tensor,
                                mask: Tensor | None) -> Tensor | None:
        """Raw input for the backbone or its features; returns the mask (None for images)."""
        name, dim = backbone.spec.name, backbone.out_dim
        if modality == "image":
            size, tokens = self.cfg.data.image_size, backbone.shape.tokens
            if not (x.dim() == 4 and tuple(x.shape[1:]) == (3, size, size)
                    or x.dim() == 3 and tuple(x.shape[1:]) == (tokens, dim)):
                raise NlmmError(f"images must be (batch, 3, {size}, {size}) pixels or (batch, "
                                f"{tokens}, {dim}) {name} features for this model, got "
                                f"{tuple(x.shape)}; prepare the data with this model's config.")
            return None
        if not (x.dim() == 2 and x.is_floating_point() or x.dim() == 3 and x.shape[2] == dim):
            raise NlmmError(f"audio must be (batch, samples) 16 kHz waveforms or (batch, frames, "
                            f"{dim}) {name} features for this model, got {tuple(x.shape)}; "
                            f"prepare the data with this model's config.")
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) if mask is None \
            else mask.bool()

    @property
    def modalities(self) -> tuple[str, ...]:
        """The modalities this model has a tower for, in MODALITIES order."""
        return tuple(m for m in MODALITIES if m in self.encoders)

    def _checked_input(self, modality: str, x: Tensor, mask: Tensor | None) -> Tensor | None:
        """Validate shapes; returns the boolean mask to use (None for images)."""
        cfg = self.cfg
        if modality in MODALITIES and modality not in self.encoders:
            raise NlmmError(f"this model has no {modality} tower: it was trained on "
                            f"{' and '.join(self.modalities)} only.")
        time_axis = -1
        backbone = self.backbones().get(modality)
        if backbone is not None:
            mask = self._checked_backbone_input(modality, backbone, x, mask)
            if mask is None:
                return None
            time_axis = 1
        elif modality == "text":
            if x.dim() != 2 or x.dtype.is_floating_point:
                raise NlmmError(f"text must be (batch, length) integer token ids, got {tuple(x.shape)} "
                                f"{x.dtype}; tokenize it with the run's tokenizer.")
            mask = x != 0 if mask is None else mask.bool()
        elif modality == "image":
            size = cfg.data.image_size
            if x.dim() != 4 or x.shape[1] != 3 or x.shape[2] != size or x.shape[3] != size:
                raise NlmmError(f"images must be (batch, 3, {size}, {size}) for this model, got "
                                f"{tuple(x.shape)}; resize them to data.image_size={size}.")
            return None
        elif modality == "audio":
            if x.dim() != 4 or x.shape[1] != 1 or x.shape[2] != cfg.data.n_mels:
                raise NlmmError(f"audio must be (batch, 1, {cfg.data.n_mels}, frames) log-mel, got "
                                f"{tuple(x.shape)}; compute features with data.n_mels={cfg.data.n_mels}.")
            mask = torch.ones(x.shape[0], x.shape[3], dtype=torch.bool, device=x.device) \
                if mask is None else mask.bool()
        else:
            raise NlmmError(f"unknown modality {modality!r}; use one of image, text, audio.")
        if mask.shape != (x.shape[0], x.shape[time_axis]):
            raise NlmmError(f"{modality} mask has shape {tuple(mask.shape)} but the input needs "
                            f"{(x.shape[0], x.shape[time_axis])}; pass one flag per token/frame.")
        if not bool(mask.any(dim=1).all()):
            raise NlmmError(f"a {modality} row has no valid token/frame; drop such rows before encoding.")
        return mask

    # ----------------------------------------------------------------------- encoding

    def _encode(self, modality: str, x: Tensor, mask: Tensor | None, probe: bool,
                stem: tuple[Tensor, Tensor | None] | None = None
                ) -> tuple[Tensor, Tensor | None, Tensor]:
        """`stem`: `encoder.tokens(x, mask)` when the caller already has it."""
        encoder = self.encoders[modality]
        tokens, token_mask = encoder.tokens(x, mask) if stem is None else stem
        states, entropy = encoder.trunk(tokens, token_mask, self.memory_slots(), probe)
        if token_mask is None:
            n_tokens = torch.tensor(tokens.shape[0] * tokens.shape[1], device=tokens.device)
            mean_entropy = None if entropy is None else entropy.mean()
        else:
            n_tokens = token_mask.sum()
            mean_entropy = None if entropy is None else (entropy * token_mask).sum() / n_tokens
        return encoder.embed(states, token_mask), mean_entropy, n_tokens

    def encode(self, modality: str, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """(B, embed_dim) L2-normalised fp32 embeddings of one modality.

        text: (B, L) ids with mask (B, L) (default: ids != 0); image: (B, 3, S, S);
        audio: (B, 1, n_mels, T) with frame mask (B, T) (default: all frames valid).
        With a backbone (cfg.encoders): image (B, 3, S, S) pixels or (B, N, C) features;
        audio (B, samples) 16 kHz waveform or (B, T, C) features, each with a mask (B, samples
        or T). Raw input goes through the backbone, features straight to the stem.
        """
        mask = self._checked_input(modality, x, mask)
        return self._encode(modality, x, mask, probe=False)[0]

    def encode_ttt(self, modality: str, x: Tensor, mask: Tensor | None = None, *,
                   mask_id: int = MASK_TOKEN_ID) -> Tensor:
        """`encode` after test-time training: per-query low-rank adapters take
        cfg.ttt.max_steps SGD steps of size cfg.ttt.eta on the query's own self-supervised loss
        (text: masked tokens replaced by `mask_id`, the tokenizer's [MASK] id), embed the query,
        and are discarded; the model is left unchanged. Works under torch.no_grad() (gradients
        are enabled inside), not under torch.inference_mode(). See nlmm.model.ttt.
        """
        mask = self._checked_input(modality, x, mask)
        return adapt_and_encode(self, modality, x, mask, steps=self.cfg.ttt.max_steps,
                                eta=self.cfg.ttt.eta, mask_id=mask_id).embeddings

    # ----------------------------------------------------------------------- training forward

    def forward(self, batch: dict[str, Tensor]) -> tuple[ForwardOutput, NLMMState]:
        """Embeddings of every modality in the batch and the temperature, for
        `nlmm.model.losses.ContrastiveLoss` (the loss lives outside the model, so data-parallel
        training can score the embeddings of the global batch).

        Audio is encoded only for rows with `has_audio` (default: rows whose audio_mask has a
        valid frame); `audio_rows` (B,) bool says which rows the audio embeddings belong to.
        Images likewise with `has_image` (default: every row), into `image_rows`.
        `image_ids` defaults to one image per row.

        With `ttt.enable` and `ttt.aux_weight > 0` (joint training for test-time training),
        `loss_ttt` is the self-supervised loss `encode_ttt` minimises at test time (masked tokens
        / masked patches / masked frames, nlmm.model.ttt.ssl_loss), averaged over the modalities
        encoded; it needs the stem outputs, so the forward computes it. Text masks use
        MASK_TOKEN_ID, the [MASK] id of every nlmm tokenizer.
        """
        present = [m for m in self.modalities if m in batch]
        if not present:
            raise NlmmError("the batch holds none of the keys image, text, audio.")
        size = batch[present[0]].shape[0]
        device = batch[present[0]].device
        image_ids = batch.get("image_ids")
        if image_ids is None:
            image_ids = torch.arange(size, device=device)
        state = NLMMState()
        embeddings: dict[str, Tensor] = {}

        row_masks: dict[str, Tensor | None] = {"image": None, "audio": None}
        aux = self.cfg.ttt.enable and self.cfg.ttt.aux_weight > 0
        ssl: dict[str, Tensor] = {}
        for modality in present:
            x, mask = batch[modality], batch.get(f"{modality}_mask")
            if modality in row_masks:
                # rows without this modality (a clip has no image, a caption no reading) are
                # padding: encoded nowhere, and left out of the pairs that need them
                rows = batch.get(f"has_{modality}")
                if rows is None and modality == "audio":
                    rows = mask.bool().any(dim=1) if mask is not None else None
                if rows is not None:
                    rows = rows.bool()
                    row_masks[modality] = rows
                    x = x[rows]
                    mask = None if mask is None else mask[rows]
                    if x.shape[0] == 0:
                        continue
            mask = self._checked_input(modality, x, mask)
            stem = self.encoders[modality].tokens(x, mask)
            emb, entropy, n_tokens = self._encode(modality, x, mask, probe=True, stem=stem)
            if aux:
                # the test-time objective, on this batch's corrupted inputs (nlmm.model.ttt)
                ssl[modality] = ssl_loss(self, modality, x, mask, tokens=stem)
            embeddings[modality] = emb
            state.rows[modality] = x.shape[0]
            state.tokens[modality] = n_tokens.detach()
            if entropy is not None:
                state.memory_entropy[modality] = entropy.detach()

        loss_ttt = torch.stack(list(ssl.values())).mean() if ssl else None
        return ForwardOutput(embeddings, image_ids, row_masks["audio"],
                             logit_scale_value(self.logit_scale), loss_ttt,
                             row_masks["image"]), state

    # ----------------------------------------------------------------------- optimisation

    def level_params(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by CMS level name; everything outside the CMS chains (stems,
        mixers, memory, norms, heads, temperature) goes to the fastest level, and an unfrozen
        backbone to its own level `backbone_<modality>` (see `backbone_levels`). Adapters and
        frozen backbones are not trainable and are left out. With `cms_gains: fast` the
        LayerScale gain of every CMS level goes to the fastest level too (stepped every step)."""
        levels = self.cfg.cms_levels
        fastest = min(levels, key=lambda level: level.chunk_size).name
        owner: dict[int, str] = {}
        groups: dict[str, list[nn.Parameter]] = {level.name: [] for level in levels}
        for modality, backbone in self.backbones().items():
            if not backbone.spec.frozen:
                groups[f"backbone_{modality}"] = []
                for p in backbone.parameters():
                    owner[id(p)] = f"backbone_{modality}"
        gains_fast = self.cfg.cms_gains == "fast"
        for encoder in self.encoders.values():
            for block in encoder.blocks:
                for name, level in zip(block.cms.names, block.cms.levels):
                    for p in level.parameters():
                        owner[id(p)] = name
                    if gains_fast and level.scale.gain is not None:
                        owner[id(level.scale.gain)] = fastest
        for p in self.parameters():
            if p.requires_grad:
                groups[owner.get(id(p), fastest)].append(p)
        return groups

    def backbone_levels(self, cfg: Config) -> list[CMSLevel]:
        """One extra level per unfrozen backbone: the fastest level's optimizer and weight decay,
        stepped every step, at its lr times `encoders.<modality>.lr_scale` (pretrained weights
        need far smaller steps than the freshly initialised layers on top of them)."""
        fastest = min(cfg.cms_levels, key=lambda level: level.chunk_size)
        return [CMSLevel(f"backbone_{m}", 1, fastest.lr * b.spec.lr_scale, fastest.optimizer,
                         fastest.weight_decay)
                for m, b in self.backbones().items() if not b.spec.frozen]

    def no_weight_decay(self) -> set[str]:
        """Names of the parameters that take no weight decay (open_clip's and nanoGPT's rule):
        vectors (norm gains, biases, the temperature) and lookup tables (token embeddings,
        positions, memory slots, pooling queries). Decay would only pull them toward zero: a
        shrunk norm gain or position table changes what the model computes, not its capacity."""
        return {name for name, p in self.named_parameters()
                if p.ndim < 2 or name.endswith(LOOKUP_TABLES)}

    def no_muon(self) -> set[str]:
        """Names of the matrices that take Muon's AdamW path instead of orthogonalised updates.

        Orthogonalised updates suit weight matrices that map features to features; lookup
        tables and output heads keep Adam-style per-entry steps, as in the Muon reference setup.
        (Vectors take the AdamW path anyway.)"""
        return {name for name, p in self.named_parameters()
                if p.ndim >= 2 and name.endswith(LOOKUP_TABLES + ("head.weight",))}

    def configure_optimizers(self, cfg: Config) -> LevelOptimizer:
        """The per-level multi-frequency optimizer of the model's parameter groups. Reads
        nothing from disk: pretrained backbone weights are loaded by
        `load_pretrained_backbones`, which the caller runs."""
        from nlmm.optim import LevelOptimizer, exclude_from_muon

        named = dict(self.named_parameters())
        exclude_from_muon(*(named[name] for name in self.no_muon()))
        no_decay = [named[name] for name in self.no_weight_decay()]
        return LevelOptimizer.from_config(self.level_params(), cfg, self.backbone_levels(cfg),
                                          no_decay)
