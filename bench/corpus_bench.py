"""Any corpus: prepare throughput per layout, and bi-modal learning quality at equal wall time.

One synthetic corpus (`nlmm.data.synth`, Flickr8k + FACC layout) is rewritten, without new
media, into three other layouts: the JPEGs are hard links to the synthetic corpus's files, so
every layout decodes the very same bytes.
  karpathy   dataset_flickr8k.json (images with split and sentences) beside images/
  csv        manifest.csv with filepath,title,split (one row per caption) beside images/
  audiocaps  dataset/{train,val,test}.csv (audiocap_id,youtube_id,start_time,caption) and
             audio/<split>/<audiocap_id>.wav: every spoken caption becomes a clip whose one
             caption is its text (hard links to the FACC WAVs)
and two Flickr8k baselines read by the flickr8k adapter:
  flickr8k-it    the Flickr8k layout without flickr_audio/ (image + text: what karpathy and
                 csv hold)
  flickr8k       the whole synthetic corpus (image + text + speech)

1. Prepare throughput: `prepare(..., force=True, workers=2)` of each layout, warmed once, then
   the minimum of `--repeats` timed runs, rounds interleaved across layouts so that load on
   the box falls on all of them alike. A sample is a caption row of the cache. karpathy and
   csv are compared with flickr8k-it; audiocaps decodes audio, not images, so it is compared
   with the whole flickr8k prepare and with that prepare less its image stage (the stage time
   prepare records in the cache manifest: the flickr8k reader cannot skip its images).
2. Quality: test mean R@1 of each `--configs` NL-MM (towers fitted to the corpus by
   `fit_modalities`; default tiny_cpu, the shipped default, and tiny_nlmm, the same with three
   CMS levels and memory) against the reference of bench/reference_model.py cut to the same two
   towers at its dev pick from quality_bench (`REFERENCE_PICK`: lr 1e-3, β2 0.98, a cosine,
   batch 32, the configs' 20 warmup steps), each trained for `--minutes` of the process's CPU
   time on one torch thread (data loading included, evaluation excluded;
   `quality_bench.timed_training`: CPU time does not stretch with the box's load), on karpathy
   (image-text) and audiocaps (text-audio). Test only, nothing selected on it.

    .venv/bin/python bench/corpus_bench.py
    .venv/bin/python bench/corpus_bench.py --skip-quality --repeats 9
    .venv/bin/python bench/corpus_bench.py --images 400 --repeats 1 --minutes 0.5
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import quality_bench  # noqa: E402
from quality_bench import run_nlmm  # noqa: E402
from reference_model import ReferenceEncoder  # noqa: E402

from nlmm.config import Config, resolve_config  # noqa: E402
from nlmm.data.cache import PreparedCache, prepare  # noqa: E402
from nlmm.data.corpora import read_corpus  # noqa: E402
from nlmm.data.corpora.base import Corpus, CorpusSpec  # noqa: E402
from nlmm.data.synth import synth_corpus  # noqa: E402
from nlmm.devices import resolve_device  # noqa: E402
from nlmm.metric_names import DIRECTIONS  # noqa: E402
from nlmm.model.losses import ForwardOutput, logit_scale_value  # noqa: E402
from nlmm.train.launcher import fit_modalities  # noqa: E402

RAW_SPLIT = {"train": "train", "dev": "val", "test": "test"}
LAYOUTS = ("flickr8k-it", "karpathy", "csv", "flickr8k", "audiocaps")
# the baseline each layout's throughput is divided by
BASELINE = {"flickr8k-it": "flickr8k-it", "karpathy": "flickr8k-it", "csv": "flickr8k-it",
            "flickr8k": "flickr8k", "audiocaps": "flickr8k"}
QUALITY = {"karpathy": "image-text", "audiocaps": "text-audio"}


# --------------------------------------------------------------------------- layouts

def link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.link(src, dst)


def split_captions(corpus: Corpus) -> list[tuple[str, list]]:
    """(split, captions) of every group prepare would keep (in a split, captioned), in order."""
    by_group: dict[str, list] = {}
    for c in corpus.captions:
        by_group.setdefault(c.group, []).append(c)
    return [(g.split, sorted(by_group[g.id], key=lambda c: c.index)) for g in corpus.groups
            if g.split is not None and g.id in by_group]


def write_flickr8k_image_text(src: Path, dst: Path) -> CorpusSpec:
    """The Flickr8k layout of `src` without flickr_audio/: its images and text files only."""
    for folder in ("Flickr8k_Dataset", "Flickr8k_text"):
        for f in (src / folder).iterdir():
            link(f, dst / folder / f.name)
    return CorpusSpec(dst, "flickr8k")


def write_karpathy(corpus: Corpus, dst: Path) -> CorpusSpec:
    images, sentid = [], 0
    images_by_id = {g.id: g for g in corpus.groups}
    for imgid, (split, caps) in enumerate(split_captions(corpus)):
        group = images_by_id[caps[0].group]
        link(group.image, dst / "images" / group.image.name)
        sentences = [{"raw": c.text, "tokens": c.text.lower().rstrip(".").split(),
                      "imgid": imgid, "sentid": sentid + k} for k, c in enumerate(caps)]
        sentid += len(caps)
        images.append({"filename": group.image.name, "imgid": imgid, "split": RAW_SPLIT[split],
                       "sentences": sentences, "sentids": [s["sentid"] for s in sentences]})
    (dst / "dataset_flickr8k.json").write_text(json.dumps({"images": images,
                                                           "dataset": "flickr8k"}))
    return CorpusSpec(dst, "karpathy")


def write_csv_manifest(corpus: Corpus, dst: Path) -> CorpusSpec:
    images_by_id = {g.id: g for g in corpus.groups}
    rows = []
    for split, caps in split_captions(corpus):
        image = images_by_id[caps[0].group].image
        link(image, dst / "images" / image.name)
        rows += [[f"images/{image.name}", c.text, RAW_SPLIT[split]] for c in caps]
    path = dst / "manifest.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "title", "split"])
        writer.writerows(rows)
    # columns left to the manifest's guesses, as a user with such a file would leave them
    return CorpusSpec(path, "manifest")


def youtube_id(name: str) -> str:
    """An 11-character YouTube-style id, unique per spoken caption and stable across runs."""
    return base64.urlsafe_b64encode(hashlib.sha1(name.encode()).digest()).decode()[:11]


def write_audiocaps(corpus: Corpus, dst: Path) -> CorpusSpec:
    rows: dict[str, list[list]] = {raw: [] for raw in RAW_SPLIT.values()}
    audiocap_id = 100000
    for split, caps in split_captions(corpus):
        raw = RAW_SPLIT[split]
        for c in caps:
            if c.audio is None:
                continue  # an unspoken caption has no clip to stand for
            audiocap_id += 1
            link(c.audio, dst / "audio" / raw / f"{audiocap_id}.wav")
            rows[raw].append([audiocap_id, youtube_id(c.audio.name), 0, c.text])
    for raw, lines in rows.items():
        path = dst / "dataset" / f"{raw}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["audiocap_id", "youtube_id", "start_time", "caption"])
            writer.writerows(lines)
    return CorpusSpec(dst, "audiocaps")


def write_layouts(folder: Path, images: int, seed: int, objects: int) -> dict[str, CorpusSpec]:
    root = folder / "flickr8k"
    start = time.perf_counter()
    counts = synth_corpus(root, n_images=images, seed=seed, engine="builtin", objects=objects,
                          progress=False)
    print(f"corpus: {counts} written in {time.perf_counter() - start:.0f} s", flush=True)
    corpus = read_corpus(CorpusSpec(root, "flickr8k"))
    return {"flickr8k-it": write_flickr8k_image_text(root, folder / "flickr8k-it"),
            "karpathy": write_karpathy(corpus, folder / "karpathy"),
            "csv": write_csv_manifest(corpus, folder / "csv"),
            "flickr8k": CorpusSpec(root, "flickr8k"),
            "audiocaps": write_audiocaps(corpus, folder / "audiocaps")}


# --------------------------------------------------------------------------- throughput

@dataclass
class Prepared:
    seconds: float           # min over the repeats
    samples: int             # caption rows
    groups: dict[str, int]   # groups per split
    modalities: tuple[str, ...]
    stages: dict[str, float]  # prepare's own stage times, of the fastest repeat
    cache: PreparedCache     # the last build

    @property
    def rate(self) -> float:
        return self.samples / self.seconds


def time_prepares(specs: dict[str, CorpusSpec], cfg: Config, repeats: int,
                  workers: int) -> dict[str, Prepared]:
    times: dict[str, list[tuple[float, dict[str, float]]]] = {name: [] for name in specs}
    last: dict[str, PreparedCache] = {}
    for round_ in range(repeats + 1):  # round 0 warms page cache, imports and worker start-up
        for name, spec in specs.items():
            start = time.perf_counter()
            cache = prepare(spec, cfg.data, cfg.vocab_size, workers=workers, progress=False,
                            force=True)
            seconds = time.perf_counter() - start
            last[name] = cache
            if round_:
                times[name].append((seconds, dict(cache.manifest["build_seconds"])))
        if round_:
            print(f"prepare round {round_}: " + ", ".join(
                f"{n} {t[-1][0]:.1f} s" for n, t in times.items())
                + f" (load average {os.getloadavg()[0]:.1f})", flush=True)
    out = {}
    for name, runs in times.items():
        seconds, stages = min(runs, key=lambda r: r[0])
        cache = last[name]
        out[name] = Prepared(seconds, cache.n_captions,
                             {s: len(cache.split_groups(s)) for s in ("train", "dev", "test")},
                             cache.modalities(), stages, cache)
    return out


def throughput_table(results: dict[str, Prepared]) -> str:
    lines = ["| layout | modalities | groups train/dev/test | samples | prepare s (min) | "
             "stages images / audio / tokens s | samples/s | × flickr8k reader |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        base = results[BASELINE[name]]
        g, st = r.groups, r.stages
        lines.append(f"| {name} | {'+'.join(r.modalities)} | {g['train']}/{g['dev']}/{g['test']} "
                     f"| {r.samples} | {r.seconds:.2f} | {st.get('images', 0):.2f} / "
                     f"{st.get('audio', 0):.2f} / {st.get('tokens', 0):.2f} | {r.rate:.0f} | "
                     f"{r.rate / base.rate:.2f} (vs {BASELINE[name]}) |")
    full, ac = results["flickr8k"], results["audiocaps"]
    # the flickr8k reader decodes its images whatever is asked: its audio+text share is the
    # whole prepare less the image stage prepare itself timed
    audio_only = full.seconds - full.stages.get("images", 0.0)
    lines.append(f"| flickr8k less its image stage (derived) | text+audio | – | {full.samples} | "
                 f"{audio_only:.2f} | – | {full.samples / audio_only:.0f} | "
                 f"audiocaps / this: {ac.rate / (full.samples / audio_only):.2f} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- quality

class BiModalReference(ReferenceEncoder):
    """The reference encoder with only the towers of `modalities` (bench/reference_model.py
    builds all three and its forward expects image and audio in every batch)."""

    def __init__(self, vocab_size: int, n_mels: int, modalities: tuple[str, ...]) -> None:
        super().__init__(vocab_size, n_mels)
        for m in [m for m in self.towers if m not in modalities]:
            del self.towers[m]  # a tower with no data would only add parameters to AdamW

    @property
    def modalities(self) -> tuple[str, ...]:
        # read by nlmm's evaluate_split, so only the towers that exist are embedded
        return tuple(self.towers)

    def forward(self, batch: dict[str, torch.Tensor]) -> ForwardOutput:
        emb = {"text": self.encode("text", batch["text"], batch["text_mask"])}
        audio_rows = None
        if "audio" in self.towers:
            audio_rows = batch["has_audio"].bool()
            emb["audio"] = self.encode("audio", batch["audio"][audio_rows],
                                       batch["audio_mask"][audio_rows])
        if "image" in self.towers:
            emb["image"] = self.encode("image", batch["image"])
        return ForwardOutput(emb, batch["image_ids"], audio_rows,
                             logit_scale_value(self.logit_scale))


# The reference's pick on corpus B's dev split (bench/RESULTS.md, "Learning quality"): lr, β2,
# schedule and batch searched as carefully as NL-MM's.
REFERENCE_PICK = quality_bench.Setting(lr=1e-3, beta2=0.98, schedule="cosine", batch=32)


def run_reference(cfg: Config, cache: PreparedCache, device: torch.device,
                  budgets_s: list[float]) -> dict[float, dict[str, float]]:
    """quality_bench.run_reference at REFERENCE_PICK, cut to the corpus's two modalities."""
    pick = REFERENCE_PICK
    return quality_bench.run_reference(
        cfg, cache, device, budgets_s, pick.batch,
        build=lambda: BiModalReference(cache.tokenizer.vocab_size, cfg.data.n_mels,
                                       cache.modalities()),
        lr=pick.lr, beta2=pick.beta2, schedule=pick.schedule, warmup=cfg.train.warmup_steps,
        clock=time.process_time)


def quality(caches: dict[str, PreparedCache], configs: list[str], overrides: list[str],
            budget_s: float, device: torch.device, folder: Path
            ) -> dict[str, dict[str, dict[str, float]]]:
    results: dict[str, dict[str, dict[str, float]]] = {}
    for name, cache in caches.items():
        fitted = {c: fit_modalities(resolve_config(c, overrides), cache.modalities(), None)
                  for c in configs}
        results[name] = {}
        for arm in ("reference", *configs):
            start = time.perf_counter()
            cfg = fitted[configs[0] if arm == "reference" else arm]
            if arm == "reference":  # the first config's data settings, seed and warmup
                by_budget = run_reference(cfg, cache, device, [budget_s])
            else:
                by_budget = run_nlmm(cfg, cache, device, [budget_s], folder / f"{arm}-{name}",
                                     clock=time.process_time)
            m = results[name][arm] = by_budget[budget_s]
            print(f"{name} ({'+'.join(cfg.modalities)}) {arm}: mean R@1 {m['mean_r1']:.1f} after "
                  f"{m['steps']} steps ({time.perf_counter() - start:.0f} s with evaluation; "
                  f"load average {os.getloadavg()[1]:.1f} over the last 5 min)", flush=True)
    return results


def quality_table(results: dict[str, dict[str, dict[str, float]]], budget_s: float,
                  caches: dict[str, PreparedCache]) -> str:
    lines = ["| corpus | modalities | test groups | arm | steps | R@1 per direction | mean R@1 "
             "| × reference |", "|---|---|---|---|---|---|---|---|"]
    for name, arms in results.items():
        ref = arms["reference"]["mean_r1"]
        cache = caches[name]
        for arm, m in arms.items():
            dirs = ", ".join(f"{d} {m[f'{d}_r1']:.1f}" for d in DIRECTIONS if f"{d}_r1" in m)
            label = arm if arm == "reference" else f"`{arm}`"
            lines.append(f"| {name} | {'+'.join(cache.modalities())} | "
                         f"{len(cache.split_groups('test'))} | {label} "
                         f"({budget_s / 60:g} CPU min) | {m['steps']} | {dirs} | {m['mean_r1']:.1f} | "
                         f"{m['mean_r1'] / ref:.2f} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1200, help="synthetic corpus size")
    parser.add_argument("--objects", type=int, default=3, help="objects per synthetic image")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="timed prepares per layout")
    parser.add_argument("--workers", type=int, default=2, help="prepare's worker processes")
    parser.add_argument("--configs", default="tiny_cpu,tiny_nlmm",
                        help="NL-MM config names or YAML paths, comma-separated")
    parser.add_argument("--set", action="append", default=[], help="extra NL-MM config override")
    parser.add_argument("--minutes", type=float, default=3.0,
                        help="training budget per arm, in CPU minutes of this process")
    parser.add_argument("--skip-quality", action="store_true")
    # one thread: a CPU-time budget is only equal compute when no arm runs threads that wait on
    # each other (two OpenMP threads on two busy cores stall each other for seconds per step)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for training")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    device = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    configs = [c for c in args.configs.split(",") if c]
    cfg = resolve_config(configs[0], args.set)
    print(f"# corpus_bench: {harness.stamp()} · {args.images} images, {args.objects} objects, "
          f"seed {args.seed}, {args.minutes:g} CPU min per arm", flush=True)

    with tempfile.TemporaryDirectory(prefix="nlmm-corpus-") as tmp:
        folder = Path(tmp)
        os.environ.setdefault("NLMM_RUNS_DIR", str(folder / "runs"))
        specs = write_layouts(folder, args.images, args.seed, args.objects)
        prepared = time_prepares(specs, cfg, args.repeats, args.workers)
        print(f"\nprepare, {args.workers} workers, min of {args.repeats} (config {configs[0]}: "
              f"{cfg.data.image_size} px, {cfg.data.max_audio_seconds:g} s audio)")
        print(throughput_table(prepared), flush=True)
        out: dict = {"throughput": {n: {"seconds": p.seconds, "samples": p.samples,
                                        "stages": p.stages, "groups": p.groups}
                                    for n, p in prepared.items()}}
        if not args.skip_quality:
            caches = {name: prepared[name].cache for name in QUALITY}
            budget = 60.0 * args.minutes
            print(f"\ndevice {device}, torch threads {torch.get_num_threads()}, config "
                  f"{', '.join(configs)} {' '.join(args.set)}; reference at {REFERENCE_PICK}",
                  flush=True)
            results = quality(caches, configs, args.set, budget, device, folder)
            print(quality_table(results, budget, caches))
            out["quality"] = results
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
