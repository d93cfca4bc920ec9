"""Training throughput of NL-MM beside a plain Transformer of the same widths and depths.

For each config, both models run forward + backward on the same synthetic tri-modal batch
(captions of `--text-len` tokens, images at data.image_size, `--audio-seconds` of log-mel per
spoken caption) and the script prints triples/s and the NL-MM / baseline ratio. The baseline
uses the same stems, an `nn.TransformerEncoder` (pre-norm, GELU, same ffn_mult) per modality,
mean pooling over valid tokens, a linear head and the same contrastive loss — no shared memory,
one MLP per block instead of the CMS chain. On CUDA it also prints model FLOP utilisation:
NL-MM's FLOPs from nlmm.model.info, the baseline's counted by torch.utils.flop_counter,
divided by the bf16 dense peak of the detected GPU.

    python bench/model_bench.py                      # tiny_cpu and flickr8k, device defaults
    python bench/model_bench.py --configs tiny_cpu --steps 5 --threads 1
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from nlmm.config import MODALITIES, Config, config_from_dict, load_config
from nlmm.model import NLMM
from nlmm.model.encoders import AudioStem, ImageStem, TextStem
from nlmm.model.info import model_info
from nlmm.model.layers import sinusoidal_positions
from nlmm.model.losses import ContrastiveLoss, ForwardOutput, logit_scale_value

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

# Used only when configs/<name>.yaml is missing: the same settings as those files.
FALLBACK_CONFIGS = {
    "tiny_cpu": {
        "d_model": 128, "n_heads": 4, "ffn_mult": 2, "L_mem": 8, "embed_dim": 128,
        "depth": {"text": 2, "image": 2, "audio": 2}, "patch_size": 8, "audio_stride": 4,
        "vocab_size": 1000, "precision": {"amp": "none"},
        "cms_levels": [{"name": "fast", "chunk_size": 1}, {"name": "mid", "chunk_size": 4},
                       {"name": "slow", "chunk_size": 16}],
        "data": {"image_size": 64, "max_audio_seconds": 4.0},
    },
    "flickr8k": {
        "d_model": 512, "n_heads": 8, "ffn_mult": 4, "L_mem": 64, "embed_dim": 512,
        "depth": {"text": 6, "image": 8, "audio": 6}, "patch_size": 16, "audio_stride": 4,
        "vocab_size": 8000, "max_position_embeddings": 2048, "precision": {"amp": "bf16"},
        "cms_levels": [{"name": "fast", "chunk_size": 1}, {"name": "mid", "chunk_size": 32},
                       {"name": "slow", "chunk_size": 512}],
        "data": {"image_size": 224, "max_audio_seconds": 10.0},
    },
}
AUDIO_SECONDS = {"tiny_cpu": 3.0, "flickr8k": 10.0}
CPU_BATCH = {"tiny_cpu": 8, "flickr8k": 2}

# Dense bf16 tensor-core peaks (FLOP/s) by device-name fragment, most specific first.
BF16_PEAK = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
             ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10", 125e12),
             ("RTX 4090", 165e12)]


def load(name: str) -> Config:
    path = CONFIG_DIR / f"{name}.yaml"
    return load_config(path) if path.is_file() else config_from_dict(FALLBACK_CONFIGS[name], name)


class PlainEncoder(nn.Module):
    def __init__(self, cfg: Config, stem: nn.Module, depth: int, positions: Tensor) -> None:
        super().__init__()
        self.stem = stem
        self.positions = nn.Parameter(positions.clone())
        layer = nn.TransformerEncoderLayer(cfg.d_model, cfg.n_heads, cfg.ffn_mult * cfg.d_model,
                                           dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False) if depth else None
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.embed_dim, bias=False)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        tokens, mask = self.stem(x, mask)
        h = tokens + self.positions[: tokens.shape[1]]
        if self.blocks is not None:
            h = self.blocks(h, src_key_padding_mask=None if mask is None else ~mask)
        h = self.norm(h)
        if mask is None:
            pooled = h.mean(1)
        else:
            weights = mask.to(h.dtype)[..., None]
            pooled = (h * weights).sum(1) / weights.sum(1)
        return F.normalize(self.head(pooled).float(), dim=-1)


class PlainTransformer(nn.Module):
    """The baseline: same stems and widths, a standard Transformer per modality."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        n_patches = (cfg.data.image_size // cfg.patch_size) ** 2
        self.encoders = nn.ModuleDict({
            "text": PlainEncoder(cfg, TextStem(cfg.vocab_size, d), cfg.depth.text,
                                 0.02 * torch.randn(cfg.max_position_embeddings, d)),
            "image": PlainEncoder(cfg, ImageStem(cfg.patch_size, d), cfg.depth.image,
                                  0.02 * torch.randn(n_patches, d)),
            "audio": PlainEncoder(cfg, AudioStem(cfg.data.n_mels, d, cfg.audio_stride), cfg.depth.audio,
                                  sinusoidal_positions(cfg.max_position_embeddings, d)),
        })
        self.logit_scale = nn.Parameter(torch.tensor(2.659))

    def forward(self, batch: dict[str, Tensor]) -> tuple[ForwardOutput, None]:
        """Every row has audio (see synthetic_batch), so every row is encoded."""
        emb = {m: self.encoders[m](batch[m], batch.get(f"{m}_mask")) for m in MODALITIES}
        return ForwardOutput(emb, batch["image_ids"], batch["has_audio"].bool(),
                             logit_scale_value(self.logit_scale)), None


def synthetic_batch(cfg: Config, batch_size: int, text_len: int, audio_seconds: float,
                    device: torch.device) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(0)
    frames = int(audio_seconds * 100)
    text_lengths = torch.randint(text_len // 2, text_len + 1, (batch_size,), generator=g)
    text_mask = torch.arange(text_len)[None, :] < text_lengths[:, None]
    frame_lengths = torch.randint(frames // 2, frames + 1, (batch_size,), generator=g)
    frame_lengths[0] = frames
    audio_mask = torch.arange(frames)[None, :] < frame_lengths[:, None]
    batch = {
        "text": torch.randint(4, cfg.vocab_size, (batch_size, text_len), generator=g) * text_mask,
        "text_mask": text_mask,
        "image": torch.randn(batch_size, 3, cfg.data.image_size, cfg.data.image_size, generator=g),
        "audio": torch.randn(batch_size, 1, cfg.data.n_mels, frames, generator=g),
        "audio_mask": audio_mask,
        "has_audio": torch.ones(batch_size, dtype=torch.bool),
        "image_ids": torch.arange(batch_size),
    }
    return {k: v.to(device) for k, v in batch.items()}


def train_step(model: nn.Module, batch: dict[str, Tensor], amp: torch.dtype | None,
               device: torch.device) -> None:
    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        outputs, _ = model(batch)
        loss = ContrastiveLoss.from_config(model.cfg)(outputs)["loss"]
    loss.backward()
    model.zero_grad(set_to_none=True)


def measure(model: nn.Module, batch: dict[str, Tensor], amp: torch.dtype | None, device: torch.device,
            warmup: int, steps: int) -> float:
    """Seconds per forward+backward step."""
    for _ in range(warmup):
        train_step(model, batch, amp, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        train_step(model, batch, amp, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / steps


def counted_flops(model: nn.Module, batch: dict[str, Tensor], amp: torch.dtype | None,
                  device: torch.device) -> int:
    with FlopCounterMode(display=False) as counter:
        train_step(model, batch, amp, device)
    return counter.get_total_flops()


def gpu_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for fragment, peak in BF16_PEAK if fragment in name), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["tiny_cpu", "flickr8k"])
    parser.add_argument("--batch-size", type=int, help="default: train.batch_size on CUDA, small on CPU")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20 CUDA, 3 CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default 5 CUDA, 1 CPU)")
    parser.add_argument("--text-len", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch intra-op threads on CPU")
    args = parser.parse_args()

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    steps = args.steps or (20 if cuda else 3)
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    peak = gpu_peak(device)
    where = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {where}; bf16 peak: {peak / 1e12:.0f} TFLOP/s" if peak else f"device: {where}")
    print(f"{'config':10} {'model':12} {'batch':>5} {'steps':>5} {'triples/s':>10} {'ms/step':>9} "
          f"{'GFLOP/triple':>12} {'MFU':>6}")
    for name in args.configs:
        cfg = load(name)
        batch_size = args.batch_size or (cfg.train.batch_size if cuda else CPU_BATCH.get(name, 4))
        seconds = AUDIO_SECONDS.get(name, cfg.data.max_audio_seconds)
        amp = torch.bfloat16 if cuda and cfg.precision.amp == "bf16" else \
            torch.float16 if cuda and cfg.precision.amp == "fp16" else None
        batch = synthetic_batch(cfg, batch_size, args.text_len, seconds, device)
        info = model_info(cfg, batch_size=batch_size, audio_seconds=seconds, text_len=args.text_len)
        rates = {}
        for label, build in (("nlmm", NLMM), ("transformer", PlainTransformer)):
            torch.manual_seed(0)
            model = build(cfg).to(device).train()
            per_step = measure(model, batch, amp, device, warmup, steps)
            flops = info["flops_per_step"] if label == "nlmm" else counted_flops(model, batch, amp, device)
            rates[label] = batch_size / per_step
            mfu = f"{flops / per_step / peak:6.1%}" if peak else "     -"
            print(f"{name:10} {label:12} {batch_size:5d} {steps:5d} {rates[label]:10.1f} "
                  f"{per_step * 1e3:9.1f} {flops / batch_size / 1e9:12.2f} {mfu}")
            del model
            if cuda:
                torch.cuda.empty_cache()
        print(f"{name:10} nlmm/transformer throughput ratio: {rates['nlmm'] / rates['transformer']:.2f}")


if __name__ == "__main__":
    main()
