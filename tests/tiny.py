"""What the tests train with: the tiny model settings, and the metric sinks a Trainer logs to."""

from __future__ import annotations

from nlmm.config import Config, resolve_config

# One layer per tower at width 32: a step takes milliseconds on a CPU.
TINY_MODEL = ("d_model=32", "embed_dim=32", "n_heads=2", "L_mem=2", "depth={text: 1, image: 1, audio: 1}")
# Width 64: enough capacity for the tests that check a run learns.
SMALL_MODEL = ("d_model=64", "embed_dim=64", "n_heads=4", "L_mem=4", "depth={text: 1, image: 1, audio: 1}")
# 32 px images, 2 s clips, 16 tokens: the data settings of conftest's tiny cache.
TINY_DATA = ("data.image_size=32", "data.max_audio_seconds=2.0", "data.text_max_len=16")


def tiny_config(*extra: str, model: tuple[str, ...] = TINY_MODEL) -> Config:
    """`tiny_nlmm` (three CMS levels and memory: every part the tests exercise) with `model`'s
    settings, then `extra` overrides."""
    return resolve_config("tiny_nlmm", [*model, *extra])


def cli_sets(*overrides: str) -> list[str]:
    """The same overrides as `nlmm train` options: --set KEY=VALUE each."""
    return [arg for override in overrides for arg in ("--set", override)]


class ListSink:
    """Keeps every logged row as (step, epoch, values)."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, int, dict[str, float]]] = []

    def log(self, step: int, epoch: int, values: dict[str, float]) -> None:
        self.rows.append((step, epoch, dict(values)))

    def series(self, key: str) -> list[float]:
        return [values[key] for _, _, values in self.rows if key in values]

    def last(self, key: str) -> float:
        return self.series(key)[-1]

    def by_key(self) -> dict[str, dict[int, float]]:
        """{key: {step: value}}, the last value logged for a step winning."""
        out: dict[str, dict[int, float]] = {}
        for step, _, values in self.rows:
            for key, value in values.items():
                out.setdefault(key, {})[step] = value
        return out

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class NullSink:
    """Drops every row."""

    def log(self, step: int, epoch: int, values: dict[str, float]) -> None:
        pass
