"""`nlmm data pack`: a corpus's groups written once into litdata shards, read by nlmm.data.stream.

One sample per group (an image or a clip with all its captions), holding what the model reads:
the image as the (image_size, image_size) crop the prepared cache stores, encoded (JPEG for
JPEG sources, PNG otherwise), and every recording as its float16 log-mel (pack_block). Decoding
at training time is then one small image per sample, and the log-mel of a clip is computed
once, not once per epoch; the settings they were made with are recorded in nlmm_pack.json and a
run with other settings is refused (pack_index.check_features). Layout of `out` (a folder or
s3://bucket/prefix, pack_store):

    nlmm_pack.json          counts, defects, features, every shard's sha256 and offsets
    tokenizer.json          BPE trained on the train split's captions only
    train/ dev/ test/       litdata folders: index.json + chunk-NNNNN.bin
    .pack/                  progress: the plan's fingerprint and one marker per finished block

The corpus is cut into blocks (pack_plan). Blocks are packed in parallel on every core, each in
one pass (pack_block: decode every file, bake the kept groups' features, write the shard), then
its marker is stored. Group and caption indices in a shard count from 0; nlmm_pack.json holds
each shard's offsets into the pack's dense indices. So a shard depends on its block alone, and
a pack killed at any point resumes at the first block without a marker and writes the same
bytes as an uninterrupted one.

Why not `litdata.optimize(use_checkpoint=True)`: it resumes exactly only while every input
yields a sample; with skipped (defective) inputs its checkpoint counts samples, not inputs,
and the resumed pack duplicates samples (bench/STREAM_NOTES.md has the measurement).
"""

from __future__ import annotations

import multiprocessing as mp
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.progress import MofNCompleteColumn, Progress, TimeRemainingColumn

from nlmm.config import DataConfig
from nlmm.data.check import tally
from nlmm.data.corpora.base import SPLITS, Caption, Corpus, Defect, Group
from nlmm.data.pack_block import JPEG_QUALITY, feature_params, judge, pack_block
from nlmm.data.pack_index import (INDEX, MANIFEST, PACK_FORMAT, PACK_VERSION, PLAN, TOKENIZER,
                                  sha256_file)
from nlmm.data.pack_plan import Block, fingerprint, parse_bytes, plan_blocks
from nlmm.data.pack_store import STATE, LocalStore, Store, open_store, store_error_context
from nlmm.data.parallel import default_workers
from nlmm.data.tokenizer import TextTokenizer
from nlmm.errors import NlmmError


@dataclass
class PackReport:
    out: str
    counts: dict[str, dict[str, int]]
    defects: list[Defect]
    shards: int
    bytes: int
    blocks_done_before: int  # shards a previous run had finished (resumed, not rewritten)
    seconds: float
    modalities: list[str] = field(default_factory=list)

    def summary(self) -> str:
        c = self.counts
        parts = [f"{s} {c[s]['groups']} groups / {c[s]['captions']} captions" for s in SPLITS]
        return (f"packed {self.out}: {'; '.join(parts)}; {self.shards} shards, "
                f"{self.bytes / 1e6:.1f} MB, {len(self.defects)} defect(s), {self.seconds:.1f} s")


def progress_bar(enabled: bool) -> Progress:
    return Progress(*Progress.get_default_columns()[:-1], MofNCompleteColumn(),
                    TimeRemainingColumn(elapsed_when_finished=True), disable=not enabled)


def _pool(workers: int, jobs: list) -> Any:
    """A forked pool (torch single-threaded per worker, see nlmm.data.parallel), or None when
    one process is enough."""
    if workers <= 1 or len(jobs) <= 1:
        return None
    from nlmm.data.parallel import _init_worker

    return mp.get_context("fork").Pool(min(workers, len(jobs)), initializer=_init_worker)


def _run(fn, jobs: list, workers: int) -> Iterator[Any]:
    pool = _pool(workers, jobs)
    if pool is None:
        yield from map(fn, jobs)
        return
    with pool:
        yield from pool.imap_unordered(fn, jobs)


def _prepare_out(store: Store, fp: str, force: bool) -> int:
    """Make `out` ready: fresh, or holding an unfinished pack of this very plan (resumed).
    Returns how many block markers a previous run left."""
    existing = store.sizes()
    plan = store.read_json(PLAN) if existing else None
    if existing and (force or plan is None or plan.get("fingerprint") != fp):
        if not force:
            what = ("a pack of another corpus or with other settings" if plan is not None
                    else "files that are not a pack")
            raise NlmmError(f"{store.url} is not empty (it holds {what}); pick an empty folder or "
                            "pass force=True (--force) to replace what is there.")
        store.clear()
        existing = {}
    if not existing:
        store.write_json(PLAN, {"fingerprint": fp, "version": PACK_VERSION})
    return sum(1 for n in existing if n.startswith(f"{STATE}/write/") and n.endswith(".json"))


def _repair_list(store: Store, manifest: dict) -> list[str]:
    """Blocks of a finished pack whose shard is missing or corrupted (local: sha256; object
    store: size), so a rerun rewrites just those."""
    sizes = store.sizes()
    bad = []
    for name, meta in manifest["shards"].items():
        local = store.local_path(name)
        if sizes.get(name) != meta["bytes"] or (
                local is not None and sha256_file(local) != meta["sha256"]):
            bad.append(meta["block"])
    return bad


def pack(corpus: Corpus, out: str | Path, *, vocab_size: int, data_cfg: DataConfig | None = None,
         workers: int | None = None, force: bool = False, progress: bool = True,
         chunk_bytes: str | int = "64MB",
         storage_options: dict[str, Any] | None = None) -> PackReport:
    """Write `corpus` into litdata shards under `out` (folder or s3://bucket/prefix), its images
    and log-mels made with `data_cfg`'s settings (image_size, the mel parameters; default
    DataConfig()), which a run training from the pack must share.

    Resumes an interrupted pack of the same corpus and settings; rerun on a finished pack it
    rewrites only shards that are missing or corrupted. Any other non-empty `out` is refused
    unless `force`.
    """
    start = time.perf_counter()
    target = parse_bytes(chunk_bytes)
    params = feature_params(data_cfg or DataConfig())
    workers = default_workers(workers)
    store = open_store(out, storage_options)
    blocks, facts = plan_blocks(corpus, target)
    if not blocks:
        raise NlmmError(f"no captioned image or clip of {corpus.root} is in a split, so nothing "
                        f"can be packed; run `nlmm data check {corpus.root}` to see why.")
    fp = fingerprint(corpus, vocab_size, target, params, facts)
    with store_error_context(store):
        done_before = _prepare_out(store, fp, force)
        finished = store.read_json(MANIFEST)
        if finished is not None and finished.get("fingerprint") == fp:
            for name in _repair_list(store, finished):
                store.delete([f"{STATE}/write/{name}.json"])
        with progress_bar(progress) as bar:
            markers = _pack_blocks(store, blocks, params, workers, bar)
        verdicts, defects = _verdicts(blocks, markers)
        tokenizer = _tokenizer(store, blocks, verdicts, vocab_size)
        manifest = _manifest(corpus, blocks, verdicts, defects, markers, fp, vocab_size, target,
                             tokenizer, params)
        for split in SPLITS:
            _write_index(store, split, blocks, markers, fp, target)
        store.write_json(MANIFEST, manifest)  # last: a pack without it is unfinished
    if isinstance(store, LocalStore):
        shutil.rmtree(store.root / STATE / "tmp", ignore_errors=True)
    # the reader's defects (files listed but missing, malformed lines) come first, as in check
    return PackReport(store.url, manifest["counts"], list(corpus.defects) + defects,
                      len(manifest["shards"]),
                      sum(m["bytes"] for m in manifest["shards"].values()), done_before,
                      time.perf_counter() - start, manifest["modalities"])


def _pack_blocks(store: Store, blocks: list[Block], params: dict[str, Any], workers: int,
                 bar: Progress) -> dict[str, dict]:
    """Every block's shard and marker, skipping blocks whose marker says the shard is stored."""
    # imported here, before the pool forks: each worker importing litdata costs about a second
    from litdata.streaming.writer import BinaryWriter  # noqa: F401

    task = bar.add_task("packing", total=sum(len(b.items) for b in blocks))
    staging = str(store.staging())
    markers: dict[str, dict] = {}
    jobs = []
    for b in blocks:
        marker = store.read_json(f"{STATE}/write/{b.name}.json")
        if marker is not None:
            markers[b.name] = marker
            bar.advance(task, len(b.items))
        else:
            jobs.append((b, params, staging))
    sizes = {b.name: len(b.items) for b in blocks}
    by_name = {b.name: b for b in blocks}
    for res in _run(pack_block, jobs, workers):
        path = res.pop("path", None)
        if path is not None:
            store.put_file(Path(path), by_name[res["block"]].shard)
        # the marker goes in after the shard: a kill in between only rewrites the same bytes
        store.write_json(f"{STATE}/write/{res['block']}.json", res)
        markers[res["block"]] = res
        bar.advance(task, sizes[res["block"]])
    return markers


def _verdicts(blocks: list[Block], markers: dict[str, dict]
              ) -> tuple[dict[str, list[dict]], list[Defect]]:
    """Each item's verdict and the pack's defects, from the blocks' decode results."""
    verdicts: dict[str, list[dict]] = {}
    defects: list[Defect] = []
    seen: set[tuple[str, str]] = set()
    for b in blocks:
        verdicts[b.name] = []
        for item, result in zip(b.items, markers[b.name]["results"], strict=True):
            verdict, found = judge(item, result)
            verdicts[b.name].append(asdict(verdict))
            for d in found:  # a clip shared by several groups is one defect
                if (d.kind, d.item) not in seen:
                    seen.add((d.kind, d.item))
                    defects.append(d)
    return verdicts, defects


def _tokenizer(store: Store, blocks: list[Block], verdicts: dict[str, list[dict]],
               vocab_size: int) -> TextTokenizer:
    """Trained once on the kept train captions; a resumed pack reuses the stored one."""
    stored = store.read(TOKENIZER)
    if stored is not None:
        return TextTokenizer.from_json(stored.decode())
    texts = [t for b in blocks if b.split == "train"
             for item, v in zip(b.items, verdicts[b.name], strict=True) if v["keep"]
             for t in item.captions]
    if not texts:
        raise NlmmError("the train split has no usable group (every image or clip failed to "
                        "decode or none is in train); run `nlmm data check` to see the defects.")
    tokenizer = TextTokenizer.train(texts, vocab_size)
    store.write(TOKENIZER, tokenizer.to_json().encode())
    return tokenizer


def _offsets(blocks: list[Block], markers: dict[str, dict]) -> dict[str, tuple[int, int]]:
    """Dense group and caption index of each block's first kept group, over the whole pack."""
    out, group, caption = {}, 0, 0
    for b in blocks:
        out[b.name] = (group, caption)
        group += markers[b.name]["samples"]
        caption += markers[b.name]["captions"]
    return out


def _write_index(store: Store, split: str, blocks: list[Block], shards: dict[str, dict],
                 fp: str, target: int) -> None:
    """litdata's index.json of a split: the chunks in block order. `updated_at` names the
    pack's fingerprint, so a repacked prefix is never mistaken for a cached older one."""
    chunks, config = [], None
    for b in blocks:
        m = shards[b.name]
        if b.split != split or m["chunk"] is None:
            continue
        chunks.append(m["chunk"])
        if config is not None and config["data_format"] != m["config"]["data_format"]:
            raise RuntimeError(f"block {b.name} has data format {m['config']['data_format']}, "
                               f"not {config['data_format']}")
        config = config or dict(m["config"])
    if config is None:
        return  # an empty split has no folder; the manifest says it has 0 groups
    config.update(chunk_size=None, chunk_bytes=target)
    store.write_json(f"{split}/{INDEX}", {"chunks": chunks, "config": config,
                                         "updated_at": fp[:16]})


def _manifest(corpus: Corpus, blocks: list[Block], verdicts: dict[str, list[dict]],
              defects: list[Defect], shards: dict[str, dict], fp: str, vocab_size: int,
              target: int, tokenizer: TextTokenizer, params: dict[str, Any]) -> dict[str, Any]:
    import litdata

    groups, captions, has_audio, image_ok, clip_ok = [], [], {}, set(), set()
    splits = {s: {"groups": 0, "captions": 0, "first_group": None, "first_caption": None,
                  "shards": 0} for s in SPLITS}
    offsets = _offsets(blocks, shards)
    for b in blocks:
        info = splits[b.split]
        if info["first_group"] is None:
            info["first_group"], info["first_caption"] = offsets[b.name]
        info["shards"] += shards[b.name]["chunk"] is not None
        for item, v in zip(b.items, verdicts[b.name], strict=True):
            if not v["keep"]:
                continue
            info["groups"] += 1
            info["captions"] += len(item.captions)
            groups.append(Group(item.gid, item.split))
            image_ok |= {item.gid} if v["image"] else set()
            clip_ok |= {item.gid} if v["clip"] else set()
            for i, text in enumerate(item.captions):
                captions.append(Caption(item.gid, i, text))
                has_audio[(item.gid, i)] = v["audio"][i]
    counts = tally(groups, captions, has_audio, image_ok, clip_ok)
    for s in SPLITS:
        counts[s]["groups"] = splits[s]["groups"]
        counts[s]["readings"] = sum(v["readings"][i] for b in blocks if b.split == s
                                    for v in verdicts[b.name] if v["keep"]
                                    for i in range(len(v["readings"])))
    counts["total"]["groups"] = sum(counts[s]["groups"] for s in SPLITS)
    counts["total"]["readings"] = sum(counts[s]["readings"] for s in SPLITS)
    total = counts["total"]
    modalities = [m for m, n in (("image", total["images"]), ("text", total["captions"]),
                                 ("audio", total["wavs"])) if n]
    longest = max((shards[b.name]["longest_audio"] for b in blocks), default=0)
    return {
        "format": PACK_FORMAT,
        "version": PACK_VERSION,
        "fingerprint": fp,
        "corpus": {"format": corpus.format, "root": str(corpus.root),
                   "unassigned_groups": len(corpus.unassigned_groups()),
                   "reader_defects": [asdict(d) for d in corpus.defects]},
        "vocab_size": vocab_size,
        "tokenizer": {"file": TOKENIZER, "vocab": tokenizer.vocab_size},
        # what the stored features were made with: a run must train with the same settings
        "features": {**params, "longest_audio_samples": longest,
                     "image": f"(image_size, image_size) centre crop; JPEG (quality "
                              f"{JPEG_QUALITY}) for JPEG sources, PNG for others, the original "
                              "bytes where already that size",
                     "audio": "float16 log-mel (n_mels, frames), features.log_mel"},
        "chunk_bytes": target,
        "litdata": litdata.__version__,
        "counts": counts,
        "splits": splits,
        "modalities": modalities,
        "defects": [asdict(d) for d in defects],
        "shards": {f"{b.split}/{m['chunk']['filename']}": {
            "sha256": m["sha256"], "bytes": m["bytes"], "samples": m["samples"], "block": b.name,
            "first_group": offsets[b.name][0], "first_caption": offsets[b.name][1]}
            for b in blocks if (m := shards[b.name])["chunk"] is not None},
    }
