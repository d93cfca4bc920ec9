"""Packed shards (nlmm.data.packed) and the streaming loader (nlmm.data.stream).

A corpus is built by hand (tiny PNG/JPEG images, 0.3 s FLAC clips and WAV readings), packed,
and streamed: the batches must hold what decoding the original files gives, a resumed epoch
must serve exactly the batches the uninterrupted one serves, a pack killed with SIGKILL must
resume into the same bytes, and a corrupted shard must be named in one sentence.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from nlmm.config import DataConfig
from nlmm.data.corpora.base import Caption, Corpus, Group
from nlmm.data.features import load_image, load_log_mel, normalize_images
from nlmm.data.pack_index import MANIFEST, read_manifest, read_tokenizer, verify_pack
from nlmm.data.packed import pack
from nlmm.data.stream import StreamTrainLoader, caption_choice, iter_split
from nlmm.errors import NlmmError

CFG = DataConfig(image_size=32, max_audio_seconds=2.0, text_max_len=16)
VOCAB = 120
CHUNK = "12KB"  # a few groups per shard: every test has many shards


def _tone(path: Path, hz: float, seconds: float = 0.3, rate: int = 16000) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    sf.write(path, (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32), rate)
    return path


def tiny_corpus(root: Path, n: int = 36, seed: int = 0, write: bool = True) -> Corpus:
    """n groups (2/3 train, 1/6 dev, 1/6 test): noise images (every 5th a PNG), a FLAC clip on
    every 4th group, 1-3 captions each, and a WAV reading of the first caption of odd groups.
    `write=False` describes the files an earlier call wrote."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    groups, captions = [], []
    for i in range(n):
        split = "train" if i < n * 2 // 3 else "dev" if i < n * 5 // 6 else "test"
        image = root / f"img{i:03d}.{'png' if i % 5 == 0 else 'jpg'}"
        pixels = rng.integers(0, 255, (32, 40, 3), dtype=np.uint8)
        if write:
            Image.fromarray(pixels).save(image)
        clip = root / f"clip{i:03d}.flac" if i % 4 == 0 else None
        if clip is not None and write:
            _tone(clip, 200 + 10 * i)
        groups.append(Group(f"g{i:03d}", split, image, clip))
        for k in range(1 + i % 3):
            reading = root / f"read{i:03d}.wav" if k == 0 and i % 2 else None
            if reading is not None and write:
                _tone(reading, 300 + 7 * i)
            colour = "red" if i % 2 else "blue"
            captions.append(Caption(f"g{i:03d}", k, f"picture {i} caption {k} a {colour} thing",
                                    reading))
    return Corpus(root, "handmade", groups, captions, [])


@pytest.fixture(autouse=True)
def pack_cache(tmp_path, monkeypatch) -> Path:
    """Remote chunks and sha256 memos of each test in its own folder, never in ~/.cache."""
    monkeypatch.setenv("NLMM_PACK_CACHE", str(tmp_path / "pack-cache"))
    return tmp_path / "pack-cache"


def shard_hashes(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file() and ".pack" not in p.parts}


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> tuple[Corpus, Path]:
    root = tmp_path_factory.mktemp("corpus")
    corpus = tiny_corpus(root)
    out = tmp_path_factory.mktemp("pack") / "p"
    pack(corpus, out, vocab_size=VOCAB, data_cfg=CFG, chunk_bytes=CHUNK, workers=2,
         progress=False)
    return corpus, out


def loader(out: Path | str, **kw) -> StreamTrainLoader:
    opts = {"batch_size": 4, "seed": 3, "data_cfg": CFG, "num_workers": 0, **kw}
    return StreamTrainLoader(out, **opts)


# --------------------------------------------------------------------------- contents

def test_pack_writes_every_group_with_counts_shards_and_tokenizer(packed) -> None:
    corpus, out = packed
    m = read_manifest(out)
    assert [m["counts"][s]["groups"] for s in ("train", "dev", "test")] == [24, 6, 6]
    assert m["counts"]["total"]["captions"] == len(corpus.captions)
    assert m["counts"]["total"]["readings"] == 18 and m["counts"]["total"]["clips"] == 9
    assert m["modalities"] == ["image", "text", "audio"] and m["defects"] == []
    assert len(m["shards"]) > 6 and (out / "tokenizer.json").is_file()
    assert verify_pack(out) == []
    # the tokenizer saw only train captions
    assert read_tokenizer(out).vocab_size <= VOCAB


def test_stream_batches_hold_what_the_files_decode_to(packed) -> None:
    corpus, out = packed
    by_id = {g.id: g for g in corpus.groups}
    caps = {}
    for c in corpus.captions:
        caps.setdefault(c.group, []).append(c)
    names = {}  # dense group index -> group id, from the evaluation pass
    for split in ("train", "dev", "test"):
        for b in iter_split(out, split, batch_size=5, data_cfg=CFG):
            names.update(zip(b["image_ids"].tolist(), b["group_id"], strict=True))
    assert sorted(names) == list(range(36))
    tok = read_tokenizer(out)
    seen = []
    train = loader(out, epoch=2)
    assert len(train) == 24 // 4
    for batch in train:
        b = len(batch["image_ids"])
        assert batch["text"].dtype == torch.int64 and batch["text_mask"].dtype == torch.bool
        assert batch["image"].shape == (b, 3, 32, 32) and batch["image"].dtype == torch.float32
        assert batch["audio"].shape[:3] == (b, 1, CFG.n_mels)
        assert batch["audio_mask"].shape == (b, batch["audio"].shape[-1])
        assert batch["text_mask"].sum(1).max() == batch["text"].shape[1]  # trimmed
        for row, group in enumerate(batch["image_ids"].tolist()):
            g = by_id[names[group]]
            k = caption_choice(3, 2, group, len(caps[g.id]))
            cap = caps[g.id][k]
            ids, n = tok.encode_batch([cap.text], CFG.text_max_len)
            assert batch["text"][row, :n[0]].tolist() == ids[0, :n[0]].tolist()
            assert batch["text_mask"][row].sum() == n[0]
            want = normalize_images(torch.from_numpy(load_image(g.image, 32)))
            assert batch["has_image"][row]
            if g.image.suffix == ".png":  # stored as the PNG of the cache's crop: exact
                assert torch.equal(batch["image"][row], want)
            else:  # re-encoded at quality 95: 2.7 grey levels on average for pure noise
                assert (batch["image"][row] - want).abs().mean() * 255 * 0.226 < 4
            wav = cap.audio or g.audio
            assert bool(batch["has_audio"][row]) == (wav is not None)
            if wav is None:
                assert not batch["audio_mask"][row].any()
            else:
                mel = torch.from_numpy(load_log_mel(wav, CFG).astype(np.float32))
                t = mel.shape[1]
                assert batch["audio_mask"][row].sum() == t
                assert torch.equal(batch["audio"][row, 0, :, :t], mel)
            seen.append(group)
            assert batch["caption_ids"][row] == seen_caption_id(names, caps, group, k)
    assert len(seen) == len(set(seen)) == 24  # one row per group per epoch


def test_other_data_settings_than_the_packs_are_refused_in_one_sentence(packed) -> None:
    _, out = packed
    m = read_manifest(out)
    assert {k: m["features"][k] for k in ("image_size", "n_mels", "max_audio_seconds")} == \
        {"image_size": 32, "n_mels": 80, "max_audio_seconds": 2.0}
    for change in ({"image_size": 48}, {"n_mels": 40}, {"hop_length": 80}):
        with pytest.raises(NlmmError) as err:
            loader(out, data_cfg=DataConfig(**{**vars(CFG), **change}))
        message = str(err.value)
        assert "\n" not in message and message.count("; ") == 1
        key = next(iter(change))
        assert f"--set data.{key}={getattr(CFG, key)}" in message
        assert f"--set data.{key}={change[key]}" in message
    # every recording is 0.3 s: a longer or shorter cut above it gives the same log-mels
    assert len(loader(out, data_cfg=DataConfig(**{**vars(CFG), "max_audio_seconds": 1.0})))
    with pytest.raises(NlmmError, match="max_audio_seconds"):
        loader(out, data_cfg=DataConfig(**{**vars(CFG), "max_audio_seconds": 0.2}))


def seen_caption_id(names: dict, caps: dict, group: int, k: int) -> int:
    """Dense caption index: captions of lower group indices come first."""
    return sum(len(caps[names[g]]) for g in range(group)) + k


def test_augmented_batches_differ_from_plain_ones_and_rows_without_image_are_zero(packed):
    _, out = packed
    plain = next(iter(loader(out)))
    aug = next(iter(loader(out, crop=True, flip=True)))
    assert torch.equal(plain["image_ids"], aug["image_ids"])
    assert not torch.equal(plain["image"], aug["image"])


def test_iter_split_serves_every_group_once_with_all_its_captions(packed) -> None:
    corpus, out = packed
    for workers in (0, 2):
        groups, captions = [], []
        for b in iter_split(out, "train", batch_size=5, data_cfg=CFG, num_workers=workers):
            groups += b["image_ids"].tolist()
            captions += b["caption_ids"].tolist()
            assert len(b["caption_group"]) == len(b["text"]) == len(b["audio"])
            assert set(b["caption_group"].tolist()) == set(b["image_ids"].tolist())
        assert sorted(groups) == list(range(24))
        assert sorted(captions) == list(range(len(corpus.split_captions("train"))))


# --------------------------------------------------------------------------- resume

def ids(batches) -> list[list[int]]:
    return [b["caption_ids"].tolist() for b in batches]


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_epoch_serves_exactly_the_rest(packed, workers: int) -> None:
    _, out = packed
    straight = list(loader(out, num_workers=workers, crop=True, epoch=1))
    first = loader(out, num_workers=workers, crop=True, epoch=1)
    head = []
    for batch in first:
        head.append(batch)
        if len(head) == 3:
            break
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint file
    again = loader(out, num_workers=workers, crop=True, epoch=1)
    again.load_state_dict(state)
    tail = list(again)
    assert ids(head + tail) == ids(straight)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(head + tail, straight))
    # from the batch count alone (same topology)
    counted = list(loader(out, num_workers=workers, crop=True, epoch=1, start_batch=3))
    assert ids(counted) == ids(straight[3:])
    # the loader that stopped early goes on where it stopped when iterated again
    assert ids(head) + ids(first) == ids(straight)


def test_two_ranks_resume_exactly_and_never_share_a_group(packed) -> None:
    _, out = packed
    def rank(r, **kw):
        return loader(out, rank=r, world_size=2, num_workers=1, epoch=4, **kw)
    straight = [ids(rank(r)) for r in (0, 1)]
    g0 = {c for b in straight[0] for c in b}
    assert straight[0] and not g0 & {c for b in straight[1] for c in b}
    assert len(straight[0]) == len(straight[1]) == 3  # 24 groups // 4 // 2 ranks
    states = []
    for r in (0, 1):
        first = rank(r)
        head = [next(iter(first))]
        states.append(first.state_dict())
        again = rank(r)
        again.load_state_dict(states[r])
        assert ids(head) + ids(again) == straight[r]
    # ranks stay in lockstep, so rank 0's state (the one last.pt keeps) resumes rank 1 too
    again = rank(1)
    again.load_state_dict(states[0])
    assert ids(again) == straight[1][1:]


def test_resume_with_another_worker_count_keeps_the_order(packed) -> None:
    _, out = packed
    straight = ids(loader(out, num_workers=2))
    first = loader(out, num_workers=2)
    it = iter(first)
    head = [next(it), next(it), next(it)]
    again = loader(out, num_workers=1)
    again.load_state_dict(first.state_dict())
    assert ids(head) + ids(again) == straight


def global_steps(out: Path, world: int, global_batch: int = 4, **kw) -> list[dict]:
    """Each global step of an epoch read by `world` ranks: their batches joined in rank order."""
    ranks = [list(loader(out, rank=r, world_size=world, batch_size=global_batch // world,
                         num_workers=1, **kw)) for r in range(world)]
    return [{k: torch.cat([b[k] for b in step]) for k in ("caption_ids", "image")}
            for step in zip(*ranks, strict=True)]


def test_every_rank_count_serves_the_same_global_steps_and_augmentation(packed) -> None:
    _, out = packed
    one = global_steps(out, 1, crop=True, flip=True, epoch=3)
    assert len(one) == 24 // 4
    for world in (2, 4):
        many = global_steps(out, world, crop=True, flip=True, epoch=3)
        assert [s["caption_ids"].tolist() for s in many] == [s["caption_ids"].tolist() for s in one]
        assert all(torch.equal(a["image"], b["image"]) for a, b in zip(many, one, strict=True))


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2), (2, 4)])
def test_resume_on_another_number_of_ranks_serves_exactly_the_rest(packed, before, after) -> None:
    """`before` ranks stop after 2 global steps; `after` ranks resume from rank 0's state and
    serve the global steps an uninterrupted run serves next, row for row."""
    _, out = packed
    straight = [s["caption_ids"].tolist() for s in global_steps(out, before)]
    states, heads = [], []
    for r in range(before):
        first = loader(out, rank=r, world_size=before, batch_size=4 // before, num_workers=1)
        it = iter(first)
        heads.append([next(it)["caption_ids"].tolist() for _ in range(2)])
        states.append(json.loads(json.dumps(first.state_dict())))
    assert all(state == states[0] for state in states)  # one state for every rank
    rests = []
    for r in range(after):
        again = loader(out, rank=r, world_size=after, batch_size=4 // after, num_workers=2)
        again.load_state_dict(states[0])
        rests.append([b["caption_ids"].tolist() for b in again])
    head = [[c for rank in heads for c in rank[k]] for k in range(2)]
    rest = [[c for rank in rests for c in rank[k]] for k in range(len(rests[0]))]
    assert head + rest == straight


@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")
def test_samples_per_epoch_is_a_budget_and_too_few_groups_is_one_sentence(packed) -> None:
    _, out = packed
    assert len(list(loader(out, samples_per_epoch=9))) == 2
    with pytest.raises(NlmmError) as err:
        loader(out, batch_size=8, world_size=4)
    assert "fewer than one batch" in str(err.value) and "\n" not in str(err.value)
    # more workers than a rank has batches: they are not started, nothing hangs
    assert len(list(loader(out, num_workers=8, batch_size=8))) == 3


# --------------------------------------------------------------------------- robustness

def test_defects_are_reported_and_skipped(tmp_path) -> None:
    corpus = tiny_corpus(tmp_path / "c", n=12)
    bad_image = corpus.groups[0].image  # group 0 has a clip: image dropped, group kept
    bad_image.write_bytes(b"not an image")
    corpus.groups[2].image.write_bytes(corpus.groups[2].image.read_bytes()[:100])  # truncated
    reading = next(c.audio for c in corpus.captions if c.audio is not None)
    reading.write_bytes(b"")
    report = pack(corpus, tmp_path / "p", vocab_size=VOCAB, data_cfg=CFG, chunk_bytes=CHUNK,
                  workers=1, progress=False)
    reasons = {d.item: d.reason for d in report.defects}
    assert "image skipped; the clip and captions kept" in reasons[bad_image.name]
    assert "image and its captions skipped" in reasons[corpus.groups[2].image.name]
    assert "caption kept without audio" in reasons[reading.name]
    assert report.counts["train"]["groups"] == 7 and report.counts["train"]["images"] == 6


def test_non_empty_output_is_refused_without_force(packed, tmp_path) -> None:
    corpus, _ = packed
    out = tmp_path / "p"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(NlmmError) as err:
        pack(corpus, out, vocab_size=VOCAB, data_cfg=CFG, chunk_bytes=CHUNK, progress=False)
    assert "force" in str(err.value) and "\n" not in str(err.value)
    assert (out / "notes.txt").read_text() == "mine"
    pack(corpus, out, vocab_size=VOCAB, data_cfg=CFG, chunk_bytes=CHUNK, progress=False,
         force=True)
    assert not (out / "notes.txt").exists() and (out / MANIFEST).is_file()


def test_corrupted_shard_is_named_in_one_sentence_and_repaired_alone(packed, tmp_path) -> None:
    corpus, ref = packed
    out = tmp_path / "p"
    pack(corpus, out, vocab_size=VOCAB, data_cfg=CFG, chunk_bytes=CHUNK, workers=1,
         progress=False)
    shard = out / "train" / "chunk-00002.bin"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte
    shard.write_bytes(bytes(data))
    assert verify_pack(out) == ["train/chunk-00002.bin"]
    with pytest.raises(NlmmError) as err:
        list(loader(out, num_workers=2))
    message = str(err.value)
    assert "train/chunk-00002.bin" in message and "\n" not in message
    assert message.count(". ") == 0 and message.endswith(".")
    # a truncated shard is found before litdata would wait for the missing bytes
    other = out / "train" / "chunk-00001.bin"
    keep = other.read_bytes()
    other.write_bytes(keep[:-10])
    with pytest.raises(NlmmError, match="chunk-00001.bin"):
        loader(out)
    other.write_bytes(keep)
    # a rerun of pack rewrites just the corrupted shard
    before = {p: p.stat().st_mtime_ns for p in (out / "train").glob("chunk-*.bin")}
    time.sleep(0.01)
    report = pack(corpus, out, vocab_size=VOCAB, data_cfg=CFG, chunk_bytes=CHUNK, workers=1,
                  progress=False)
    changed = [p.name for p in before if p.stat().st_mtime_ns != before[p]]
    assert changed == ["chunk-00002.bin"] and report.blocks_done_before > 0
    assert shard_hashes(out) == shard_hashes(ref)
    assert len(list(loader(out))) == 6


def test_a_chunk_is_hashed_once_per_machine_until_it_changes(packed, monkeypatch) -> None:
    import nlmm.data.pack_reader as pack_reader

    _, out = packed
    hashed = []
    real = pack_reader.sha256_file
    monkeypatch.setattr(pack_reader, "sha256_file", lambda p: hashed.append(p.name) or real(p))
    first = ids(loader(out))
    shards = len(list((out / "train").glob("chunk-*.bin")))
    assert sorted(hashed) == sorted({*hashed}) and len(hashed) == shards
    assert ids(loader(out)) == first and len(hashed) == shards  # the memos say: checked
    changed = out / "train" / "chunk-00001.bin"
    os.utime(changed, ns=(time.time_ns(), time.time_ns()))  # same bytes, another file state
    assert ids(loader(out)) == first and hashed[shards:] == [changed.name]


KILL_SCRIPT = """
import sys, time
import nlmm.data.packed as packed
sys.path.insert(0, {tests!r})
from test_packed import tiny_corpus, VOCAB, CHUNK, CFG
real = packed.pack_block
def slow(job):
    time.sleep(0.4)
    return real(job)
packed.pack_block = slow
corpus = tiny_corpus(__import__("pathlib").Path({root!r}), write=False)
packed.pack(corpus, {out!r}, vocab_size=VOCAB, data_cfg=CFG, chunk_bytes=CHUNK, workers=1,
            progress=False)
print("finished")
"""


def test_pack_killed_with_sigkill_resumes_into_identical_shards(packed, tmp_path) -> None:
    corpus, ref = packed
    out = tmp_path / "p"
    script = tmp_path / "slow_pack.py"
    script.write_text(KILL_SCRIPT.format(tests=str(Path(__file__).parent), root=str(corpus.root),
                                         out=str(out)))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    markers = out / ".pack" / "write"
    deadline = time.monotonic() + 120
    while not (markers.is_dir() and list(markers.glob("*.json"))):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the packing subprocess wrote no shard in 120 s"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    written = len(list(markers.glob("*.json")))
    assert not (out / MANIFEST).exists()
    report = pack(corpus, out, vocab_size=VOCAB, data_cfg=CFG, chunk_bytes=CHUNK, workers=2,
                  progress=False)
    assert report.blocks_done_before >= written
    assert shard_hashes(out) == shard_hashes(ref)


GLOO_SCRIPT = """
import json, os, sys
import torch.distributed as dist
sys.path.insert(0, {tests!r})
from test_packed import loader, ids
dist.init_process_group("gloo", init_method="file://" + {store!r}, rank=int(os.environ["RANK"]),
                        world_size=2)
r, w = dist.get_rank(), dist.get_world_size()
straight = ids(loader({out!r}, rank=r, world_size=w, num_workers=2, epoch=1))
first = loader({out!r}, rank=r, world_size=w, num_workers=2, epoch=1)
head = [next(iter(first))]
state = first.state_dict()
again = loader({out!r}, rank=r, world_size=w, num_workers=2, epoch=1)
again.load_state_dict(state)
json.dump({{"straight": straight, "resumed": ids(head) + ids(again)}},
          open({result!r}.format(r), "w"))
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_two_gloo_processes_resume_exactly(packed, tmp_path) -> None:
    """Two real torch.distributed ranks (gloo): litdata needs no process group, and with one
    the loader still takes the rank it is given; each rank resumes into its own rest."""
    _, out = packed
    script = tmp_path / "ddp.py"
    result = str(tmp_path / "rank{}.json")
    script.write_text(GLOO_SCRIPT.format(tests=str(Path(__file__).parent), out=str(out),
                                         store=str(tmp_path / "pg"), result=result))
    procs = [subprocess.Popen([sys.executable, str(script)], env={**os.environ, "RANK": str(r)},
                              stderr=subprocess.PIPE) for r in (0, 1)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read().decode()[-3000:]
    runs = [json.loads(Path(result.format(r)).read_text()) for r in (0, 1)]
    for run in runs:
        assert run["straight"] and run["resumed"] == run["straight"]
    seen = [c for run in runs for b in run["straight"] for c in b]
    assert len(seen) == len(set(seen)) == 24  # the two ranks split the epoch
