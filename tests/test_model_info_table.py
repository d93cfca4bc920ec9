"""`nlmm model info`: the triple it costs follows the config's limits, and the bold row of the
parameter table is the sum of the rows above it."""

from __future__ import annotations

import io
import math

from rich.console import Console

from nlmm.config import resolve_config
from nlmm.model.info import TYPICAL_SPEECH_SECONDS, model_info
from nlmm.cli.reports import model_info_table


def rendered(cfg) -> str:
    console = Console(width=160, record=True, file=io.StringIO())
    console.print(model_info_table(cfg, batch_size=8))
    return console.export_text()


def table_rows(text: str, title: str) -> list[list[str]]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == title)
    rows = []
    for line in lines[start + 4:]:
        if line.startswith("└"):
            break
        if line.startswith("│"):
            rows.append([c.strip() for c in line.split("│")[1:-1]])
    return rows


def number(cell: str) -> float:
    return float(cell.replace(",", "")) if cell else 0.0


def test_the_triple_is_cut_to_the_configs_audio_limit():
    capped = resolve_config("tiny_cpu")
    assert capped.data.max_audio_seconds < TYPICAL_SPEECH_SECONDS
    info = model_info(capped)
    assert info["audio_seconds"] == capped.data.max_audio_seconds
    frames = 1 + round(capped.data.max_audio_seconds * 16000) // 160  # 10 ms hop at 16 kHz
    assert info["tokens_per_triple"]["audio"] == math.ceil(frames / capped.audio_stride)
    assert "audio 4 s, text 20 tokens; data.max_audio_seconds caps it)" in \
        " ".join(rendered(capped).split())

    roomy = resolve_config("tiny_cpu", ["data.max_audio_seconds=12"])
    assert model_info(roomy)["audio_seconds"] == TYPICAL_SPEECH_SECONDS
    short_text = resolve_config("tiny_cpu", ["data.text_max_len=8"])
    assert model_info(short_text)["text_len"] == 8


def test_the_bold_row_is_the_sum_of_the_rows_above_it():
    cfg = resolve_config("tiny_cpu")
    rows = table_rows(rendered(cfg), "parameters")
    names = [r[0] for r in rows]
    total = names.index("trainable (sum)")
    assert sum(number(r[1]) for r in rows[:total]) == number(rows[total][1])
    flops = sum(number(r[2]) for r in rows[:total])
    assert abs(flops - number(rows[total][2])) <= 0.01 * total  # each cell rounded to 0.01
    adapters = rows[total + 1]
    assert adapters[0] == "TTT adapters (test time only)"
    assert number(adapters[1]) == model_info(cfg)["params"]["ttt_adapters"] > 0
