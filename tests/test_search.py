"""`nlmm search`: a tiny model trained once on the synthetic corpus and registered as a finished
run, then queried in-process (`Searcher`, `run_search`) and through the real `nlmm` command."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio
from PIL import Image

from tiny import NullSink, SMALL_MODEL, tiny_config
from nlmm import store
from nlmm.config import resolve_config
from nlmm.data.cache import PreparedCache
from nlmm.data.features import normalize_images
from nlmm.data.loader import gather_images
from nlmm.errors import NlmmError
from nlmm.inference.weights_cache import checkpoint_key
from nlmm.search.engine import SearchRequest, Searcher, prune_indexes, run_search, top_k
from nlmm.inference.checkpoint import load_checkpoint, save_checkpoint
from nlmm.train.loop import CheckpointEvent, Trainer

NLMM = Path(sys.executable).with_name("nlmm")
RUN_NAME = "searchable"
# Share of test captions whose own image must be among the top 5 of the ~30 test images.
# Chance is 5/30 ≈ 17%; the tiny model trained for two epochs reaches about 70%.
TEXT_TOP5_REQUIRED = 0.40


@dataclass
class Trained:
    runs: Path
    checkpoint: Path
    cache: PreparedCache


@pytest.fixture(scope="module")
def trained(synth_cache: PreparedCache, tmp_path_factory: pytest.TempPathFactory):
    """Two epochs of a tiny model on the synthetic corpus, recorded in the store like a worker
    does: a finished run whose best checkpoint `nlmm search` picks by default.

    The module runs torch on one thread: its single-query matmuls are too small to split, and
    on a busy 2-core machine two threads wait on each other at every op (about 10x slower)."""
    runs = tmp_path_factory.mktemp("search") / "runs"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("NLMM_RUNS_DIR", str(runs))
        env.delenv("NLMM_DB_URL", raising=False)
        cfg = tiny_config("train.batch_size=16", "train.epochs=2", "train.warmup_steps=10",
                          model=SMALL_MODEL)
        folder = store.run_dir(RUN_NAME)
        run = store.create_run(RUN_NAME, cfg.to_dict(), str(synth_cache.path), "cpu",
                               epochs_total=2, steps_total=None, log_path=str(folder / "train.log"))
        store.set_status(run.id, "running")

        def on_checkpoint(ev: CheckpointEvent) -> None:
            store.record_checkpoint(run.id, ev.progress.global_step, ev.progress.epoch,
                                    str(ev.path), ev.kind, ev.metrics, ev.kind == "best", ev.nbytes)

        trainer = Trainer(cfg, synth_cache, torch.device("cpu"), folder, NullSink(), on_checkpoint,
                          log=lambda m: None)
        assert trainer.fit() == "finished"
        store.set_status(run.id, "finished")
    yield Trained(runs, folder / "checkpoints" / "best.pt", synth_cache)
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def isolated_store(trained: Trained, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Replaces conftest's per-test store: every test here sees the store holding `trained`."""
    monkeypatch.setenv("NLMM_RUNS_DIR", str(trained.runs))
    monkeypatch.delenv("NLMM_DB_URL", raising=False)
    return trained.runs


@pytest.fixture(scope="module")
def searcher(trained: Trained) -> Searcher:
    return Searcher(trained.checkpoint, device="cpu")


@pytest.fixture
def copied(trained: Trained, tmp_path: Path) -> Path:
    """The trained checkpoint copied into a run folder of its own (so its index starts empty)."""
    path = tmp_path / "copy" / "checkpoints" / "best.pt"
    path.parent.mkdir(parents=True)
    shutil.copy(trained.checkpoint, path)
    return path


def caption_pairs(cache: PreparedCache) -> list[tuple[str, str]]:
    """(caption text, file of its image) for every caption of the test split."""
    return [(cache.caption_text(int(r)), cache.image_file(int(cache.caption_image(int(r)))))
            for r in cache.split_captions("test")]



def nlmm(*args: str, env_runs: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "NLMM_DB_URL"}
    # one thread each: the error cases run six processes at once
    env.update(NLMM_RUNS_DIR=str(env_runs), COLUMNS="1000", OMP_NUM_THREADS="1")
    return subprocess.Popen([str(NLMM), "search", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


# ------------------------------------------------------------------------------ retrieval

def test_text_queries_find_their_image_in_the_top_5(searcher: Searcher, trained: Trained):
    cache = trained.cache
    captions = caption_pairs(cache)
    n_images = len(cache.split_images("test"))
    found = sum(image in [h.item for h in searcher.query(text=text, k=5)]
                for text, image in captions)
    rate, chance = found / len(captions), 5 / n_images
    print(f"text→image top-5: {rate:.0%} of {len(captions)} test captions (chance {chance:.0%})")
    assert rate >= TEXT_TOP5_REQUIRED, (
        f"only {rate:.0%} of test captions found their image in the top 5; required "
        f"{TEXT_TOP5_REQUIRED:.0%}, chance {chance:.0%}")

    # Reference ranking computed plainly: every test image embedded from the cache, one dot
    # product per image, sorted in Python.
    model, tok = searcher.loaded.model, searcher.loaded.tokenizer
    rows = cache.split_images("test")
    with torch.no_grad():
        image_emb = model.encode("image", normalize_images(gather_images(cache, rows)))
    for text, _ in captions[:5]:
        ids, n = tok.encode_batch([text], searcher.loaded.cfg.data.text_max_len)
        with torch.no_grad():
            q = model.encode("text", torch.as_tensor(ids[:, :n[0]], dtype=torch.long))[0]
        ranked = sorted(((float(q @ image_emb[i]), cache.image_file(int(r)))
                         for i, r in enumerate(rows)), reverse=True)[:5]
        hits = searcher.query(text=text, k=5)
        assert [h.item for h in hits] == [name for _, name in ranked]
        assert [h.score for h in hits] == pytest.approx([s for s, _ in ranked], abs=1e-5)
        assert [h.rank for h in hits] == [1, 2, 3, 4, 5]


def test_cli_searches_the_latest_finished_run_and_reuses_its_index(searcher: Searcher,
                                                                  trained: Trained,
                                                                  tmp_path: Path):
    cache = trained.cache
    text, _ = caption_pairs(cache)[3]
    expected = searcher.query(text=text, k=4)  # also makes sure the image index is on disk
    index_file = searcher.index_path("test", "image")
    inode = index_file.stat().st_ino
    wav_row = int(cache.split_audio_captions("test")[7])
    wav = cache.wav_path(wav_row)

    by_default = nlmm(text, "-k", "4", "--json", "--device", "cpu", env_runs=trained.runs)
    by_audio = nlmm("--audio", str(wav), "--in", "text", "--run", RUN_NAME, "-k", "3", "--json",
                    "--device", "cpu", env_runs=trained.runs)
    code, out, err = finish(by_default)
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [(h["rank"], h["modality"], h["item"]) for h in lines] == \
        [(h.rank, h.modality, h.item) for h in expected]
    assert [h["score"] for h in lines] == pytest.approx([h.score for h in expected], abs=1e-5)
    assert all(Path(h["path"]).is_file() for h in lines)
    assert index_file.stat().st_ino == inode, "the command rebuilt an index that was cached"

    code, out, err = finish(by_audio)
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == 3 and {h["modality"] for h in lines} == {"text"}
    test_texts = {cache.caption_text(int(r)) for r in cache.split_captions("test")}
    assert all(h["caption"] in test_texts and h["item"] == h["caption"] for h in lines)
    assert searcher.index_path("test", "text").is_file()


def test_queries_from_image_and_audio_files(searcher: Searcher, trained: Trained, tmp_path: Path):
    cache = trained.cache
    image_row = int(cache.split_images("test")[4])
    # A larger RGBA PNG of a test image: resized and converted like the training images.
    with Image.open(cache.image_path(image_row)) as img:
        big = img.convert("RGBA").resize((img.width * 3 // 2, img.height * 3 // 2),
                                         Image.BICUBIC)
    png = tmp_path / "query.png"
    big.save(png)
    hits = searcher.query(image=png, target="image", k=3)
    assert hits[0].item == cache.image_file(image_row) and hits[0].score > 0.99

    transcript = {name: cache.caption_text(row)
                  for row in range(cache.n_captions) if (name := cache.caption_wav(row))}
    to_audio = searcher.query(image=cache.image_path(image_row), target="audio", k=5)
    assert [h.modality for h in to_audio] == ["audio"] * 5
    assert all(Path(h.path).is_file() and h.caption == transcript[h.item] for h in to_audio)
    assert [h.score for h in to_audio] == sorted((h.score for h in to_audio), reverse=True)

    # A spoken caption as 44.1 kHz stereo (channels 1.2x and 0.8x): resampled to 16 kHz and
    # averaged to mono, it must embed next to the cached original.
    audio_rows = cache.split_audio_captions("test")
    row = int(audio_rows[11])
    wave, rate = sf.read(str(cache.wav_path(row)), dtype="float32")
    up = torchaudio.functional.resample(torch.from_numpy(wave), rate, 44100).numpy()
    stereo = tmp_path / "query.wav"
    sf.write(stereo, np.stack([1.2 * up, 0.8 * up], axis=1), 44100)
    original = searcher.query(audio=cache.wav_path(row), target="audio", k=1)
    assert original[0].item == cache.wav_path(row).name and original[0].score > 0.995
    hits = searcher.query(audio=stereo, target="audio", k=5)
    # a resampling round trip is lossy: the clip stays first, well clear of every other one
    assert hits[0].item == cache.wav_path(row).name, [(h.item, h.score) for h in hits]
    assert hits[0].score > 0.85 and hits[0].score - hits[1].score > 0.05

    to_image = searcher.query(audio=stereo, k=4)
    assert [h.modality for h in to_image] == ["image"] * 4
    to_text = searcher.query(audio=stereo, target="text", k=4)
    assert [h.modality for h in to_text] == ["text"] * 4
    assert all(h.caption == h.item for h in to_text)
    with_ttt = searcher.query(audio=stereo, target="text", k=4, ttt=True)
    assert [h.score for h in with_ttt] != [h.score for h in to_text]  # --ttt adapts the query


def test_split_all_searches_every_split(searcher: Searcher, trained: Trained):
    cache = trained.cache
    text, image = caption_pairs(cache)[0]
    n_all = sum(len(cache.split_images(s)) for s in ("train", "dev", "test"))
    hits = searcher.query(text=text, k=n_all + 10, split="all")
    assert len(hits) == n_all and len({h.item for h in hits}) == n_all
    train_caption = cache.caption_text(int(cache.split_captions("train")[0]))
    assert len(searcher.query(text=train_caption, target="text", split="train", k=1)) == 1


def first_caption_of(cache: PreparedCache, image_row: int) -> str:
    """The caption listed first for an image, found by scanning every caption."""
    rows = [c for c in range(cache.n_captions) if int(cache.caption_image(c)) == image_row]
    return cache.caption_text(min(rows))


def test_each_hit_names_its_image_and_an_image_hit_its_first_caption(searcher: Searcher,
                                                                     trained: Trained):
    cache = trained.cache
    text, _ = caption_pairs(cache)[2]
    image_row = {cache.image_file(int(r)): int(r) for r in cache.split_images("test")}
    for hit in searcher.query(text=text, k=3):
        assert hit.image_id == hit.item
        assert hit.caption == first_caption_of(cache, image_row[hit.item])
    captions = {cache.caption_text(int(r)): int(r) for r in cache.split_captions("test")}
    for hit in searcher.query(text=text, target="text", k=3):
        assert hit.image_id == cache.image_file(int(cache.caption_image(captions[hit.item])))
        assert hit.to_dict()["image_id"] == hit.image_id
    for hit in searcher.query(text=text, target="audio", k=3):
        assert hit.image_id == cache.image_file(int(cache.caption_image(captions[hit.caption])))


def rich_table(out: str) -> tuple[str, list[str], list[list[str]]]:
    """(title, header cells, row cells) of the one Rich table printed in `out`."""
    lines = out.splitlines()
    top = next(i for i, line in enumerate(lines) if line.lstrip().startswith("┏"))
    title = " ".join(" ".join(lines[:top]).split())
    header = [c.strip() for c in lines[top + 1].split("┃")[1:-1]]
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in lines[top + 3:]
            if line.lstrip().startswith("│")]
    return title, header, rows


def test_cli_table_names_what_was_searched_and_json_says_the_gallery_size(trained: Trained):
    cache = trained.cache
    text, _ = caption_pairs(cache)[1]
    n_images = len(cache.split_images("test"))
    to_images = nlmm(text, "-k", "2", "--device", "cpu", env_runs=trained.runs)
    to_text = nlmm(text, "--in", "text", "-k", "2", "--device", "cpu", env_runs=trained.runs)
    everything = nlmm(text, "-k", "100000", "--json", "--device", "cpu", env_runs=trained.runs)

    code, out, err = finish(to_images)
    assert code == 0, err
    title, header, rows = rich_table(out)
    assert title.startswith(f"images for text query {text!r} in the test split ({n_images} "
                            f"images) — run {RUN_NAME}, best.pt (step "), title
    assert header == ["rank", "score", "image", "its first caption"]
    image_row = {cache.image_file(int(r)): int(r) for r in cache.split_images("test")}
    assert len(rows) == 2
    for _, _, image, caption in rows:
        assert caption == first_caption_of(cache, image_row[image])

    code, out, err = finish(to_text)
    assert code == 0, err
    title, header, rows = rich_table(out)
    assert title.startswith(f"captions for text query {text!r} in the test split")
    assert header == ["rank", "score", "caption", "image"]
    captions = {cache.caption_text(int(r)): int(r) for r in cache.split_captions("test")}
    for _, _, caption, image in rows:  # the caption once, then the image it describes
        assert image == cache.image_file(int(cache.caption_image(captions[caption])))

    code, out, err = finish(everything)
    assert code == 0, err
    assert len(out.splitlines()) == n_images
    assert err.strip() == (f"-k 100000 asked for more than the {n_images} images of the test "
                           "split; all are shown")


# ------------------------------------------------------------------------------ the index

def count_encodes(searcher: Searcher) -> list[str]:
    calls: list[str] = []
    encode = searcher.loaded.model.encode

    def counted(modality, x, mask=None):
        calls.append(modality)
        return encode(modality, x, mask)

    searcher.loaded.model.encode = counted
    return calls


def test_index_is_reused_then_rebuilt_after_the_checkpoint_changes(copied: Path, trained: Trained):
    text, _ = caption_pairs(trained.cache)[5]
    first = Searcher(copied, device="cpu")
    assert first.checkpoint_key == checkpoint_key(copied) is not None
    before = first.query(text=text, k=5)
    assert first.builds == 1
    index_file = first.index_path("test", "image")
    assert index_file.parent == copied.parent.parent / "index" and index_file.is_file()

    again = Searcher(copied, device="cpu")
    calls = count_encodes(again)
    assert [(h.item, h.score) for h in again.query(text=text, k=5)] == \
        [(h.item, h.score) for h in before]
    assert again.builds == 0 and calls == ["text"], "the cached gallery was encoded again"

    payload = load_checkpoint(copied)
    name = next(k for k, v in payload["model"].items() if v.dtype.is_floating_point and v.ndim == 2)
    payload["model"][name] = payload["model"][name] * 1.5
    save_checkpoint(copied, payload)
    changed = Searcher(copied, device="cpu")
    assert changed.checkpoint_key == checkpoint_key(copied) != first.checkpoint_key
    after = changed.query(text=text, k=5)
    assert changed.builds == 1
    assert changed.index_path("test", "image") != index_file
    assert changed.index_path("test", "image").is_file()
    assert [h.score for h in after] != pytest.approx([h.score for h in before], abs=1e-4)


@pytest.mark.parametrize("damage", ["torn", "garbage", "wrong_shape"])
def test_damaged_index_file_is_a_miss_and_is_rebuilt(copied: Path, trained: Trained, damage: str):
    text, _ = caption_pairs(trained.cache)[2]
    first = Searcher(copied, device="cpu")
    good = first.query(text=text, k=5)
    path = first.index_path("test", "image")
    body = path.read_bytes()
    if damage == "torn":
        path.write_bytes(body[:len(body) // 2])
    elif damage == "garbage":
        path.write_bytes(np.random.default_rng(0).bytes(len(body)))
    else:
        np.save(path, np.zeros((3, first.loaded.cfg.embed_dim), dtype=np.float32))
    second = Searcher(copied, device="cpu")
    assert [(h.item, h.score) for h in second.query(text=text, k=5)] == \
        [(h.item, pytest.approx(h.score, abs=1e-6)) for h in good]
    assert second.builds == 1
    assert path.read_bytes() == body  # the rebuilt file holds the same embeddings again
    assert not [p for p in path.parent.iterdir() if ".tmp-" in p.name]


def test_streamed_gallery_gives_the_in_memory_results(searcher: Searcher, trained: Trained):
    streamed = Searcher(trained.checkpoint, device="cpu", max_memory_bytes=0)
    for text, _ in caption_pairs(trained.cache)[:4]:
        hits = streamed.query(text=text, target="audio", k=6)
        assert streamed.gallery("test", "audio").streamed
        assert [(h.item, h.score) for h in hits] == \
            [(h.item, pytest.approx(h.score, abs=1e-6))
             for h in searcher.query(text=text, target="audio", k=6)]
    assert not searcher.gallery("test", "audio").streamed


def test_faiss_backend_gives_the_exact_results(searcher: Searcher, trained: Trained):
    pytest.importorskip("faiss", reason="faiss-cpu is not installed (pip install 'nlmm[faiss]')")
    with_faiss = Searcher(trained.checkpoint, device="cpu", backend="faiss")
    for text, _ in caption_pairs(trained.cache)[:4]:
        assert [(h.item, pytest.approx(h.score, abs=1e-5))
                for h in with_faiss.query(text=text, target="text", k=7)] == \
            [(h.item, h.score) for h in searcher.query(text=text, target="text", k=7)]
    assert with_faiss.gallery("test", "text").faiss_index is not None


def test_top_k_over_chunks_matches_a_full_sort():
    rng = np.random.default_rng(1)
    gallery = rng.standard_normal((1000, 16)).astype(np.float32)
    queries = rng.standard_normal((3, 16)).astype(np.float32)
    scores = queries @ gallery.T
    for k in (1, 10, 100):
        want = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        for source in (torch.from_numpy(gallery), gallery):  # tensor, or numpy like a memmap
            s, i = top_k(torch.from_numpy(queries), source, k, chunk=64)
            np.testing.assert_array_equal(i.numpy(), want)
            np.testing.assert_allclose(s.numpy(), np.take_along_axis(scores, want, 1), rtol=1e-5)


def test_prune_keeps_the_most_recently_used_index_files(tmp_path: Path):
    files = []
    for i in range(30):
        path = tmp_path / f"image-test-{i:02d}.npy"
        np.save(path, np.zeros((2, 2), dtype=np.float32))
        os.utime(path, ns=(10**18 + i * 10**9, 10**18 + i * 10**9))
        files.append(path)
    (tmp_path / "notes.txt").write_text("not an index")
    removed = prune_indexes(tmp_path, keep=24)
    assert sorted(removed) == files[:6]
    assert sorted(tmp_path.glob("*.npy")) == files[6:]
    assert (tmp_path / "notes.txt").is_file()


# ------------------------------------------------------------------------------ errors

def test_run_search_checks_the_request_before_loading_a_model(trained: Trained):
    with pytest.raises(NlmmError, match="exactly one query"):
        run_search(SearchRequest(text="a dog", image=Path("x.jpg"), run="nosuch"))
    with pytest.raises(NlmmError, match="not both"):
        run_search(SearchRequest(text="a dog", run=RUN_NAME, checkpoint=trained.checkpoint))
    with pytest.raises(NlmmError, match="unknown split"):
        run_search(SearchRequest(text="a dog", split="val", run="nosuch"))
    with pytest.raises(NlmmError, match="query file .*gone.wav does not exist"):
        run_search(SearchRequest(audio=Path("gone.wav"), run="nosuch"))
    with pytest.raises(NlmmError, match="cannot search in 'video'"):
        run_search(SearchRequest(text="a dog", target="video", run="nosuch"))
    with pytest.raises(NlmmError, match="unknown search backend 'annoy'"):
        run_search(SearchRequest(text="a dog", backend="annoy", run="nosuch"))


def test_faiss_backend_without_faiss_says_how_to_install_it(trained: Trained,
                                                            monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` fail
    with pytest.raises(NlmmError, match=r"needs faiss-cpu; install it with .*nlmm\[faiss\]"):
        Searcher(trained.checkpoint, device="cpu", backend="faiss")


def test_each_error_is_one_sentence_and_a_nonzero_exit(trained: Trained, tmp_path: Path):
    payload = load_checkpoint(trained.checkpoint)
    payload["model"] = {f"renamed.{k}": v for k, v in payload["model"].items()}
    foreign = tmp_path / "old" / "checkpoints" / "best.pt"
    save_checkpoint(foreign, payload)
    not_an_image = tmp_path / "photo.jpg"
    not_an_image.write_text("these are not pixels")
    cases = {
        "no run named nosuch": ("a dog", "--run", "nosuch"),
        f"checkpoint {tmp_path / 'gone.pt'} does not exist": (
            "a dog", "--checkpoint", str(tmp_path / "gone.pt")),
        "does not match this version of nlmm's model": ("a dog", "--checkpoint", str(foreign)),
        f"cannot read query file {not_an_image}: not a readable image": (
            "--image", str(not_an_image)),
        "the text query is empty": ("  ",),
        "-k must be a positive number of results, got 0": ("a dog", "-k", "0"),
    }
    procs = {msg: nlmm(*args, "--device", "cpu", env_runs=trained.runs)
             for msg, args in cases.items()}
    for msg, proc in procs.items():
        code, out, err = finish(proc)
        assert code == 1, (msg, code, err)
        assert out == ""
        assert len(err.strip().splitlines()) == 1, err  # one line: no traceback, no log noise
        assert err.startswith("error: ") and msg in err, err


def test_dash_searcher_cache_reloads_a_checkpoint_rewritten_under_the_same_name(copied: Path):
    from console.search.searchers import SearcherCache

    searchers = SearcherCache()
    first = searchers.get(copied, None)
    assert searchers.get(copied, None) is first  # unchanged file: the loaded model is reused
    payload = load_checkpoint(copied)
    payload["model"] = {k: v + 0.5 if v.is_floating_point() else v
                        for k, v in payload["model"].items()}
    save_checkpoint(copied, payload)  # what a worker does when it saves a new best.pt
    second = searchers.get(copied, None)
    assert second is not first
    new, old = second.loaded.model.state_dict(), first.loaded.model.state_dict()
    name = next(k for k, v in new.items() if v.is_floating_point())
    assert torch.allclose(new[name], old[name] + 0.5)


def test_eval_on_another_corpus_tokenizes_it_with_the_models_tokenizer(trained: Trained,
                                                                        tmp_path: Path):
    from nlmm.data.cache import default_cache_dir
    from nlmm.data.corpora import read_corpus
    from nlmm.data.synth import synth_corpus
    from nlmm.data.tokenizer import TextTokenizer
    from nlmm.inference.load import load_for_inference
    from nlmm.eval.evaluate import evaluate_target

    other = tmp_path / "other"
    synth_corpus(other, n_images=60, seed=7, progress=False, engine="builtin")
    model_tokenizer = load_checkpoint(trained.checkpoint)["tokenizer"]
    corpus = read_corpus(other)
    train_images = {g.id for g in corpus.groups if g.split == "train"}
    own_tokenizer = TextTokenizer.train([c.text for c in corpus.captions if c.group in train_images],
                                        resolve_config("tiny_cpu").vocab_size)
    assert own_tokenizer.to_json() != model_tokenizer  # else this test would prove nothing

    out = subprocess.run([str(NLMM), "eval", str(trained.checkpoint), "--data", str(other),
                          "--device", "cpu", "--json"], capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, NLMM_RUNS_DIR=str(trained.runs)))
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout.splitlines()[-1])
    [cache_dir] = [p for p in (other / ".nlmm_cache").iterdir() if p.is_dir()]
    cache = PreparedCache.open(cache_dir)
    assert cache.tokenizer.to_json() == model_tokenizer
    assert results["coverage"]["n_images"] == len(cache.split_images("test"))
    # the same shapes and colours, tokenized as in training: retrieval works on the new corpus
    chance = 100 / results["coverage"]["n_images"]
    assert results["metrics"]["t2i_r1"] > 3 * chance, results["metrics"]

    # on its own corpus the run's cache (built with this very tokenizer) is reused, not rebuilt
    root = trained.cache.path.parents[1]
    cfg = load_for_inference(trained.checkpoint, device="cpu").cfg
    own = evaluate_target(str(trained.checkpoint), split="test", device="cpu", data=root)
    assert not default_cache_dir(root, cfg.data, cfg.vocab_size,
                                 TextTokenizer.from_json(model_tokenizer)).exists()
    assert own["coverage"]["n_images"] == len(trained.cache.split_images("test"))
