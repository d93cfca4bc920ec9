"""Typed configuration: dataclasses, YAML loading, `--set key.sub=value` overrides, validation.

The model's hyper-parameters sit at the top level so that the original guide's flat config
(`d_model`, `n_heads`, `cms_levels`, ...) loads exactly as written; `data:` and `train:` are
structured sections that add what the flat form lacks.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from nlmm.errors import NlmmError

OPTIMIZERS = ("adamw", "sgd", "dmgd", "muon", "universal_anderson")
MODALITIES = ("image", "text", "audio")
PAIRS = ("i2t", "i2a", "t2a")

# Pretrained backbones that can sit in front of an encoder, with how many layers each offers to
# `encoders.<modality>.layer` (ResNet stages, ViT blocks, speech transformer layers). Kept here,
# free of torch imports, so configs validate without loading torchvision or torchaudio.
IMAGE_BACKBONES = {
    "resnet18": 4, "resnet34": 4, "resnet50": 4, "resnet101": 4, "resnet152": 4,
    "resnext50_32x4d": 4, "resnext101_32x8d": 4, "wide_resnet50_2": 4, "wide_resnet101_2": 4,
    "vit_b_16": 12, "vit_b_32": 12, "vit_l_16": 24, "vit_l_32": 24,
}
AUDIO_BACKBONES = {
    "WAV2VEC2_BASE": 12, "WAV2VEC2_LARGE": 24, "WAV2VEC2_LARGE_LV60K": 24, "WAV2VEC2_XLSR53": 24,
    "WAV2VEC2_XLSR_300M": 24, "HUBERT_BASE": 12, "HUBERT_LARGE": 24, "HUBERT_XLARGE": 48,
    "WAVLM_BASE": 12, "WAVLM_BASE_PLUS": 12, "WAVLM_LARGE": 24,
    # A 2-layer, 64-wide wav2vec2 without named weights (a local file only): CPU smoke runs, tests.
    "wav2vec2_tiny": 2,
}
NO_NAMED_WEIGHTS = ("wav2vec2_tiny",)
WEIGHT_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
VIT_IMAGE_SIZE = 224  # torchvision's ViT weights have position embeddings for 224 px only
BACKBONE_SAMPLE_RATE = 16000  # every torchaudio speech backbone was trained on 16 kHz audio


class ConfigError(NlmmError, ValueError):
    """A config problem, phrased as one sentence that names the key and the file."""


def _f(default: Any = dataclasses.MISSING, *, min: float | None = None, max: float | None = None,
       choices: tuple[Any, ...] | None = None, help: str = "", factory: Any = None) -> Any:
    meta = {"min": min, "max": max, "choices": choices, "help": help}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class CMSLevel:
    name: str = _f("fast", help="level name, used in metrics (lr/<name>)")
    chunk_size: int = _f(1, min=1, help="update this level every chunk_size global steps")
    lr: float = _f(1e-3, min=0.0, help="learning rate of this level")
    optimizer: str = _f("adamw", choices=OPTIMIZERS)
    weight_decay: float = _f(0.01, min=0.0)
    # CLIP's β2: the second-moment estimate follows the gradient scale within ~50 steps instead
    # of ~1000, which keeps early contrastive training (fast-changing gradient scales) stable
    beta2: float = _f(0.98, min=0.0, max=0.99999,
                      help="Adam β2 of this level's adamw, muon or universal_anderson "
                           "(sgd and dmgd have none)")


@dataclass
class Depth:
    text: int = _f(2, min=0)
    image: int = _f(2, min=0)
    audio: int = _f(2, min=0)


@dataclass
class TTTConfig:
    enable: bool = _f(False, help="adapt low-rank adapters at evaluation/search time")
    eta: float = _f(1e-3, min=0.0)
    max_steps: int = _f(3, min=0)
    adapter_rank: int = _f(8, min=1)
    aux_weight: float = _f(0.1, min=0.0,
                           help="with enable: weight of the self-supervised loss TTT adapts on, "
                                "trained jointly with the contrastive loss (logged as loss_ttt) "
                                "so that its gradient is informative at test time; 0: off")


@dataclass
class PrecisionConfig:
    amp: str = _f("bf16", choices=("none", "bf16", "fp16"), help="autocast dtype on CUDA")
    grad_clip: float = _f(1.0, min=0.0, help="max global grad norm per level; 0 disables")
    tf32: bool = _f(True, help="on CUDA with amp none: the training step's fp32 matmuls and "
                               "convolutions on TF32 tensor cores (false: full fp32)")


@dataclass
class AugmentConfig:
    crop: bool = _f(True, help="random-resized crop (area 0.7-1) of training images")
    flip: bool = _f(False, help="horizontal flip of training images; it swaps left and right, "
                                "so it teaches wrong pairings when captions name sides")


@dataclass
class DataConfig:
    image_size: int = _f(224, min=16, help="side of the square images in the cache")
    sample_rate: int = _f(16000, min=8000)
    n_mels: int = _f(80, min=8)
    win_length: int = _f(400, min=16, help="STFT window in samples (25 ms at 16 kHz)")
    hop_length: int = _f(160, min=1, help="STFT hop in samples (10 ms at 16 kHz)")
    max_audio_seconds: float = _f(10.0, min=0.5)
    text_max_len: int = _f(64, min=4)
    augment: AugmentConfig = _f(factory=AugmentConfig,
                                help="image augmentation of training batches; true/false set both")

    @property
    def max_audio_samples(self) -> int:
        return int(round(self.max_audio_seconds * self.sample_rate))

    def mel_frames(self, n_samples: int) -> int:
        """Log-mel frames of a clip of `n_samples` once cut to max_audio_seconds (the centred
        STFT: one frame a hop, plus one)."""
        return 1 + min(n_samples, self.max_audio_samples) // self.hop_length


@dataclass
class TrainConfig:
    epochs: int = _f(30, min=1)
    batch_size: int = _f(32, min=2)
    lr: float | None = _f(None, min=0.0, help="lr of the fastest level; others keep their ratio")
    optimizer: str | None = _f(None, choices=OPTIMIZERS + (None,), help="one optimizer for all levels")
    schedule: str = _f("cosine", choices=("cosine", "constant"))
    warmup_steps: int = _f(100, min=0)
    accumulate: int = _f(1, min=1, help="micro-batches per optimizer step")
    eval_every: int = _f(1, min=1, help="evaluate every N epochs")
    eval_split: str = _f("dev", choices=("dev", "test"))
    checkpoint_every: int = _f(0, min=0, help="also keep a checkpoint every N epochs (0: only last/best)")
    checkpoint_minutes: float = _f(10.0, min=0.0, help="also write last.pt after this many minutes "
                                                       "of training since the last one (0: only at "
                                                       "epoch ends and stops)")
    seed: int = _f(0)
    prefetch_batches: int = _f(0, min=0, help="batches the prepared cache's loader thread "
                                              "gathers ahead (0: 2)")
    loader_workers: int = _f(0, min=0, help="processes per rank that decode a pack's samples "
                                            "(0: 2); the prepared cache needs none")
    samples_per_epoch: int | None = _f(None, min=1, help="a pack's epoch as a sample budget, so "
                                                          "a 3M-sample corpus reports and "
                                                          "checkpoints every N samples (null: "
                                                          "the whole train split)")
    grad_checkpointing: bool = _f(False)
    compile: bool = _f(False, help="torch.compile each encoder's stem and NL blocks for training "
                                   "(the first steps compile, on a GPU for minutes); where it "
                                   "fails, training goes on eagerly after a warning")
    channels_last: bool = _f(True, help="on CUDA: the conv image stem in NHWC (channels_last) "
                                        "memory layout, cuDNN's fastest for convolutions")
    loss_weights: dict[str, float] = _f(factory=lambda: {"i2t": 1.0, "i2a": 1.0, "t2a": 1.0})
    log_every: int = _f(10, min=1, help="write step metrics every N steps")
    mirrors: list[str] = _f(factory=list, help="also log to: tensorboard, wandb")


def weights_is_file(weights: str) -> bool:
    """True when `encoders.<m>.weights` names a file rather than the library's named weights."""
    text = weights.strip()
    return ("/" in text or "\\" in text or text.startswith(("~", "."))
            or text.lower().endswith(WEIGHT_FILE_SUFFIXES))


@dataclass
class BackboneConfig:
    backbone: str = _f("none", help="pretrained network in front of this encoder (none: the "
                                    "NL-MM stem alone)")
    weights: str = _f("DEFAULT", help="the library's named weights (DEFAULT, IMAGENET1K_V2, ...; "
                                      "downloaded on first use) or a state-dict file path")
    frozen: bool = _f(True, help="true: features computed once by `nlmm data prepare` and cached; "
                                 "false: the backbone trains end to end")
    layer: int | None = _f(None, min=1, help="ResNet stage / ViT block / speech transformer layer "
                                             "whose output is used; null: the last")
    lr_scale: float = _f(0.1, min=0.0, help="unfrozen backbone: its lr is the fastest level's lr "
                                            "times this")


@dataclass
class EncodersConfig:
    image: BackboneConfig = _f(factory=BackboneConfig)
    audio: BackboneConfig = _f(factory=BackboneConfig)

    def backbone(self, modality: str) -> BackboneConfig | None:
        """The backbone section of `modality`, or None when it has no backbone."""
        section = getattr(self, modality, None)
        return section if section is not None and section.backbone != "none" else None


def _default_levels() -> list[CMSLevel]:
    return [CMSLevel("fast", 1, 1e-3), CMSLevel("mid", 8, 5e-4), CMSLevel("slow", 32, 2.5e-4)]


@dataclass
class Config:
    d_model: int = _f(256, min=8)
    n_heads: int = _f(4, min=1)
    ffn_mult: int = _f(4, min=1)
    L_mem: int = _f(16, min=0, help="slots of the shared multimodal memory")
    depth: Depth = _f(factory=Depth)
    cms_levels: list[CMSLevel] = _f(factory=_default_levels)
    ttt: TTTConfig = _f(factory=TTTConfig)
    precision: PrecisionConfig = _f(factory=PrecisionConfig)
    max_position_embeddings: int = _f(512, min=8)
    vocab_size: int = _f(8000, min=64, help="upper bound of the BPE vocabulary")
    train_steps: int | None = _f(None, min=1, help="stop after this many optimizer steps")
    embed_dim: int = _f(256, min=8, help="width of the shared retrieval space")
    mixer: str = _f("softmax", choices=("softmax", "linear"))
    linear_chunk: int = _f(64, min=1, help="chunk length of the parallel linear attention")
    patch_size: int = _f(16, min=2)
    cms_lr_scaling: str = _f("none", choices=("none", "sqrt", "chunk"),
                             help="multiply a level's lr by 1, sqrt(chunk_size) or chunk_size when "
                                  "its optimizer normalises the step (adamw, muon, "
                                  "universal_anderson); meant for cms_chunk_rule gradients")
    cms_chunk_rule: str = _f("updates", choices=("updates", "gradients"),
                             help="how a level with chunk_size C > 1 moves (Nested Learning Eq. 31): "
                                  "updates = by the sum of its optimizer's C per-step updates, "
                                  "each on the step's clipped gradient at the chunk-start weights; "
                                  "gradients = one optimizer step on the chunk's summed gradient "
                                  "(the rule before, for ablations)")
    cms_gains: str = _f("fast", choices=("fast", "level"),
                        help="which optimizer steps the LayerScale gain of every CMS level: the "
                             "fastest level's, every step (fast: a slow level's branch opens "
                             "from the start) or its own level's, once per chunk (level)")
    layer_scale_init: float | None = _f(0.0, min=0.0, help="initial LayerScale gain of every "
                                        "residual branch of the NL blocks; null: no gains")
    conv_stems: bool = _f(True, help="true: BatchNorm conv stems (image: stride-2 3x3 stages; "
                                     "audio: per-clip normalised log-mel, stride-2 stages); "
                                     "false: one patchify layer and plain strided audio convs")
    image_stem: str = _f("pool", choices=("pool", "stride"),
                         help="conv image stem stages (with conv_stems): pool = stride-1 3x3 conv "
                              "then max-pool; stride = one strided 3x3 conv (cheaper, learns "
                              "slower)")
    audio_stride: int = _f(4, min=1, help="time subsampling of mel frames by the audio stem")
    dropout: float = _f(0.0, min=0.0, max=1.0)
    modalities: list[str] = _f(factory=lambda: list(MODALITIES),
                               help="towers the model builds; a run keeps those its corpus has "
                                    "(image-text, text-audio or all three)")
    data: DataConfig = _f(factory=DataConfig)
    train: TrainConfig = _f(factory=TrainConfig)
    encoders: EncodersConfig = _f(factory=EncodersConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self, source: str = "<config>") -> None:
        """Cross-field checks that a single field's range cannot express."""
        if self.d_model % self.n_heads:
            raise ConfigError(f"{source}: d_model={self.d_model} must be divisible by n_heads="
                              f"{self.n_heads}; pick values such as d_model=256, n_heads=4.")
        if not self.cms_levels:
            raise ConfigError(f"{source}: cms_levels must list at least one level.")
        names = [lvl.name for lvl in self.cms_levels]
        if len(set(names)) != len(names):
            raise ConfigError(f"{source}: cms_levels names must be unique, got {names}.")
        if self.encoders.backbone("image") is None and self.data.image_size % self.patch_size:
            raise ConfigError(f"{source}: data.image_size={self.data.image_size} must be a multiple "
                              f"of patch_size={self.patch_size}.")
        self._validate_backbones(source)
        for mirror in self.train.mirrors:
            if mirror not in ("tensorboard", "wandb"):
                raise ConfigError(f"{source}: train.mirrors holds {mirror!r}; allowed: "
                                  "tensorboard, wandb.")
        unknown = [m for m in self.modalities if m not in MODALITIES]
        if unknown or len(set(self.modalities)) < 2:
            raise ConfigError(f"{source}: modalities must name at least two of "
                              f"{', '.join(MODALITIES)}, got {self.modalities}.")
        bad = set(self.train.loss_weights) - set(PAIRS)
        if bad:
            raise ConfigError(f"{source}: train.loss_weights has unknown pair {sorted(bad)[0]!r}; "
                              f"allowed: {', '.join(PAIRS)}.")

    def _validate_backbones(self, source: str) -> None:
        for modality, known in (("image", IMAGE_BACKBONES), ("audio", AUDIO_BACKBONES)):
            section = self.encoders.backbone(modality)
            if section is None:
                continue
            key = f"encoders.{modality}"
            if section.backbone not in known:
                raise ConfigError(f"{source}: {key}.backbone must be none or one of "
                                  f"{', '.join(known)}, got {section.backbone!r}.")
            layers = known[section.backbone]
            if section.layer is not None and section.layer > layers:
                raise ConfigError(f"{source}: {key}.layer={section.layer} but {section.backbone} "
                                  f"has {layers} layers; pick 1-{layers}, or null for the last.")
            if not section.weights.strip():
                raise ConfigError(f"{source}: {key}.weights is empty; name the library's weights "
                                  f"(e.g. DEFAULT) or give a state-dict file path.")
            if section.backbone in NO_NAMED_WEIGHTS and not weights_is_file(section.weights):
                raise ConfigError(f"{source}: {section.backbone} has no named weights, so {key}."
                                  f"weights must be a state-dict file path, got "
                                  f"{section.weights!r}.")
        image = self.encoders.backbone("image")
        if image is not None and image.backbone.startswith("vit") \
                and self.data.image_size != VIT_IMAGE_SIZE:
            raise ConfigError(f"{source}: encoders.image.backbone={image.backbone} takes "
                              f"{VIT_IMAGE_SIZE} px images but data.image_size="
                              f"{self.data.image_size}; set data.image_size: {VIT_IMAGE_SIZE}.")
        if self.encoders.backbone("audio") is not None \
                and self.data.sample_rate != BACKBONE_SAMPLE_RATE:
            raise ConfigError(f"{source}: encoders.audio.backbone needs {BACKBONE_SAMPLE_RATE} Hz "
                              f"audio but data.sample_rate={self.data.sample_rate}; set "
                              f"data.sample_rate: {BACKBONE_SAMPLE_RATE}.")


# --------------------------------------------------------------------------- building

def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return "a list"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false",
            type(None): "null"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError:
                pass
        raise ConfigError(f"{source}: {key} must be {_type_name(tp)}, got {value!r}.")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key} must be a mapping, got {value!r}.")
        return _build(tp, value, source, prefix=key + ".")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key} must be a list, got {value!r}.")
        return [_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        _, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key} must be a mapping, got {value!r}.")
        return {str(k): _coerce(v, val_tp, f"{key}.{k}", source) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{source}: {key} must be {_type_name(tp)}, got {value!r}.")


def _build(cls: type, raw: dict[str, Any], source: str, prefix: str = "") -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in fields:
            near = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean '{prefix}{near[0]}'?)" if near else \
                f"; allowed keys: {', '.join(prefix + n for n in fields)}"
            raise ConfigError(f"{source}: unknown key '{prefix}{key}'{hint}.")
    kwargs = {}
    for name, fld in fields.items():
        if name not in raw:
            continue
        key = prefix + name
        value = _coerce(raw[name], hints[name], key, source)
        meta = fld.metadata
        if meta.get("choices") is not None and value not in meta["choices"]:
            allowed = ", ".join(str(c) for c in meta["choices"] if c is not None)
            raise ConfigError(f"{source}: {key} must be one of {allowed}, got {value!r}.")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if meta.get("min") is not None and value < meta["min"]:
                raise ConfigError(f"{source}: {key} must be >= {meta['min']}, got {value!r}.")
            if meta.get("max") is not None and value > meta["max"]:
                raise ConfigError(f"{source}: {key} must be <= {meta['max']}, got {value!r}.")
        kwargs[name] = value
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=1e-3` -> (["train", "lr"], 0.001); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r} must look like key.sub=value, e.g. train.lr=5e-4.")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {text!r} has an empty key; write it as key.sub=value.")
    import yaml  # here, not at the top: the CLI's quick commands import this module without it

    return key.split("."), yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.sub=value` strings to a raw config mapping (returns a new mapping)."""
    out = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            if isinstance(node, list):
                try:
                    node = node[int(part)]
                except (ValueError, IndexError):
                    raise ConfigError(f"--set {text!r}: '{part}' is not an index of that list.") from None
                continue
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            node = nxt
        last = path[-1]
        if isinstance(node, list):
            try:
                node[int(last)] = value
            except (ValueError, IndexError):
                raise ConfigError(f"--set {text!r}: '{last}' is not an index of that list.") from None
        else:
            node[last] = value
    return out


# Model options added after runs were stored: a stored config (a full `Config.to_dict()` dump)
# that lacks one was written before it existed, and its weights were trained with these values.
LEGACY_MODEL_DEFAULTS = {"conv_stems": False, "layer_scale_init": None,
                         "image_stem": "stride", "cms_chunk_rule": "gradients",
                         "cms_gains": "level"}


def flat_keys(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict as {"train.lr": value, ...}, the keys `--set` takes."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat_keys(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def with_legacy_defaults(stored: dict[str, Any]) -> dict[str, Any]:
    """A stored run or checkpoint config with the pre-existing behaviour filled in for every
    option it predates, so old checkpoints load into the model they were trained as."""
    out = {**LEGACY_MODEL_DEFAULTS, **stored}
    train = out.get("train")
    if isinstance(train, dict) and "num_workers" in train:
        # one key once meant both the cache's prefetch depth and a pack's decoding processes
        train = dict(train)
        workers = train.pop("num_workers")
        train.setdefault("prefetch_batches", workers)
        train.setdefault("loader_workers", workers)
        out["train"] = train
    return out


def config_from_dict(raw: dict[str, Any] | None, source: str = "<config>",
                     overrides: list[str] | None = None) -> Config:
    raw = dict(raw or {})
    if overrides:
        raw = apply_overrides(raw, overrides)
        # the overrides come from --set and from options such as --image-size: name them as keys
        source = f"{source} with {'; '.join(overrides)}"
    data = raw.get("data")
    if isinstance(data, dict) and isinstance(data.get("augment"), bool):
        # the flat form (and every config stored before the switches existed): both on or off
        raw["data"] = {**data, "augment": {"crop": data["augment"], "flip": data["augment"]}}
    cfg = _build(Config, raw, source)
    cfg.validate(source)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults when `path` is None) and apply overrides."""
    if path is None:
        return config_from_dict({}, "<defaults>", overrides)
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass one of the files in configs/.")
    import yaml

    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}; fix the syntax and retry.") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values.")
    return config_from_dict(raw, str(path), overrides)


def save_config(cfg: Config, path: str | Path) -> None:
    import yaml

    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# The shipped configs: a link to the top-level configs/ folder that users edit, packaged with
# nlmm (package-data), so a wheel install resolves `--config NAME` as a checkout does.
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def resolve_config(name_or_path: str | Path, overrides: list[str] | None = None) -> Config:
    """Load `configs/<name>.yaml` by name, or a YAML file by path."""
    path = Path(name_or_path)
    if not path.is_file():
        for folder in (Path.cwd() / "configs", CONFIG_DIR):
            candidate = folder / f"{name_or_path}.yaml"
            if candidate.is_file():
                path = candidate
                break
        else:
            names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
            if path.suffix in (".yaml", ".yml") or len(path.parts) > 1:
                raise ConfigError(f"config file {path} does not exist; check the path, or name "
                                  f"one of the shipped configs: {', '.join(names)}.")
            raise ConfigError(f"no config named {str(name_or_path)!r}; pass a YAML path or one of: "
                              f"{', '.join(names)}.")
    return load_config(path, overrides)
