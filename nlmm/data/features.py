"""Decoding of single files into model features: images (uint8 crops), speech (log-mel, clips).

Used when the cache is prepared and by search for query files, so both paths produce the same
features. Every decoding problem is raised as `BadInput(reason)`; nothing is ever zero-filled.
"""

from __future__ import annotations

import functools
import struct
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
import soundfile as sf
import torch

from nlmm.config import DataConfig

if TYPE_CHECKING:
    import torchaudio

IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)

PCM_SCALE = 32767.0  # int16 full scale: waveforms cached as 16-bit PCM for speech backbones
MIN_AUDIO_SECONDS = 0.1
LOG_MEL_EPS = 1e-6


class BadInput(Exception):
    """A file that cannot be turned into features; the message is the reason, for reports."""


# --------------------------------------------------------------------------- images

@functools.cache
def _pil_image() -> ModuleType:
    """PIL.Image, imported on first use: it costs a tenth of a second at start-up, which a text
    search never needs (likewise torchaudio below)."""
    from PIL import Image, ImageFile

    # PIL would otherwise pad a truncated JPEG with grey and report success.
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    return Image


def load_image(path: Path, size: int) -> np.ndarray:
    """Decode an image to uint8 (3, size, size): RGB, shorter side resized to `size`, centre crop."""
    Image = _pil_image()
    try:
        with Image.open(path) as img:
            # JPEG DCT scaling decodes at the smallest power-of-two scale still >= size on both
            # sides, which is much faster for large photos and loses nothing after the resize.
            img.draft("RGB", (size, size))
            img.load()
            rgb = img.convert("RGB")
    except FileNotFoundError:
        raise BadInput("file not found") from None
    except Image.UnidentifiedImageError:
        raise BadInput("not a readable image (unknown or corrupt format)") from None
    except Image.DecompressionBombError as exc:
        raise BadInput(f"image too large to decode safely ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadInput(f"corrupt or truncated image ({exc})") from None
    w, h = rgb.size
    if w == 0 or h == 0:
        raise BadInput("image has zero width or height")
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    rgb = rgb.resize((new_w, new_h), Image.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    rgb = rgb.crop((left, top, left + size, top + size))
    return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1))


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 3, H, W) in [0, 255] -> float32 normalised with the ImageNet statistics."""
    mean = torch.tensor(IMAGE_MEAN, device=images.device, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(IMAGE_STD, device=images.device, dtype=torch.float32).view(3, 1, 1)
    # (x / 255 - mean) / std as one fused multiply-add: a batch is read once, not four times.
    return torch.addcmul(-mean / std, images.to(torch.float32), 1.0 / (255.0 * std))


# --------------------------------------------------------------------------- audio

def _check_wav_header(path: Path, file_size: int) -> None:
    """Reject a RIFF/WAVE file whose data chunk claims more bytes than the file holds.

    libsndfile silently shortens such files to what is present, so a recording cut off by an
    interrupted download would otherwise pass as a shorter, valid clip.
    """
    with open(path, "rb") as fh:
        head = fh.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return  # not plain RIFF/WAVE (e.g. RF64, FLAC): soundfile's own checks apply
        pos = 12
        while pos + 8 <= file_size:
            fh.seek(pos)
            chunk_id, chunk_size = struct.unpack("<4sI", fh.read(8))
            if chunk_id == b"data":
                available = file_size - (pos + 8)
                if chunk_size != 0xFFFFFFFF and chunk_size > available:
                    raise BadInput(f"truncated WAV: header declares {chunk_size} bytes of audio, "
                                   f"file holds {available}")
                return
            pos += 8 + chunk_size + (chunk_size & 1)


def read_audio(path: Path) -> tuple[np.ndarray, int]:
    """Read and validate an audio file: float32 (frames, channels) and its sample rate."""
    path = Path(path)
    try:
        file_size = path.stat().st_size
    except FileNotFoundError:
        raise BadInput("file not found") from None
    if file_size == 0:
        raise BadInput("empty file (0 bytes)")
    _check_wav_header(path, file_size)
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError, ValueError) as exc:
        raise BadInput(f"unreadable audio ({exc})") from None
    if data.shape[0] < MIN_AUDIO_SECONDS * rate:
        raise BadInput(f"audio too short ({data.shape[0] / rate:.3f} s < {MIN_AUDIO_SECONDS} s)")
    if not np.isfinite(data).all():
        raise BadInput("audio contains NaN or infinite samples")
    if not data.any():
        raise BadInput("audio is digital silence (every sample is zero)")
    return data, rate


def load_wav(path: Path, sample_rate: int) -> np.ndarray:
    """Decode an audio file to float32 mono at `sample_rate` (channels averaged, resampled)."""
    data, rate = read_audio(path)
    mono = data.mean(axis=1, dtype=np.float32)
    if rate != sample_rate:
        import torchaudio.functional

        mono = torchaudio.functional.resample(torch.from_numpy(mono), rate, sample_rate).numpy()
    return np.ascontiguousarray(mono, dtype=np.float32)


def load_clip(path: Path, cfg: DataConfig) -> np.ndarray:
    """float32 mono wave at cfg.sample_rate cut to max_audio_seconds: a speech backbone's input,
    the same span of the recording that the log-mel covers."""
    return load_wav(path, cfg.sample_rate)[:cfg.max_audio_samples]


@functools.lru_cache(maxsize=8)
def _mel_transform(sample_rate: int, win_length: int, hop_length: int,
                   n_mels: int) -> torchaudio.transforms.MelSpectrogram:
    import torchaudio.transforms

    return torchaudio.transforms.MelSpectrogram(
        sample_rate=sample_rate, n_fft=win_length, win_length=win_length,
        hop_length=hop_length, n_mels=n_mels)


def log_mel(wave: np.ndarray, cfg: DataConfig) -> np.ndarray:
    """float32 mono wave at cfg.sample_rate -> float16 log-mel (n_mels, T), T = cfg.mel_frames(len)."""
    wave = wave[:cfg.max_audio_samples]
    transform = _mel_transform(cfg.sample_rate, cfg.win_length, cfg.hop_length, cfg.n_mels)
    with torch.no_grad():
        mel = transform(torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32)))
    return torch.log(mel + LOG_MEL_EPS).to(torch.float16).numpy()


def load_log_mel(path: Path, cfg: DataConfig) -> np.ndarray:
    """An audio file straight to its float16 log-mel (n_mels, T), as stored in the cache."""
    return log_mel(load_wav(path, cfg.sample_rate), cfg)
