"""Writes a small Flickr8k + FACC corpus by hand, in the public layout, for tests and benches.

Images are PIL-drawn JPEGs (a coloured shape on a coloured background), captions name what is
drawn, spoken captions are soundfile-written 16 kHz mono tones (one frequency per caption).
Test-split captions carry a word ("quokka") that no train or dev caption has, and train
captions carry a word ("kangaroo") of the same frequency that no other split has, so the
tokenizer's training data can be told apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220),
           "yellow": (235, 215, 40), "purple": (140, 50, 170), "orange": (245, 140, 30),
           "white": (245, 245, 245), "black": (15, 15, 15)}
SHAPES = ("circle", "square", "triangle")
TEST_ONLY_WORD = "quokka"
TRAIN_ONLY_WORD = "kangaroo"
SPLIT_FILES = {"train": "Flickr_8k.trainImages.txt", "dev": "Flickr_8k.devImages.txt",
               "test": "Flickr_8k.testImages.txt"}


@dataclass
class PublicCorpus:
    """What was written, so tests can compute expected counts independently of the reader."""

    root: Path
    split_of: dict[str, str | None] = field(default_factory=dict)   # image -> split (None: none)
    captions: dict[str, list[str]] = field(default_factory=dict)    # image -> its captions
    wavs: dict[tuple[str, int], str] = field(default_factory=dict)  # (image, n) -> wav name
    tone_hz: dict[str, float] = field(default_factory=dict)         # wav name -> frequency
    sample_rate: int = 16000

    def images_in(self, split: str) -> list[str]:
        return [name for name, s in self.split_of.items() if s == split]

    def image_dir(self) -> Path:
        found = [d for d in (self.root / "Flickr8k_Dataset", self.root / "Flicker8k_Dataset")
                 if d.is_dir()]
        return found[0]

    def wav_path(self, image: str, n: int) -> Path:
        return self.root / "flickr_audio" / "wavs" / self.wavs[(image, n)]


def tone(freq: float, seconds: float, sample_rate: int, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(int(round(seconds * sample_rate))) / sample_rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _draw(path: Path, i: int, size: tuple[int, int], texture: bool) -> tuple[str, str, str]:
    names = list(COLOURS)
    fg, bg = names[i % len(names)], names[(i * 3 + 1) % len(names)]
    if fg == bg:
        bg = names[(i * 3 + 2) % len(names)]
    shape = SHAPES[i % len(SHAPES)]
    img = Image.new("RGB", size, COLOURS[bg])
    draw = ImageDraw.Draw(img)
    w, h = size
    box = (w * 0.2, h * 0.2, w * 0.8, h * 0.8)
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[fg])
    elif shape == "square":
        draw.rectangle(box, fill=COLOURS[fg])
    else:
        draw.polygon([(w * 0.5, h * 0.15), (w * 0.85, h * 0.85), (w * 0.15, h * 0.85)],
                     fill=COLOURS[fg])
    if texture:
        # Photo-like grain: JPEG files of a realistic size (Flickr8k's average ~110 KB at 500x375).
        noise = np.random.default_rng(i).normal(0.0, 24.0, (h, w, 3))
        img = Image.fromarray(np.clip(np.asarray(img, dtype=np.float64) + noise, 0, 255)
                              .astype(np.uint8))
    img.save(path, "JPEG", quality=90)
    return fg, bg, shape


def _captions(fg: str, bg: str, shape: str, split: str | None, k: int) -> list[str]:
    caps = [f"A {fg} {shape} on a {bg} background .",
            f"The {shape} is {fg} and the background is {bg} .",
            f"A picture of a {fg} {shape} .",
            f"Something {fg} sits in front of {bg} .",
            f"One {shape} drawn in {fg} ."]
    if split == "test":
        caps[3] = f"A {TEST_ONLY_WORD} hides behind the {fg} {shape} ."
    elif split == "train":
        caps[3] = f"A {TRAIN_ONLY_WORD} hides behind the {fg} {shape} ."
    return caps[:k]


def write_public_corpus(root: Path, n_images: int = 13, splits: tuple[int, int, int] = (6, 3, 3),
                        captions_per_image: int = 5, audio: bool = True,
                        image_folder: str = "Flickr8k_Dataset", audio_seconds: float = 0.5,
                        image_size: tuple[int, int] = (64, 48), sample_rate: int = 16000,
                        texture: bool = False) -> PublicCorpus:
    """Write the corpus under `root`; images beyond sum(splits) belong to no split (and, as in
    FACC, have no spoken captions). Clip n of each image lasts audio_seconds + 0.05 n.
    `texture` adds grain so the JPEGs cost what photos cost to decode (for benchmarks)."""
    root = Path(root)
    image_dir = root / image_folder
    text_dir = root / "Flickr8k_text"
    wav_dir = root / "flickr_audio" / "wavs"
    for d in (image_dir, text_dir) + ((wav_dir,) if audio else ()):
        d.mkdir(parents=True, exist_ok=True)
    corpus = PublicCorpus(root, sample_rate=sample_rate)
    bounds = np.cumsum(splits)
    token_lines, wav2capt, wav2spk = [], [], []
    for i in range(n_images):
        name = f"{1000000 + i * 7919}_{i * 2654435761 % 16**10:010x}.jpg"
        split = next((s for s, b in zip(SPLIT_FILES, bounds, strict=True) if i < b), None)
        fg, bg, shape = _draw(image_dir / name, i, image_size, texture)
        caps = _captions(fg, bg, shape, split, captions_per_image)
        corpus.split_of[name] = split
        corpus.captions[name] = caps
        for n, text in enumerate(caps):
            token_lines.append(f"{name}#{n}\t{text}")
            if audio and split is not None:
                wav = f"{name[:-4]}_{n}.wav"
                freq = 250.0 + 90.0 * ((i * captions_per_image + n) % 40)
                sf.write(wav_dir / wav, tone(freq, audio_seconds + 0.05 * n, sample_rate),
                         sample_rate, subtype="PCM_16")
                corpus.wavs[(name, n)] = wav
                corpus.tone_hz[wav] = freq
                wav2capt.append(f"{wav} {name} #{n}")
                wav2spk.append(f"{wav} {1 + (i + n) % 7}")
    (text_dir / "Flickr8k.token.txt").write_text("\n".join(token_lines) + "\n")
    for split, filename in SPLIT_FILES.items():
        (text_dir / filename).write_text("".join(f"{n}\n" for n in corpus.images_in(split)))
    if audio:
        (root / "flickr_audio" / "wav2capt.txt").write_text("\n".join(wav2capt) + "\n")
        (root / "flickr_audio" / "wav2spk.txt").write_text("\n".join(wav2spk) + "\n")
    return corpus
