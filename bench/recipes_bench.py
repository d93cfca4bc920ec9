"""Every shipped recipe learns (issue 24, item 2): each config in `configs/` trained on a synthetic
corpus at its own widths, depths, CMS levels, optimizers, lrs and schedule shape, with fewer
tokens, a smaller batch and 200 steps (`--steps`) so that it fits a CPU.

What is scaled, per recipe (`SCALE`; everything else is the recipe as shipped):
  tokens   data.image_size (224 px -> 32 px: 4 image tokens at patch 16; 64 px for ResNet-50,
           whose stage 4 then gives 4 tokens), data.max_audio_seconds (10 s -> 2 s: 50 speech
           tokens at audio_stride 4; the synthetic readings last 2-4 s), data.text_max_len
           (64 -> 24: most synthetic captions fit)
  batch    train.batch_size 32 / 64 -> 8, 128 -> 32 (flickr8k_pretrained): the CPU cost per
           step; the pass mark moves with it (ln(batch), below)
  steps    `train_steps` = --steps, as `nlmm train --steps` does: the cosine fits the run and a
           warmup longer than 10 % of it is cut to 10 % (Trainer's short_run_warmup)
  chunks   a CMS level's chunk_size is cut to steps / --level-updates (default 4) when longer,
           so that every level is applied a few times within the run, as in the full run the
           recipe plans (flickr8k: 28k steps, the slow level's 512-step chunk applied 54 times);
           `--level-updates 0` keeps the shipped chunks (a level with C > steps then moves only
           at the final flush)
  backbones (flickr8k_pretrained only) ResNet-50 and HuBERT base use their named weights when
           torch.hub's cache already holds them; otherwise they keep their architecture and
           layer but start from random weights saved to local files: the ImageNet / LibriSpeech
           weights are a download (98 MB + 360 MB) and a bench, like the tests, never downloads.
tiny_cpu and tiny_nlmm are already CPU-sized and keep their tokens and batch.

Each recipe trains in-process with the real step (`Trainer.train_step`: warmup + cosine, the
level optimizer with its chunk rule, clipping, skipped non-finite steps), then applies every open
CMS chunk (`flush`, as the end of `fit` does) and scores the dev split with nlmm's evaluation
(also just before the flush, where the last open chunk of each slow level is still unapplied).
No checkpoint is written (a universal_anderson last.pt at these widths is ~11 GB).

Recorded per recipe: the first step's loss, the final train loss (mean of the last
`--tail` steps) against ln(batch) (the loss of embeddings that tell nothing apart), dev mean R@1
against chance (100 / the number of dev images: each direction's query has one positive group
among that many), each CMS level's number of applied updates, its mean relative update
‖Δθ‖/‖θ‖ (over the run's updates; a chunk-1 level's is measured every train.log_every steps) and mean |LayerScale gain| (the figures `runs show` prints per level), and a verdict.
A recipe passes when its final loss is under `LOSS_MARK` x ln(batch) and its dev mean R@1
exceeds 5x chance. Rows go to `bench/results/recipes.json` (by recipe: a rerun of one recipe
replaces its row and keeps the others), and the tables printed are the whole file's.

    .venv/bin/python bench/recipes_bench.py        # every recipe: ~2 h on the 2-core box
    .venv/bin/python bench/recipes_bench.py --recipes flickr8k --steps 5   # time one recipe
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import stamp  # noqa: E402
from quality_bench import NullSink  # noqa: E402

from nlmm.backbones import BackboneSpec, build_full_network, named_weights_url  # noqa: E402
from nlmm.config import CONFIG_DIR, CMSLevel, Config, resolve_config, weights_is_file  # noqa: E402
from nlmm.data.backbone_features import ensure_features  # noqa: E402
from nlmm.data.cache import PreparedCache, prepare  # noqa: E402
from nlmm.data.synth import synth_corpus  # noqa: E402
from nlmm.errors import NlmmError  # noqa: E402
from nlmm.metric_names import DIRECTIONS  # noqa: E402
from nlmm.model.cms import level_gain_means  # noqa: E402
from nlmm.train.loop import Trainer  # noqa: E402

# the CPU-sized data of the full-size recipes (the tiny ones keep their own)
TOKENS = ["data.image_size=32", "data.max_audio_seconds=2.0", "data.text_max_len=24"]
SCALE: dict[str, list[str]] = {
    "flickr8k": [*TOKENS, "train.batch_size=8"],
    "flickr8k_improved": [*TOKENS, "train.batch_size=8"],
    "flickr8k_sgd": [*TOKENS, "train.batch_size=8"],
    "flickr8k_pretrained": ["data.image_size=64", *TOKENS[1:], "train.batch_size=32"],
    "tiny_cpu": [],
    "tiny_nlmm": [],
}
# every recipe: no checkpoints, no mid-run evaluation (the bench scores dev once, at the end)
COMMON = ["train.checkpoint_minutes=0", "train.eval_every=1000"]
LOSS_MARK = 0.8
R1_MARK = 5.0
RESULTS = Path(__file__).resolve().parent / "results" / "recipes.json"


def recipes() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def config_hash(names: list[str]) -> str:
    """Short hash of the recipe files as they are on disk, for the RESULTS stamp."""
    digest = hashlib.sha256()
    for name in names:
        digest.update((CONFIG_DIR / f"{name}.yaml").read_bytes())
    return digest.hexdigest()[:12]


def offline_backbone_weights(cfg: Config, folder: Path) -> list[str]:
    """Overrides pointing every configured backbone whose named weights are not in torch.hub's
    cache at random weights of its own architecture (nothing is downloaded)."""
    overrides = []
    for modality in ("image", "audio"):
        spec = BackboneSpec.from_config(cfg, modality)
        if spec is None or weights_is_file(spec.weights):
            continue
        hub = Path(torch.hub.get_dir()) / "checkpoints"
        if (hub / named_weights_url(spec).rsplit("/", 1)[-1]).is_file():
            continue
        path = folder / f"{modality}-{spec.name}-random.pt"
        if not path.is_file():
            torch.manual_seed(0)
            torch.save(build_full_network(spec).state_dict(), path)
        overrides.append(f"encoders.{modality}.weights={path}")
    return overrides


def chunk_caps(levels: list[CMSLevel], steps: int, level_updates: int) -> list[str]:
    """Overrides cutting each level's chunk to steps // level_updates where it is longer."""
    if not level_updates:
        return []
    cap = max(1, steps // level_updates)
    if all(lvl.chunk_size <= cap for lvl in levels):
        return []
    cut = [{**dataclasses.asdict(lvl), "chunk_size": min(lvl.chunk_size, cap)} for lvl in levels]
    return ["cms_levels=" + json.dumps(cut)]


def batches(trainer: Trainer) -> Iterator[dict[str, torch.Tensor]]:
    for epoch in itertools.count():
        yield from trainer.loader(epoch)


def run_recipe(name: str, corpus: Path, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    shipped_levels = resolve_config(name).cms_levels
    shipped = {lvl.name: lvl.chunk_size for lvl in shipped_levels}
    overrides = [*SCALE.get(name, TOKENS),
                 *chunk_caps(shipped_levels, args.steps, args.level_updates),
                 *COMMON, f"train_steps={args.steps}", f"train.seed={args.seed}"]
    cfg = resolve_config(name, overrides)
    random_weights = offline_backbone_weights(cfg, tmp)
    cfg = resolve_config(name, overrides + random_weights)
    started = time.perf_counter()
    cache: PreparedCache = prepare(corpus, cfg.data, cfg.vocab_size, progress=False)
    cache = ensure_features(cache, cfg.encoders, torch.device("cpu"), progress=False)
    prepared = time.perf_counter() - started
    trainer = Trainer(cfg, cache, torch.device("cpu"), tmp / name, NullSink(), log=lambda m: None)
    trainer.model.load_pretrained_backbones(progress=False)
    losses: list[float] = []
    skipped = 0
    started = time.perf_counter()
    stream = batches(trainer)
    diverged = ""
    ratios: dict[str, list[float]] = {}  # each level's ‖Δθ‖/‖θ‖ at the steps it was applied
    chunks = {lvl.name: lvl.chunk_size for lvl in cfg.cms_levels}
    while trainer.progress.global_step < trainer.total_steps and not diverged:
        try:
            out = trainer.train_step([next(stream)])
        except NlmmError as exc:  # MAX_SKIPPED_IN_A_ROW non-finite steps: a verdict, not a crash
            diverged = str(exc)
            continue
        if trainer.optimizer.last_step_skipped:
            skipped += 1
            continue
        losses.append(float(out["loss"]))
        step = trainer.progress.global_step
        for level, ratio in trainer.optimizer.update_ratios().items():
            if level in chunks and step % chunks[level] == 0:
                ratios.setdefault(level, []).append(ratio)
        if args.log_every and len(losses) % args.log_every == 0:
            window = losses[-args.log_every:]
            print(f"  {name} step {len(losses)}: loss {statistics.mean(window):.3f} "
                  f"({(time.perf_counter() - started) / len(losses):.1f} s/step)", flush=True)
    trained = time.perf_counter() - started
    # what the slow levels' open chunks do when applied: at --steps < C the flush is the only
    # update of the slow weights, all the run's per-step updates at once
    unflushed = trainer.evaluate("dev")["mean_r1"]
    steps_done = trainer.progress.global_step
    levels = [{"name": lvl.name, "shipped_chunk": shipped[lvl.name], "chunk": lvl.chunk_size,
               "updates": steps_done // lvl.chunk_size} for lvl in cfg.cms_levels]
    trainer.optimizer.flush()  # the open chunks are part of what the run learned (Eq. 31)
    gains = level_gain_means(trainer.model)
    for level in levels:
        applied = ratios.get(level["name"])
        level["update_ratio"] = statistics.mean(applied) if applied else math.nan
        level["gain"] = gains.get(level["name"], math.nan)
    dev = trainer.evaluate("dev")
    n_dev = len(cache.split_images("dev"))
    batch = cfg.train.batch_size
    final = statistics.mean(losses[-args.tail:]) if losses else math.nan
    chance = 100.0 / n_dev
    return {
        "recipe": name,
        "scaled": " ".join(SCALE.get(name, TOKENS) + ["random backbones"] * bool(random_weights)
                           + [f"chunks {shipped[lvl['name']]} -> {lvl['chunk']}" for lvl in levels
                              if lvl["chunk"] != lvl["shipped_chunk"]]) or "–",
        "stamp": stamp(), "configs": config_hash([name]), "seed": args.seed, "images": args.images,
        "levels": levels,
        "d_model": cfg.d_model, "depth": f"{cfg.depth.text}/{cfg.depth.image}/{cfg.depth.audio}",
        "optimizer": "/".join(sorted({lvl.optimizer for lvl in cfg.cms_levels})),
        "lr": cfg.cms_levels[0].lr, "batch": batch, "steps": len(losses), "skipped": skipped,
        "warmup": trainer.warmup_steps, "first": losses[0] if losses else math.nan,
        "final": final, "ln_batch": math.log(batch), "dev": dev, "chance": chance,
        "unflushed": unflushed,
        "prepare_s": prepared, "s_per_step": trained / max(1, len(losses) + skipped),
        "diverged": diverged,
        "passed": (not diverged and final < LOSS_MARK * math.log(batch)
                   and dev["mean_r1"] > R1_MARK * chance),
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| recipe | d / depth t/i/a | optimizer, fast lr | batch | steps (warmup) | "
             "first loss | final loss | ln(batch) | dev mean R@1 | chance | × chance | "
             "before the flush | s / step | verdict |", "|" + "---|" * 14]
    for r in rows:
        lines.append(
            f"| `{r['recipe']}` | {r['d_model']} / {r['depth']} | {r['optimizer']}, {r['lr']:g} | "
            f"{r['batch']} | {r['steps']} ({r['warmup']}) | {r['first']:.3f} | {r['final']:.3f} | "
            f"{r['ln_batch']:.3f} | {r['dev']['mean_r1']:.1f} | {r['chance']:.1f} | "
            f"{r['dev']['mean_r1'] / r['chance']:.1f} | {r['unflushed']:.1f} | "
            f"{r['s_per_step']:.2f} | "
            f"{'pass' if r['passed'] else 'FAIL'} |")
    lines += ["", "| recipe | " + " | ".join(DIRECTIONS) + " | mean R@1 (dev) |",
              "|" + "---|" * (len(DIRECTIONS) + 2)]
    for r in rows:
        cells = " | ".join(f"{r['dev'][f'{d}_r1']:.1f}" for d in DIRECTIONS)
        lines.append(f"| `{r['recipe']}` | {cells} | {r['dev']['mean_r1']:.1f} |")
    lines += ["", "| recipe | level | chunk (shipped) | updates in the run | mean ‖Δθ‖/‖θ‖ of an update | "
              "mean \\|gain\\| after the flush |", "|" + "---|" * 6]
    for r in rows:
        for lvl in r["levels"]:
            lines.append(f"| `{r['recipe']}` | {lvl['name']} | {lvl['chunk']} "
                         f"({lvl['shipped_chunk']}) | {lvl['updates']} | "
                         f"{lvl['update_ratio']:.2e} | {lvl['gain']:.1e} |")
    return "\n".join(lines)


def merged(row: dict[str, Any]) -> list[dict[str, Any]]:
    """RESULTS' rows with `row` in (replacing an earlier run of its recipe), written back as soon
    as a recipe ends, so that an interrupted bench keeps what it finished and several can run."""
    kept = json.loads(RESULTS.read_text()) if RESULTS.is_file() else []
    out = sorted([r for r in kept if r["recipe"] != row["recipe"]] + [row],
                 key=lambda r: r["recipe"])
    RESULTS.parent.mkdir(exist_ok=True)
    partial = RESULTS.with_suffix(f".{os.getpid()}.tmp")
    partial.write_text(json.dumps(out, indent=1, default=float) + "\n")
    partial.replace(RESULTS)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", default=",".join(recipes()))
    parser.add_argument("--images", type=int, default=240, help="synthetic corpus size")
    parser.add_argument("--objects", type=int, default=None,
                        help="synthetic grid corpus with this many objects per image (harder)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--level-updates", type=int, default=4,
                        help="cut chunks longer than steps / N (0: the shipped chunks)")
    parser.add_argument("--tail", type=int, default=10, help="steps averaged for the final loss")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=10,
                        help="print the mean loss every N steps")
    # one thread: on an oversubscribed box a second one mostly waits at intra-op barriers
    # (flickr8k_improved at load 12-16: 12.4 s per step with 1 thread; with 2, not 10 steps in
    # the first 15 minutes)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="RECIPE:KEY=VALUE",
                        help="an extra override for one recipe (repeatable), e.g. to try a fix")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = [n for n in args.recipes.split(",") if n]
    for item in args.set:
        recipe, _, override = item.partition(":")
        SCALE[recipe] = [*SCALE.get(recipe, TOKENS), override]
    print(f"# recipes_bench: {stamp()} · configs {config_hash(names)}")
    print(f"{args.images} synthetic images "
          f"({f'{args.objects}-object grid' if args.objects else '1-2 objects'}), {args.steps} "
          f"steps, seed {args.seed}, torch threads {args.threads}, chunks cut to steps / "
          f"{args.level_updates}" if args.level_updates else "shipped chunks", flush=True)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="nlmm-recipes-") as tmp_name:
        tmp = Path(tmp_name)
        synth_corpus(tmp / "corpus", n_images=args.images, seed=args.seed, engine="builtin",
                     progress=False, objects=args.objects)
        for name in names:
            row = run_recipe(name, tmp / "corpus", args, tmp)
            rows = merged(row)
            print(f"{name}: {row['steps']} steps at {row['s_per_step']:.2f} s, first loss "
                  f"{row['first']:.3f}, final {row['final']:.3f} (ln batch {row['ln_batch']:.3f}), "
                  f"dev mean R@1 {row['dev']['mean_r1']:.1f} (chance {row['chance']:.1f}), "
                  f"prepare {row['prepare_s']:.0f} s: {'pass' if row['passed'] else 'FAIL'}"
                  + (f" ({row['diverged']})" if row["diverged"] else ""), flush=True)
    print(f"\n{RESULTS} (every recipe run so far):\n")
    print(table(rows))
    print("\nscaled: " + "; ".join(f"{r['recipe']}: {r['scaled']}" for r in rows))
    print("runs: " + "; ".join(f"{r['recipe']}: {r['stamp']}" for r in rows))


if __name__ == "__main__":
    main()
