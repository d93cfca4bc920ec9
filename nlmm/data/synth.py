"""Offline synthetic corpus in exactly the Flickr8k + FACC layout.

Images show one or two coloured shapes on a textured background; five captions per image
describe them with varied wording, and every caption names each object's colour, shape and
position plus the background colour. Those facts identify the image within the corpus (no
other image satisfies all the facts of any caption), so retrieval has one right answer.

The harder grid mode (`objects=N`, N from 2 to 5) puts exactly N smaller shapes at distinct
cells of a 3x3 grid; every caption names each object's colour, shape and cell plus the
background, some also its size or where it lies relative to another object ("above", "to the
left of"). No two images share the same set of (colour, shape, cell) facts on the same
background, so again each caption fits one image, but only a model that tells apart the
objects' colours, shapes and places in the picture can find it.

Spoken captions come from `nlmm.data.speech`. Everything derives from the seed: the same seed
and speech engine give byte-identical files, whatever the number of worker processes.
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import multiprocessing
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image, ImageDraw, ImageFilter
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

from nlmm.data.speech import SAMPLE_RATE, Speaker, make_speakers, resolve_engine, speak
from nlmm.errors import NlmmError

IMAGE_SIZE = 160
MIN_IMAGES = 8
# Far below the combination space (~500k two-object scenes) so that drawing stays fast.
MAX_IMAGES = 20000

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (40, 170, 60), "blue": (40, 70, 220),
    "yellow": (240, 220, 40), "orange": (245, 140, 20), "purple": (140, 50, 180),
    "pink": (245, 130, 190), "white": (245, 245, 245), "black": (20, 20, 20),
    "brown": (130, 80, 35),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "grey": (128, 128, 128), "white": (235, 235, 235), "black": (30, 30, 30),
    "beige": (215, 200, 160), "teal": (40, 130, 130),
}
SHAPES = ("circle", "oval", "square", "triangle", "diamond", "star", "cross", "pentagon",
          "hexagon", "heart")
# Object centres as fractions of the image side (x, y).
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.22, 0.5), "right": (0.78, 0.5), "top": (0.5, 0.22), "bottom": (0.5, 0.78),
    "center": (0.5, 0.5),
}
_POSITION_WORDS = {
    "left": ("on the left", "at the left side"), "right": ("on the right", "at the right side"),
    "top": ("at the top", "near the top"), "bottom": ("at the bottom", "near the bottom"),
    "center": ("in the center", "in the middle"),
}
SIZES = {"small": 0.085, "large": 0.13}  # radius as a fraction of the image side
# The grid mode's 3x3 cells as (x, y) fractions of the image side, and their caption words.
GRID_POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.18, 0.18), "top": (0.5, 0.18), "top right": (0.82, 0.18),
    "left": (0.18, 0.5), "center": (0.5, 0.5), "right": (0.82, 0.5),
    "bottom left": (0.18, 0.82), "bottom": (0.5, 0.82), "bottom right": (0.82, 0.82),
}
_GRID_WORDS = {
    "top left": ("at the top left", "in the top left corner"),
    "top": ("at the top", "at the top center"),
    "top right": ("at the top right", "in the top right corner"),
    "left": ("on the left", "at the center left"),
    "center": ("in the center", "in the middle"),
    "right": ("on the right", "at the center right"),
    "bottom left": ("at the bottom left", "in the bottom left corner"),
    "bottom": ("at the bottom", "at the bottom center"),
    "bottom right": ("at the bottom right", "in the bottom right corner"),
}
# Grid cells lie 0.32 of the side apart: at this scale two large neighbours with the widest
# outline (the star, 1.15 radii) and the largest size and position jitter keep ~4 px apart.
_GRID_RADIUS_SCALE = 0.78
GRID_OBJECTS = (2, 5)  # the fewest and most objects a grid scene may hold
_COUNT_WORDS = {2: "two", 3: "three", 4: "four", 5: "five"}
_SIZE_SYNONYMS = {"small": "little", "large": "big"}
TEXTURES = ("plain", "striped", "dotted", "checkered")
_LEMMAS = {"is": "be", "are": "be", "shows": "show", "sits": "sit", "shapes": "shape",
           "coloured": "colour", "placed": "place"}
_P_ONE_OBJECT = 0.3
_MAX_DRAWS = 2000


@dataclass(frozen=True)
class Shape:
    """One drawn object, by the words its captions use."""

    shape: str
    colour: str
    position: str
    size: str


@dataclass(frozen=True)
class Scene:
    """What one image shows: shapes at distinct positions on a background.

    Default scenes hold one or two shapes at `POSITIONS`; grid scenes (`grid`) hold more,
    smaller ones at the cells of `GRID_POSITIONS`.
    """

    objects: tuple[Shape, ...]
    background: str
    texture: str
    grid: bool = False


@dataclass(frozen=True)
class _Item:
    index: int
    image_id: str
    scene: Scene
    captions: tuple[str, ...]
    speakers: tuple[int, ...]  # one per caption; empty for images outside every split


def draw_scenes(n: int, rng: np.random.Generator) -> list[Scene]:
    """`n` scenes such that the facts of any scene's captions match no other scene."""
    drawer = _SceneDrawer(rng)
    return [drawer.draw() for _ in range(n)]


class _SceneDrawer:
    """Draws scenes whose caption facts match no earlier scene (see module docstring)."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.singles: set[tuple] = set()  # (object facts, background) of one-object scenes
        self.members: set[tuple] = set()  # the same for every object of two-object scenes
        self.pairs: set[tuple] = set()

    def _shape(self, background: str, taken: set[str]) -> Shape:
        rng = self.rng
        colours = [c for c in COLOURS if c != background]
        positions = [p for p in POSITIONS if p not in taken]
        return Shape(SHAPES[rng.integers(len(SHAPES))], colours[rng.integers(len(colours))],
                     positions[rng.integers(len(positions))],
                     ("small", "large")[rng.integers(2)])

    def draw(self) -> Scene:
        rng = self.rng
        for _ in range(_MAX_DRAWS):
            background = tuple(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
            texture = TEXTURES[rng.integers(len(TEXTURES))]
            first = self._shape(background, set())
            facts = [((first.colour, first.shape, first.position), background)]
            objects = [first]
            if rng.random() >= _P_ONE_OBJECT:
                second = self._shape(background, {first.position})
                objects.append(second)
                facts.append(((second.colour, second.shape, second.position), background))
            if len(objects) == 1:
                if facts[0] in self.singles or facts[0] in self.members:
                    continue
                self.singles.add(facts[0])
            else:
                pair = (frozenset(f[0] for f in facts), background)
                if pair in self.pairs or any(f in self.singles for f in facts):
                    continue
                self.pairs.add(pair)
                self.members.update(facts)
            return Scene(tuple(objects), background, texture)
        raise NlmmError("Could not draw a new distinct synthetic scene; ask for fewer images.")


def draw_grid_scenes(n: int, objects: int, rng: np.random.Generator) -> list[Scene]:
    """`n` grid scenes of `objects` shapes each, no two with the same facts (module docstring)."""
    # Every grid caption names all of a scene's objects, so a caption fits another scene only
    # if that scene holds exactly the same (colour, shape, cell) facts on the same background.
    seen: set[tuple] = set()
    scenes: list[Scene] = []
    cells = tuple(GRID_POSITIONS)
    for _ in range(n):
        for _ in range(_MAX_DRAWS):
            background = tuple(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
            texture = TEXTURES[rng.integers(len(TEXTURES))]
            colours = [c for c in COLOURS if c != background]
            # A random cell order also randomises the order the captions list objects in.
            shapes = tuple(Shape(SHAPES[rng.integers(len(SHAPES))],
                                 colours[rng.integers(len(colours))], cells[cell],
                                 ("small", "large")[rng.integers(2)])
                           for cell in rng.permutation(len(cells))[:objects].tolist())
            facts = (frozenset((o.colour, o.shape, o.position) for o in shapes), background)
            if facts not in seen:
                seen.add(facts)
                scenes.append(Scene(shapes, background, texture, grid=True))
                break
        else:
            raise NlmmError("Could not draw a new distinct synthetic scene; ask for fewer images.")
    return scenes


def _relation(a: Shape, b: Shape) -> str:
    """Where `a` lies relative to `b` in words; rows take precedence over columns."""
    (ax, ay), (bx, by) = GRID_POSITIONS[a.position], GRID_POSITIONS[b.position]
    if ay != by:
        return "above" if ay < by else "below"
    return "to the left of" if ax < bx else "to the right of"


def _listing(parts: list[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return " , ".join(parts[:-1]) + " and " + parts[-1]


def grid_captions_for(scene: Scene, rng: np.random.Generator) -> tuple[str, ...]:
    """Five captions of a grid scene, each naming every object's colour, shape and cell."""
    bg, tex, objs = scene.background, scene.texture, scene.objects
    first, rest = objs[0], objs[1:]

    def where(o: Shape) -> str:
        return _GRID_WORDS[o.position][rng.integers(2)]

    def named(o: Shape) -> str:
        return f"a {o.colour} {o.shape} {where(o)}"

    # Relational clauses tie objects to each other, so swapping two objects' cells changes more
    # words than the cell names. In the chain each "which" is the object named just before it.
    chain = named(first) + "".join(f" , which is {_relation(a, b)} {named(b)}"
                                   for a, b in zip(objs, rest))
    texts = (
        _listing([f"a {o.colour} {o.shape} {_GRID_WORDS[o.position][0]}" for o in objs])
        + f" on a {bg} background",
        f"there are {_COUNT_WORDS[len(objs)]} shapes against a {tex} {bg} background : "
        + _listing([f"a {o.size} {o.colour} {o.shape} {where(o)}" for o in objs]),
        f"{chain} , {'both' if len(objs) == 2 else 'all'} on {bg}",
        f"the {bg} background shows {named(first)} , with "
        + _listing([f"{named(o)} {_relation(o, first)} it" for o in rest]),
        f"on a {tex} {bg} background , "
        + _listing([f"{where(o)} a {_SIZE_SYNONYMS[o.size]} {o.colour} {o.shape}" for o in objs]),
    )
    return tuple(_finish(t) for t in texts)


def captions_for(scene: Scene, rng: np.random.Generator) -> tuple[str, ...]:
    """Five captions, space-tokenised, capitalised and ending in ' .' like Flickr8k's."""
    bg, tex = scene.background, scene.texture

    def where(o: Shape) -> str:
        return _POSITION_WORDS[o.position][rng.integers(2)]

    if len(scene.objects) == 1:
        (o,) = scene.objects
        c, s, z = o.colour, o.shape, o.size
        texts = (
            f"a {c} {s} {_POSITION_WORDS[o.position][0]} on a {bg} background",
            f"there is a {z} {c} {s} {where(o)} of the picture against a {tex} {bg} background",
            f"{where(o)} , a {c} {s} sits alone on {bg}",
            f"the {bg} background shows one {z} {s} coloured {c} {where(o)}",
            f"a single {c} {s} , {_SIZE_SYNONYMS[z]} and placed {where(o)} , "
            f"with a {tex} {bg} background",
        )
    else:
        a, b = scene.objects
        texts = (
            f"a {a.colour} {a.shape} {_POSITION_WORDS[a.position][0]} and a {b.colour} {b.shape} "
            f"{_POSITION_WORDS[b.position][0]} on a {bg} background",
            f"there is a {a.size} {a.colour} {a.shape} {where(a)} and a {b.size} {b.colour} "
            f"{b.shape} {where(b)} against a {tex} {bg} background",
            f"{where(b)} a {b.colour} {b.shape} , {where(a)} a {a.colour} {a.shape} , "
            f"both on {bg}",
            f"the {bg} background shows a {a.colour} {a.shape} {where(a)} together with a "
            f"{b.colour} {b.shape} {where(b)}",
            f"two shapes on a {tex} {bg} background : a {_SIZE_SYNONYMS[b.size]} {b.colour} "
            f"{b.shape} {where(b)} and a {_SIZE_SYNONYMS[a.size]} {a.colour} {a.shape} {where(a)}",
        )
    return tuple(_finish(t) for t in texts)


def _finish(text: str) -> str:
    """'a' becomes 'an' before a vowel; capitalised and closed with ' .' like Flickr8k."""
    words = text.split()
    for i, word in enumerate(words[:-1]):
        if word == "a" and words[i + 1][0] in "aeiou":
            words[i] = "an"
    sentence = " ".join(words)
    return sentence[0].upper() + sentence[1:] + " ."



def lemmatise(caption: str) -> str:
    """The lemma-file form of a caption: lower case, verbs and plurals reduced to lemmas."""
    return " ".join(_LEMMAS.get(w, w) for w in caption.lower().split())


def _shape_outline(shape: str) -> np.ndarray:
    """Polygon of a shape of radius ~1 centred on the origin (every shape covers its centre)."""
    if shape in ("circle", "oval"):
        t = np.linspace(0.0, 2.0 * np.pi, 48, endpoint=False)
        return np.stack([np.cos(t), np.sin(t) * (0.58 if shape == "oval" else 1.0)], axis=1)
    if shape == "square":
        return np.array([[-0.8, -0.8], [0.8, -0.8], [0.8, 0.8], [-0.8, 0.8]])
    if shape == "diamond":
        return np.array([[0.0, -1.1], [0.7, 0.0], [0.0, 1.1], [-0.7, 0.0]])
    if shape == "cross":
        w = 0.36
        return np.array([[-w, -1], [w, -1], [w, -w], [1, -w], [1, w], [w, w], [w, 1], [-w, 1],
                         [-w, w], [-1, w], [-1, -w], [-w, -w]], dtype=float)
    if shape == "heart":
        t = np.linspace(0.0, 2.0 * np.pi, 64, endpoint=False)
        pts = np.stack([16 * np.sin(t) ** 3,
                        -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))],
                       axis=1) / 16.0
        return pts - (pts.min(axis=0) + pts.max(axis=0)) / 2.0
    # Regular polygons and the star, first vertex pointing up.
    corners, radii = {"triangle": (3, (1.1,)), "pentagon": (5, (1.05,)), "hexagon": (6, (1.0,)),
                      "star": (10, (1.15, 0.48))}[shape]
    t = -np.pi / 2 + np.arange(corners) * 2.0 * np.pi / corners
    r = np.resize(np.asarray(radii), corners)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


_OUTLINES = {s: _shape_outline(s) for s in SHAPES}
# A 3x3 binomial blur: softens the polygons' aliased edges at a third of GaussianBlur's cost.
_SOFTEN = ImageFilter.Kernel((3, 3), [1, 2, 1, 2, 4, 2, 1, 2, 1], 16)


@functools.lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


def render_image(scene: Scene, rng: np.random.Generator, size: int = IMAGE_SIZE) -> Image.Image:
    """The scene drawn with jittered colours, positions, sizes and angles, texture and noise."""
    yy, xx = _grid(size)
    base = (np.asarray(BACKGROUNDS[scene.background]) + rng.normal(0, 4, 3)).astype(np.float32)
    # Darken light backgrounds and lighten dark ones so the pattern is always visible.
    shade = -24.0 if base.mean() > 100 else 24.0
    period = float(rng.uniform(10, 18))
    if scene.texture == "striped":
        angle = rng.choice([0.0, 0.5, 0.25, 0.75]) * np.pi
        pattern = ((xx * np.cos(angle) + yy * np.sin(angle)) % period) < period / 2
    elif scene.texture == "dotted":
        pattern = ((xx % period - period / 2) ** 2 + (yy % period - period / 2) ** 2
                   < (0.22 * period) ** 2)
    elif scene.texture == "checkered":
        pattern = ((xx // period + yy // period) % 2) == 1
    else:
        pattern = np.zeros_like(xx, dtype=bool)
    direction = rng.uniform(0, 2 * np.pi)
    light = np.float32(rng.uniform(4, 12)) * (
        (xx * np.float32(np.cos(direction)) + yy * np.float32(np.sin(direction))) / size - 0.5)
    pixels = base[None, None, :] + (np.float32(shade) * pattern + light)[:, :, None]
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))

    draw = ImageDraw.Draw(image)
    centres, scale = (GRID_POSITIONS, _GRID_RADIUS_SCALE) if scene.grid else (POSITIONS, 1.0)
    for obj in scene.objects:
        fx, fy = centres[obj.position]
        cx = (fx + rng.uniform(-0.02, 0.02)) * size
        cy = (fy + rng.uniform(-0.02, 0.02)) * size
        radius = SIZES[obj.size] * scale * size * rng.uniform(0.9, 1.1)
        theta = rng.uniform(-0.26, 0.26)
        rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
        pts = _OUTLINES[obj.shape] @ rot.T * radius + (cx, cy)
        fill = np.clip(np.asarray(COLOURS[obj.colour]) + rng.normal(0, 10, 3), 0, 255)
        draw.polygon([tuple(p) for p in pts.tolist()], fill=tuple(int(v) for v in fill))
    image = image.filter(_SOFTEN)
    # Uniform sensor noise (std ~4.6): much cheaper to draw than Gaussian, looks the same.
    noisy = np.asarray(image, dtype=np.float32) + np.float32(16.0) * (
        rng.random((size, size, 3), dtype=np.float32) - np.float32(0.5))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


@dataclass(frozen=True)
class _Job:
    out: Path
    seed: int
    engine: str
    wav_seconds_max: float
    speakers: tuple[Speaker, ...]
    items: tuple[_Item, ...]


def _render(job: _Job) -> int:
    """Writes the JPEGs and WAVs of a chunk of items; returns how many images it wrote."""
    image_dir = job.out / "Flickr8k_Dataset"
    wav_dir = job.out / "flickr_audio" / "wavs"
    for item in job.items:
        # Per-item generators keyed on (seed, index) make the bytes independent of chunking.
        rng = np.random.default_rng([job.seed, item.index, 1])
        render_image(item.scene, rng).save(image_dir / f"{item.image_id}.jpg", quality=90)
        for n, speaker_id in enumerate(item.speakers):
            samples = speak(item.captions[n], job.speakers[speaker_id - 1], job.engine,
                            np.random.default_rng([job.seed, item.index, 2, n]),
                            job.wav_seconds_max)
            sf.write(wav_dir / f"{item.image_id}_{n}.wav", samples, SAMPLE_RATE, subtype="PCM_16")
    return len(job.items)


def _image_ids(n: int, rng: np.random.Generator) -> list[str]:
    ids: list[str] = []
    seen: set[str] = set()
    while len(ids) < n:
        image_id = f"{int(rng.integers(10**8, 4 * 10**9))}_{rng.bytes(5).hex()}"
        if image_id not in seen:
            seen.add(image_id)
            ids.append(image_id)
    return ids


def _split_sizes(n: int) -> tuple[int, int, int, int]:
    """(train, dev, test, unsplit) in Flickr8k's proportions: 6000/1000/1000 plus 91 unsplit."""
    unsplit = max(2, round(n * 91 / 8091))
    held_out = max(2, round((n - unsplit) / 8))
    return n - unsplit - 2 * held_out, held_out, held_out, unsplit


def _prepare_out(out: Path, overwrite: bool) -> None:
    owned = [out / "Flickr8k_Dataset", out / "Flicker8k_Dataset", out / "Flickr8k_text",
             out / "flickr_audio"]
    present = [p for p in owned if p.exists()]
    if present and not overwrite:
        raise NlmmError(f"{out} already holds a corpus ({present[0].name}); choose an empty "
                        "folder or pass --overwrite to replace it.")
    for path in present:
        shutil.rmtree(path)
    (out / "Flickr8k_Dataset").mkdir(parents=True)
    (out / "flickr_audio" / "wavs").mkdir(parents=True)


def _write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def _chunks(items: list[_Item], size: int) -> Iterator[tuple[_Item, ...]]:
    for start in range(0, len(items), size):
        yield tuple(items[start:start + size])


def synth_corpus(out: Path, n_images: int = 120, seed: int = 0, progress: bool = True,
                 wav_seconds_max: float = 4.0, *, engine: str = "auto",
                 workers: int | None = None, overwrite: bool = False,
                 objects: int | None = None) -> dict[str, int | str]:
    """Writes a synthetic Flickr8k + FACC corpus under `out` and returns its counts.

    Images outside every split get captions but no speech, as in FACC. `objects` switches to
    the harder grid mode with that many objects per image (module docstring). `engine` picks the
    speech synthesiser ('auto' uses espeak-ng when installed); `workers` defaults to the
    usable CPUs; `overwrite` replaces a corpus already in `out`. Counts: images, captions,
    wavs, train, dev, test, unsplit, speakers, and the engine used.
    """
    if not MIN_IMAGES <= n_images <= MAX_IMAGES:
        raise NlmmError(f"A synthetic corpus needs between {MIN_IMAGES} and {MAX_IMAGES} images, "
                        f"not {n_images}; pick a count in that range.")
    if wav_seconds_max < 1.0:
        raise NlmmError(f"wav_seconds_max={wav_seconds_max} leaves no room for a spoken caption; "
                        "use at least 1 second.")
    lo, hi = GRID_OBJECTS
    if objects is not None and not lo <= objects <= hi:
        raise NlmmError(f"A grid scene holds between {lo} and {hi} objects, not {objects}; "
                        "pick a count in that range.")
    resolved = resolve_engine(engine)
    out = Path(out)
    rng = np.random.default_rng(seed)
    if objects is None:
        scenes = draw_scenes(n_images, rng)
        captions = [captions_for(scene, rng) for scene in scenes]
    else:
        scenes = draw_grid_scenes(n_images, objects, rng)
        captions = [grid_captions_for(scene, rng) for scene in scenes]
    ids = _image_ids(n_images, rng)
    n_train, n_dev, n_test, n_unsplit = _split_sizes(n_images)
    order = rng.permutation(n_images)
    unsplit = set(order[:n_unsplit].tolist())
    splits = {
        "train": order[n_unsplit:n_unsplit + n_train],
        "dev": order[n_unsplit + n_train:n_unsplit + n_train + n_dev],
        "test": order[n_unsplit + n_train + n_dev:],
    }
    speakers = make_speakers(max(4, min(183, round(n_images / 44))), seed)
    spoken = rng.integers(1, len(speakers) + 1, size=(n_images, 5))
    items = [_Item(i, ids[i], scenes[i], captions[i],
                   () if i in unsplit else tuple(int(s) for s in spoken[i]))
             for i in range(n_images)]

    _prepare_out(out, overwrite)
    n_cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    n_workers = max(1, min(workers or n_cpus or 1, n_images // 8))
    chunk = max(1, min(64, n_images // (n_workers * 4)))
    jobs = [_Job(out, seed, resolved, wav_seconds_max, tuple(speakers), c)
            for c in _chunks(items, chunk)]
    _run_jobs(jobs, n_workers, n_images, progress)

    # The text files come last: a run cut short leaves no Flickr8k_text folder, so no reader
    # mistakes a half-written corpus for a complete one.
    audio_dir = out / "flickr_audio"
    wav_items = [(it.image_id, n, s) for it in items for n, s in enumerate(it.speakers)]
    _write_lines(audio_dir / "wav2capt.txt",
                 [f"{image_id}_{n}.wav {image_id}.jpg #{n}" for image_id, n, _ in wav_items])
    _write_lines(audio_dir / "wav2spk.txt",
                 [f"{image_id}_{n}.wav {s}" for image_id, n, s in wav_items])
    text_dir = out / "Flickr8k_text"
    text_dir.mkdir()
    for name, members in splits.items():
        _write_lines(text_dir / f"Flickr_8k.{name}Images.txt",
                     [f"{ids[i]}.jpg" for i in sorted(members.tolist())])
    _write_lines(text_dir / "Flickr8k.lemma.token.txt",
                 [f"{it.image_id}.jpg#{n}\t{lemmatise(c)}"
                  for it in items for n, c in enumerate(it.captions)])
    _write_lines(text_dir / "Flickr8k.token.txt",
                 [f"{it.image_id}.jpg#{n}\t{c}" for it in items for n, c in enumerate(it.captions)])
    return {"images": n_images, "captions": 5 * n_images, "wavs": len(wav_items),
            "train": n_train, "dev": n_dev, "test": n_test, "unsplit": n_unsplit,
            "speakers": len(speakers), "engine": resolved}


def _init_worker() -> None:
    # A forked worker must not enter an OpenMP pool inherited from a parent that had torch
    # loaded (espeak resampling runs torch here); one thread per worker process is the plan anyway.
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)


def _run_jobs(jobs: list[_Job], n_workers: int, total: int, progress: bool) -> None:
    bar = Progress(TextColumn("synthetic corpus"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("images"), TimeElapsedColumn(), TimeRemainingColumn(),
                   disable=not progress)
    task = bar.add_task("synth", total=total)
    if n_workers == 1:
        with bar:
            for job in jobs:
                bar.advance(task, _render(job))
        return
    # fork (unlike spawn) works from any caller, guarded `__main__` or not. All workers are
    # forked at the first submit, before the progress bar starts its refresh thread.
    context = multiprocessing.get_context("fork")
    with cf.ProcessPoolExecutor(n_workers, mp_context=context, initializer=_init_worker) as pool:
        futures = [pool.submit(_render, job) for job in jobs]
        with bar:
            for done in cf.as_completed(futures):
                bar.advance(task, done.result())
