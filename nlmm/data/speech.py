"""Offline speech for the synthetic corpus: a word-to-sound synthesiser and an espeak-ng wrapper.

The builtin synthesiser is not meant to sound like English. It gives every word a fixed
"pronunciation" (1–3 formant or noise segments derived from a hash of the word), so that the
same word sounds alike across speakers and different words sound different: that is all a
speech encoder needs to learn audio-to-image retrieval on the synthetic corpus.
"""

from __future__ import annotations

import functools
import hashlib
import io
import shutil
import subprocess
from dataclasses import dataclass

import numpy as np
import soundfile as sf

from nlmm.errors import NlmmError

SAMPLE_RATE = 16000
ENGINES = ("auto", "espeak", "builtin")

_PAUSE_TOKENS = {",": 0.09, ":": 0.12, ";": 0.12}
_SILENT_TOKENS = {".", "!", "?"}
_WORD_GAP_S = 0.025
_RAMP_S = 0.008
# Moving-average width for fricative noise: a ~2 kHz wide band once ring-modulated to its centre.
_NOISE_SMOOTH = 6
_ESPEAK_MAX_WPM = 450
_ESPEAK_VOICES = ("en-us", "en-gb", "en-us+f2", "en-gb+f3", "en-us+m3", "en-gb+m2",
                  "en-us+f4", "en-gb-x-rp", "en-us+m5", "en-gb+f1")


@dataclass(frozen=True)
class Speaker:
    """One synthetic speaker; `id` counts from 1 as in FACC's wav2spk.txt."""

    id: int
    f0: float             # mean pitch, Hz
    tempo: float          # duration multiplier: > 1 speaks slower
    formant_scale: float  # vocal-tract length factor applied to every formant
    level: float          # peak amplitude of the clip, 0..1
    voice: str            # espeak-ng voice
    wpm: int              # espeak-ng words per minute
    pitch: int            # espeak-ng pitch, 0..99


def make_speakers(n: int, seed: int) -> list[Speaker]:
    """`n` speakers with pitch, speed and timbre drawn deterministically from `seed`."""
    rng = np.random.default_rng([seed, 0x5BEA])
    speakers = []
    for i in range(n):
        speakers.append(Speaker(
            id=i + 1,
            f0=float(np.exp(rng.uniform(np.log(85.0), np.log(255.0)))),
            tempo=float(rng.uniform(0.85, 1.2)),
            formant_scale=float(rng.uniform(0.95, 1.05)),
            level=float(rng.uniform(0.45, 0.9)),
            voice=_ESPEAK_VOICES[int(rng.integers(len(_ESPEAK_VOICES)))],
            wpm=int(rng.integers(140, 191)),
            pitch=int(rng.integers(25, 76)),
        ))
    return speakers


def resolve_engine(engine: str) -> str:
    """'auto' becomes 'espeak' when espeak-ng is on PATH, else 'builtin'; others are checked."""
    if engine not in ENGINES:
        raise NlmmError(f"Unknown speech engine {engine!r}; use one of {', '.join(ENGINES)}.")
    has_espeak = shutil.which("espeak-ng") is not None
    if engine == "auto":
        return "espeak" if has_espeak else "builtin"
    if engine == "espeak" and not has_espeak:
        raise NlmmError("espeak-ng is not on PATH; install it (e.g. `apt-get install espeak-ng`) "
                        "or use the builtin speech engine.")
    return engine


def speak(text: str, speaker: Speaker, engine: str, rng: np.random.Generator,
          max_seconds: float) -> np.ndarray:
    """int16 mono samples at 16 kHz of `text` said by `speaker` with a resolved engine."""
    if engine == "espeak":
        return speak_espeak(text, speaker, max_seconds)
    return speak_builtin(text, speaker, rng, max_seconds)


@functools.lru_cache(maxsize=4096)
def word_segments(word: str) -> np.ndarray:
    """The fixed pronunciation of `word`: rows (kind, f1, f2, f3, a1, a2, a3, share).

    kind 0 is voiced (three formant tones), kind 1 a noise burst centred on f1; `share` is the
    fraction of the word's duration the segment takes. Derived from a stable hash, so every
    process and every run pronounces a word the same way.
    """
    digest = hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest()
    rng = np.random.default_rng(int.from_bytes(digest, "little"))
    n_seg = 1 if len(word) <= 2 else 2 if len(word) <= 5 else 3
    rows = np.zeros((n_seg, 8))
    for i in range(n_seg):
        # The first segment is always voiced so that every word carries pitch.
        noise = i > 0 and rng.random() < 0.3
        if noise:
            rows[i, :4] = (1.0, rng.uniform(2500.0, 6000.0), 0.0, 0.0)
            rows[i, 4:7] = (0.5, 0.0, 0.0)
        else:
            rows[i, :4] = (0.0, rng.uniform(250.0, 850.0), rng.uniform(900.0, 2400.0),
                           rng.uniform(2500.0, 3600.0))
            rows[i, 4:7] = (1.0, rng.uniform(0.4, 0.9), rng.uniform(0.15, 0.5))
        rows[i, 7] = rng.uniform(0.7, 1.3)
    rows[:, 7] /= rows[:, 7].sum()
    return rows


def word_seconds(word: str) -> float:
    """Nominal duration of a word before the speaker's tempo: longer words take longer."""
    return float(np.clip(0.07 + 0.03 * len(word), 0.1, 0.3))


def speak_builtin(text: str, speaker: Speaker, rng: np.random.Generator,
                  max_seconds: float) -> np.ndarray:
    """Vectorised word-to-sound synthesis; `rng` supplies the per-clip jitter and noise."""
    seg_rows: list[np.ndarray] = []
    seg_secs: list[float] = []
    silence = np.zeros(8)
    silence[0] = 2.0

    def add_silence(seconds: float) -> None:
        seg_rows.append(silence[None])
        seg_secs.append(seconds)

    add_silence(rng.uniform(0.05, 0.15))
    for token in text.lower().split():
        if token in _SILENT_TOKENS:
            continue
        if token in _PAUSE_TOKENS:
            add_silence(_PAUSE_TOKENS[token] * speaker.tempo)
            continue
        rows = word_segments(token)
        dur = word_seconds(token) * speaker.tempo * (1.0 + 0.04 * rng.standard_normal())
        seg_rows.append(rows)
        seg_secs.extend(rows[:, 7] * dur)
        add_silence(_WORD_GAP_S * speaker.tempo)
    add_silence(rng.uniform(0.05, 0.15))

    table = np.concatenate(seg_rows)
    secs = np.asarray(seg_secs)
    if secs.sum() > max_seconds:
        secs *= max_seconds / secs.sum()
    lengths = np.maximum(np.round(secs * SAMPLE_RATE).astype(np.int64), 1)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    n = int(lengths.sum())

    # float32 rows of length n throughout: numpy's vectorised float32 sin is an order of
    # magnitude faster than float64, and row-wise ops avoid slow strided (n, 3) gathers.
    cols = np.repeat(np.ascontiguousarray(table.T, dtype=np.float32), lengths, axis=1)
    kind, centre, amps = cols[0], cols[1], cols[4:7]
    t_local = np.arange(n, dtype=np.float32) - np.repeat(starts.astype(np.float32), lengths)
    length = np.repeat(lengths.astype(np.float32), lengths)
    ramp = np.minimum(np.float32(_RAMP_S * SAMPLE_RATE), length / 3.0)
    edge = np.minimum(t_local, length - 1.0 - t_local) / ramp
    env = np.sin(np.float32(0.5 * np.pi) * np.clip(edge, 0.0, 1.0)) ** 2

    omega_scale = np.float32(2.0 * np.pi * speaker.formant_scale / SAMPLE_RATE)
    tones = sum(amps[j] * np.sin(cols[1 + j] * omega_scale * t_local) for j in range(3))
    # Glottal pulsing at the speaker's pitch (with a falling contour) makes voiced segments
    # speaker-dependent while their formant peaks, hence the word identity, stay put.
    # Pitch glides linearly from 1.06 to 0.92 times f0, so the phase (in cycles) is quadratic.
    f0 = speaker.f0 * (1.0 + 0.03 * rng.standard_normal())
    t = np.arange(n) / SAMPLE_RATE
    cycles = f0 * t * (1.06 - 0.07 * t / max(t[-1], 1e-9))
    cycles -= np.floor(cycles)
    glottal = (0.5 + 0.5 * np.cos(np.float32(2.0 * np.pi) * cycles.astype(np.float32))) ** 2
    voiced = tones * (0.3 + 0.7 * glottal)

    # Uniform noise is cheaper to draw than Gaussian; the moving sum makes it near-Gaussian.
    white = rng.random(n + _NOISE_SMOOTH, dtype=np.float32) - np.float32(0.5)
    lowpass = sum(white[k:k + n] for k in range(_NOISE_SMOOTH))
    carrier = np.sin(centre * np.float32(2.0 * np.pi / SAMPLE_RATE) * t_local)
    hiss = amps[0] * lowpass * carrier

    signal = np.where(kind == 0.0, voiced, np.where(kind == 1.0, hiss, 0.0)) * env
    signal /= max(float(np.abs(signal).max()), 1e-9)
    signal += np.float32(0.014) * white[_NOISE_SMOOTH:]
    signal *= speaker.level / max(float(np.abs(signal).max()), 1e-9)
    return np.round(signal * 32767.0).astype(np.int16)


def _espeak_once(text: str, speaker: Speaker, wpm: int) -> tuple[np.ndarray, int]:
    cmd = ["espeak-ng", "--stdout", "-s", str(wpm), "-p", str(speaker.pitch), "-v", speaker.voice,
           text]
    try:
        done = subprocess.run(cmd, capture_output=True, check=True, timeout=60)
    except subprocess.TimeoutExpired as exc:
        raise NlmmError(f"espeak-ng did not finish within 60 s on voice {speaker.voice!r}; check "
                        "the espeak-ng installation or use the builtin speech engine.") from exc
    except subprocess.CalledProcessError as exc:
        reason = exc.stderr.decode(errors="replace").strip()
        raise NlmmError(f"espeak-ng failed on voice {speaker.voice!r} ({reason}); check the "
                        "espeak-ng installation or use the builtin speech engine.") from exc
    if not done.stdout:
        raise NlmmError(f"espeak-ng produced no audio for voice {speaker.voice!r} "
                        f"({done.stderr.decode(errors='replace').strip()}); check the espeak-ng "
                        "installation or use the builtin speech engine.")
    audio, rate = sf.read(io.BytesIO(done.stdout), dtype="float32", always_2d=True)
    return audio.mean(axis=1), rate


def speak_espeak(text: str, speaker: Speaker, max_seconds: float) -> np.ndarray:
    """espeak-ng speech at 16 kHz, sped up to fit `max_seconds` (cut there only at top speed)."""
    import torch
    import torchaudio.functional as AF

    spoken = text.replace(" .", ".").replace(" ,", ",")
    # espeak-ng takes about 0.83 * 60 / wpm seconds per word (measured from 150 to 450 wpm);
    # asking up front for a rate that fits with some margin avoids a second synthesis.
    fitting = int(np.ceil(0.9 * 60.0 * len(spoken.split()) / max_seconds))
    wpm = min(_ESPEAK_MAX_WPM, max(speaker.wpm, fitting))
    audio, rate = _espeak_once(spoken, speaker, wpm)
    seconds = len(audio) / rate
    if seconds > max_seconds and wpm < _ESPEAK_MAX_WPM:
        faster = int(min(_ESPEAK_MAX_WPM, np.ceil(1.1 * wpm * seconds / max_seconds)))
        audio, rate = _espeak_once(spoken, speaker, faster)
    wave = torch.from_numpy(np.ascontiguousarray(audio))
    if rate != SAMPLE_RATE:
        wave = AF.resample(wave, rate, SAMPLE_RATE)
    samples = wave.numpy()[: int(max_seconds * SAMPLE_RATE)]
    peak = max(float(np.abs(samples).max()), 1e-9)
    return np.round(samples / peak * speaker.level * 32767.0).astype(np.int16)
