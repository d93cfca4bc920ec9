"""A pack's plan: the corpus cut into blocks (each becomes one shard) and the fingerprint that
says whether a folder holds an unfinished pack of this very plan.

Every split is cut into blocks of groups (~chunk_bytes of media each, in an order fixed by a
hash of the group ids, so a block is a random sample of the corpus); a block never has more
than MAX_BLOCK_GROUPS groups.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

from nlmm.data.corpora.base import SPLITS, Corpus
from nlmm.data.pack_index import PACK_FORMAT, PACK_VERSION
from nlmm.errors import NlmmError

MAX_BLOCK_GROUPS = 4096  # keeps a block's job short even for tiny samples


@dataclass
class Item:
    """One group as it is packed: its media paths and its captions in caption order."""

    gid: str
    split: str
    image: str | None
    clip: str | None
    captions: list[str]
    readings: list[str | None]  # each caption's own spoken reading


@dataclass
class Block:
    split: str
    number: int
    items: list[Item]

    @property
    def name(self) -> str:
        return f"{self.split}-{self.number:05d}"

    @property
    def shard(self) -> str:
        return f"{self.split}/chunk-{self.number:05d}.bin"


def _stat(path: str | None) -> tuple[int, int]:
    if path is None:
        return 0, 0
    try:
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    except OSError:
        return 0, 0  # reported by the verify pass with its reason


def _hash_order(gid: str) -> str:
    return hashlib.sha1(gid.encode()).hexdigest()


def plan_blocks(corpus: Corpus, chunk_bytes: int) -> tuple[list[Block], list[tuple]]:
    """The blocks of every split and what their fingerprint is made of (paths, sizes, mtimes)."""
    by_group: dict[str, list] = {}
    for c in corpus.captions:
        by_group.setdefault(c.group, []).append(c)
    blocks: list[Block] = []
    facts: list[tuple] = []
    for split in SPLITS:
        groups = sorted((g for g in corpus.groups if g.split == split and g.id in by_group),
                        key=lambda g: _hash_order(g.id))
        current: list[Item] = []
        size, number = 0, 0
        for g in groups:
            caps = sorted(by_group[g.id], key=lambda c: c.index)
            item = Item(g.id, split, str(g.image) if g.image else None,
                        str(g.audio) if g.audio else None, [c.text for c in caps],
                        [str(c.audio) if c.audio else None for c in caps])
            stats = [_stat(p) for p in (item.image, item.clip, *item.readings)]
            facts.append((g.id, split, item.image, item.clip, item.captions, item.readings, stats))
            item_bytes = sum(s for s, _ in stats) + sum(len(t) for t in item.captions)
            if current and (size + item_bytes > chunk_bytes or len(current) >= MAX_BLOCK_GROUPS):
                blocks.append(Block(split, number, current))
                current, size, number = [], 0, number + 1
            current.append(item)
            size += item_bytes
        if current:
            blocks.append(Block(split, number, current))
    return blocks, facts


def fingerprint(corpus: Corpus, vocab_size: int, chunk_bytes: int, params: dict[str, Any],
                facts: list[tuple]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([PACK_FORMAT, PACK_VERSION, corpus.format, str(corpus.root), vocab_size,
                         chunk_bytes, params], sort_keys=True).encode())
    for fact in facts:
        h.update(json.dumps(fact).encode())
    return h.hexdigest()


def parse_bytes(value: str | int) -> int:
    """'64MB' / '512KB' / '1GB' / 12345 -> bytes (decimal units, as litdata reads them)."""
    if isinstance(value, int):
        return value
    text = str(value).strip().upper().replace(" ", "")
    for unit, mult in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if text.endswith(unit) and text[:-len(unit)].replace(".", "", 1).isdigit():
            return int(float(text[:-len(unit)]) * mult)
    if text.isdigit():
        return int(text)
    raise NlmmError(f"chunk_bytes {value!r} is not a size; write it like '64MB' or '512KB'.")
