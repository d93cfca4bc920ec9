"""Pretrained image and speech networks in front of the NL-MM encoders.

A `Backbone` wraps a torchvision classifier or a torchaudio speech model and turns raw input
into a sequence of feature tokens:
- ResNet family: the feature map of stage `layer` (1-4), flattened to (B, H*W, C);
- ViT family: the patch tokens after encoder block `layer` (class token dropped), (B, N, C);
- speech (wav2vec2, HuBERT, WavLM): the output of transformer layer `layer` over the raw 16 kHz
  waveform, (B, T, C) at 50 frames per second, with its frame mask.
Everything after the chosen layer (later stages or blocks, classifier heads) is removed, so it
costs neither compute nor checkpoint space.

Construction builds the architecture with random weights and never downloads.
`load_pretrained()` then loads the configured weights: the library's named weights through
torch.hub's cache (downloaded on first use; offline, an NlmmError names the file to fetch and
the folder to put it in) or a local state-dict file, checked against the full architecture.
"""

from __future__ import annotations

import hashlib
import http.client
import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nlmm.config import (AUDIO_BACKBONES, BACKBONE_SAMPLE_RATE, IMAGE_BACKBONES, Config,
                         EncodersConfig, weights_is_file)
from nlmm.errors import NlmmError

TORCHAUDIO_MODELS_URL = "https://download.pytorch.org/torchaudio/models"
NAMED_SPEECH_WEIGHTS = "DEFAULT"
# wav2vec2_tiny: the WAV2VEC2_LARGE_LV60K layout (layer-norm feature extractor, pre-norm
# transformer) shrunk to 32 conv channels, 2 layers of width 64, so it runs anywhere.
TINY_WAV2VEC2: dict[str, Any] = {
    "extractor_mode": "layer_norm",
    "extractor_conv_layer_config": [(32, 10, 5)] + [(32, 3, 2)] * 4 + [(32, 2, 2)] * 2,
    "extractor_conv_bias": True, "encoder_embed_dim": 64, "encoder_projection_dropout": 0.1,
    "encoder_pos_conv_kernel": 16, "encoder_pos_conv_groups": 4, "encoder_num_layers": 2,
    "encoder_num_heads": 2, "encoder_attention_dropout": 0.1, "encoder_ff_interm_features": 128,
    "encoder_ff_interm_dropout": 0.0, "encoder_dropout": 0.1, "encoder_layer_norm_first": True,
    "encoder_layer_drop": 0.0, "aux_num_out": None,
}
WAVE_NORM_EPS = 1e-5  # F.layer_norm's default, as torchaudio's waveform normalisation uses


@dataclass(frozen=True)
class BackboneSpec:
    """One configured backbone: `layer` is resolved (1-based), never None."""

    modality: str
    name: str
    weights: str
    layer: int
    frozen: bool
    lr_scale: float

    @staticmethod
    def from_config(cfg: Config, modality: str) -> BackboneSpec | None:
        return BackboneSpec.from_encoders(cfg.encoders, modality)

    @staticmethod
    def from_encoders(encoders: EncodersConfig, modality: str) -> BackboneSpec | None:
        section = encoders.backbone(modality)
        if section is None:
            return None
        known = IMAGE_BACKBONES if modality == "image" else AUDIO_BACKBONES
        return BackboneSpec(modality, section.backbone, section.weights.strip(),
                            section.layer or known[section.backbone], section.frozen,
                            section.lr_scale)

    @property
    def key(self) -> str:
        """The config section, for messages."""
        return f"encoders.{self.modality}"

    @property
    def is_vit(self) -> bool:
        return self.name.startswith("vit_")


@dataclass(frozen=True)
class SpeechRecipe:
    factory: Callable[..., nn.Module]
    params: dict[str, Any]
    url: str | None  # the named weights, None when there are none
    normalize_waveform: bool  # the model was trained on per-clip standardised waveforms


def speech_recipe(name: str) -> SpeechRecipe:
    """How torchaudio builds the speech model `name` (a pipeline's architecture and weights URL)."""
    # Imported on use, like torchvision: a model without a speech backbone never needs it.
    import torchaudio
    from torchaudio.models import wav2vec2_model, wavlm_model

    if name == "wav2vec2_tiny":
        return SpeechRecipe(wav2vec2_model, dict(TINY_WAV2VEC2), None, False)
    bundle = getattr(torchaudio.pipelines, name)
    factory = wavlm_model if bundle._model_type == "WavLM" else wav2vec2_model
    url = bundle._path if bundle._path.startswith("https") else f"{TORCHAUDIO_MODELS_URL}/{bundle._path}"
    return SpeechRecipe(factory, dict(bundle._params), url, bool(bundle._normalize_waveform))


# --------------------------------------------------------------------------- architecture

def build_full_network(spec: BackboneSpec) -> nn.Module:
    """The library's whole architecture with random weights (nothing is downloaded)."""
    if spec.modality == "image":
        # Imported on use: torchvision costs a second at import, and only backbones need it.
        import torchvision

        return torchvision.models.get_model(spec.name, weights=None)
    recipe = speech_recipe(spec.name)
    return recipe.factory(**recipe.params)


def truncate(net: nn.Module, spec: BackboneSpec) -> nn.Module:
    """Drop what comes after `spec.layer` (later stages or blocks, heads); returns `net`."""
    if spec.modality == "audio":
        net.encoder.transformer.layers = net.encoder.transformer.layers[:spec.layer]
        net.aux = None
    elif spec.is_vit:
        net.encoder.layers = net.encoder.layers[:spec.layer]
        net.encoder.ln = nn.Identity()
        net.heads = nn.Identity()
    else:
        for stage in range(spec.layer + 1, 5):
            setattr(net, f"layer{stage}", nn.Identity())
        net.avgpool, net.fc = nn.Identity(), nn.Identity()
    return net


def _standardise(wave: Tensor, mask: Tensor | None) -> Tensor:
    """Zero mean, unit variance per clip over its valid samples (padding stays zero)."""
    if mask is None:
        return F.layer_norm(wave, wave.shape[-1:], eps=WAVE_NORM_EPS)
    m = mask.to(wave.dtype)
    count = m.sum(dim=1, keepdim=True).clamp(min=1)
    mean = (wave * m).sum(dim=1, keepdim=True) / count
    var = ((wave - mean).pow(2) * m).sum(dim=1, keepdim=True) / count
    return (wave - mean) * torch.rsqrt(var + WAVE_NORM_EPS) * m


def extract(net: nn.Module, spec: BackboneSpec, normalize_waveform: bool, x: Tensor,
            mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Feature tokens (B, N, C) after layer `spec.layer`, and their mask (None: all valid).

    image: x (B, 3, H, W) normalised pixels; audio: x (B, T) 16 kHz waveform with a sample
    mask (B, T) (None: every sample valid).
    """
    if spec.modality == "audio":
        lengths = None if mask is None else mask.sum(dim=1)
        wave = _standardise(x, mask) if normalize_waveform else x
        layers, out_lengths = net.extract_features(wave, lengths, num_layers=spec.layer)
        frames = layers[-1]
        if out_lengths is None:
            return frames, None
        return frames, torch.arange(frames.shape[1], device=frames.device) < out_lengths[:, None]
    if spec.is_vit:
        tokens = net._process_input(x)
        cls = net.class_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + net.encoder.pos_embedding
        tokens = net.encoder.dropout(tokens)
        for block in net.encoder.layers[:spec.layer]:
            tokens = block(tokens)
        return tokens[:, 1:], None
    fmap = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    for stage in range(1, spec.layer + 1):
        fmap = getattr(net, f"layer{stage}")(fmap)
    return fmap.flatten(2).transpose(1, 2), None


@dataclass(frozen=True)
class FeatureShape:
    tokens: int | None  # image: tokens per image; audio: None (it follows the clip's length)
    dim: int


def feature_shape(spec: BackboneSpec, image_size: int) -> FeatureShape:
    """Shape of the features, from a dry run on the meta device (no memory, no compute)."""
    with torch.device("meta"):
        net = truncate(build_full_network(spec), spec).eval()
        if spec.modality == "image":
            out, _ = extract(net, spec, False, torch.empty(1, 3, image_size, image_size), None)
            return FeatureShape(out.shape[1], out.shape[2])
        out, _ = extract(net, spec, False, torch.empty(1, BACKBONE_SAMPLE_RATE), None)
        return FeatureShape(None, out.shape[2])


class Backbone(nn.Module):
    """A truncated pretrained network: raw input -> feature tokens (see the module docstring).

    A frozen backbone has no trainable parameters, runs without autograd and stays in eval
    mode (batch-norm statistics and dropout as pretrained) whatever mode the model is put in.
    """

    def __init__(self, spec: BackboneSpec, image_size: int) -> None:
        super().__init__()
        self.spec = spec
        self.net = truncate(build_full_network(spec), spec)
        self.normalize_waveform = spec.modality == "audio" and speech_recipe(spec.name).normalize_waveform
        self.shape = feature_shape(spec, image_size)
        if spec.frozen:
            self.net.requires_grad_(False)
            self.net.eval()

    @property
    def out_dim(self) -> int:
        return self.shape.dim

    @property
    def pads_exactly(self) -> bool:
        """Whether a padded batch gives each item exactly its unpadded features. Images never
        pad; a speech model with a group-norm feature extractor normalises over the padding
        too (wav2vec2/HuBERT/WavLM base), one with a layer-norm extractor does not."""
        return self.spec.modality == "image" or \
            speech_recipe(self.spec.name).params["extractor_mode"] == "layer_norm"

    def takes_raw(self, x: Tensor) -> bool:
        """True for pixels (B, 3, H, W) or waveforms (B, T); features are (B, N, C)."""
        return x.dim() == (4 if self.spec.modality == "image" else 2)

    def forward(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.spec.frozen):
            return extract(self.net, self.spec, self.normalize_waveform, x, mask)

    def train(self, mode: bool = True) -> Backbone:
        super().train(mode)
        if self.spec.frozen:
            self.net.eval()
        return self

    def load_pretrained(self, progress: bool = True) -> None:
        """Load the configured weights into the network (see `pretrained_state_dict`)."""
        state = pretrained_state_dict(self.spec, progress)
        own = self.net.state_dict()
        self.net.load_state_dict({k: state[k] for k in own}, strict=True)


# --------------------------------------------------------------------------- weights

def named_weights_url(spec: BackboneSpec) -> str:
    """URL of the library's named weights `spec.weights` of `spec.name`."""
    if spec.modality == "image":
        import torchvision

        enum = torchvision.models.get_model_weights(spec.name)
        try:
            return enum[spec.weights].url
        except KeyError:
            raise NlmmError(f"{spec.name} has no weights named {spec.weights!r}; set "
                            f"{spec.key}.weights to one of {', '.join(enum.__members__)} or to a "
                            f"state-dict file path.") from None
    url = speech_recipe(spec.name).url
    if url is None:
        raise NlmmError(f"{spec.name} has no named weights; set {spec.key}.weights to a "
                        f"state-dict file path.")
    if spec.weights not in (NAMED_SPEECH_WEIGHTS, spec.name):
        raise NlmmError(f"{spec.name} has one set of named weights, {NAMED_SPEECH_WEIGHTS}; set "
                        f"{spec.key}.weights to {NAMED_SPEECH_WEIGHTS} or to a state-dict file "
                        f"path, not {spec.weights!r}.")
    return url


def weights_file(spec: BackboneSpec) -> Path:
    path = Path(spec.weights).expanduser()
    if not path.is_file():
        raise NlmmError(f"{spec.key}.weights file {path} does not exist; save the {spec.name} "
                        f"state dict there or name the library's weights (e.g. DEFAULT).")
    return path.resolve()


def file_sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def weights_identity(spec: BackboneSpec) -> str:
    """What the weights are: the named weights' URL, or the SHA-256 of the file's bytes (so an
    edited file counts as other weights, a moved one as the same)."""
    if weights_is_file(spec.weights):
        return f"sha256:{file_sha256(weights_file(spec))}"
    return named_weights_url(spec)


def download_named_weights(spec: BackboneSpec, progress: bool = True) -> Mapping[str, Tensor]:
    """The named weights from torch.hub's cache, downloaded there first when absent."""
    url = named_weights_url(spec)
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=progress,
                                                  check_hash=True, weights_only=True)
    except (OSError, http.client.HTTPException) as exc:
        raise NlmmError(f"cannot download the {spec.name} weights ({exc}); fetch {url} and put "
                        f"the file in {folder}/, or set {spec.key}.weights to a local "
                        f"state-dict file.") from None
    except (RuntimeError, pickle.UnpicklingError, EOFError) as exc:
        raise NlmmError(f"the {spec.name} weights in {folder / url.rsplit('/', 1)[-1]} are "
                        f"damaged ({str(exc).splitlines()[0]}); delete that file so it is "
                        f"downloaded again.") from None


def read_state_dict(path: Path, spec: BackboneSpec) -> Mapping[str, Tensor]:
    """A state dict saved with torch.save (.pt/.pth/...) or safetensors (.safetensors)."""
    hint = f"save one with torch.save({spec.name}.state_dict(), path)"
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types for a file that is not its format
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise NlmmError(f"{spec.key}.weights file {path} is not a readable state dict ({first}); "
                        f"{hint}.") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise NlmmError(f"{spec.key}.weights file {path} holds no state dict (a mapping of "
                        f"parameter names to tensors); {hint}.")
    return state


def check_fits(state: Mapping[str, Tensor], spec: BackboneSpec, source: str) -> None:
    """Raise when `state` is not exactly a state dict of the full `spec.name` architecture."""
    with torch.device("meta"):
        expected = build_full_network(spec).state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        example = (missing or unexpected or wrong)[0]
        raise NlmmError(f"{source} does not hold {spec.name} weights ({len(missing)} missing, "
                        f"{len(unexpected)} unexpected and {len(wrong)} wrongly shaped tensors, "
                        f"e.g. {example!r}); point {spec.key}.weights at a {spec.name} state dict.")


def pretrained_state_dict(spec: BackboneSpec, progress: bool = True) -> Mapping[str, Tensor]:
    """The configured weights of the full architecture, checked to fit it."""
    if weights_is_file(spec.weights):
        path = weights_file(spec)
        state, source = read_state_dict(path, spec), f"{spec.key}.weights file {path}"
    else:
        state, source = download_named_weights(spec, progress), f"the {spec.weights} weights"
    check_fits(state, spec, source)
    return state
