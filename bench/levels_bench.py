"""CMS levels that move (issue 24, item 1): how far each level moves and what it costs, under the
chunk rule before (one optimizer step on the chunk's summed gradient), the lr scalings meant to
mend it, and Nested Learning's Eq. 31 (the sum of the chunk's per-step updates, the shipped rule);
and which start lets the slow levels' LayerScale gains act.

A tiny NL-MM (tiny_nlmm at d_model 64, 3 CMS levels with chunks 1 / 4 / 16, AdamW at
1e-3 / 5e-4 / 2.5e-4, as tests/test_train.py trains) is trained `--steps` steps with the real loop
(`Trainer.fit`) on the offline synthetic corpus (`synth_corpus` + `prepare`), once per arm:

  today          cms_chunk_rule gradients (the rule before: sum the chunk's gradients, clip the
                 sum, one AdamW step), cms_gains level (every gain in its own level, init 0)
  lr_sqrt        the same, the slow levels' lr × √C (cms_lr_scaling sqrt)
  lr_chunk       the same, lr × C (cms_lr_scaling chunk)
  updates        cms_chunk_rule updates (Eq. 31), cms_gains level
  updates+fast   updates, every CMS gain stepped with the fast level (cms_gains fast): shipped
  updates+init   updates, cms_gains level, the mid and slow gains start at --gain-init, not 0

Findings (bench/RESULTS-style tables in the session's report, 3 seeds, 400 steps): an lr scaling
does not match the sum of updates (lr × C: right for C = 4, 1.8× too far for C = 16; lr × √C:
2× too short), the exact rule costs ~2 ms of a ~147 ms step; with it the slow gain reaches
0.003 (today 0.0008), with cms_gains fast 0.014 (the fast level's 0.011) and the best dev
mean R@1 on the 3-object corpus (+1.0 over updates in each of 3 seeds); init 0.1 did worse.

Per arm and per window of `--window` steps: each level's ‖Δθ‖/‖θ‖ (mean over the updates applied
in the window) and its mean |gain| at the window's end; at the end, dev mean R@1. For the updates arm also the
coherence of each slow chunk, k = ‖Σ u_t‖ / mean_t ‖u_t‖ (= C when the C per-step updates agree,
√C when they are noise): the factor a single step's lr would need to match the sum of updates.

Cost: `--timing-steps` steps per rule, the rules' steps interleaved on the same batches, with
nothing else measured: median ms per step and ms in `step_all` (the level optimizer), after 10
warm-up steps.

    .venv/bin/python bench/levels_bench.py                     # ~15 min on 2 CPU cores
    .venv/bin/python bench/levels_bench.py --steps 100 --arms today,updates --seeds 0
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from nlmm.config import resolve_config
from nlmm.data.cache import prepare
from nlmm.data.synth import synth_corpus
from nlmm.model.cms import level_gain_means
from nlmm.optim.levels import LevelOptimizer
from nlmm.train.loop import Trainer

BASE = ["d_model=64", "embed_dim=64", "n_heads=4", "L_mem=4", "depth={text: 1, image: 1, audio: 1}",
        "train.batch_size=16", "train.warmup_steps=20", "train.epochs=100", "train.eval_every=1000",
        "train.checkpoint_minutes=0"]
ARMS = {
    "today": ["cms_chunk_rule=gradients", "cms_gains=level"],
    "lr_sqrt": ["cms_chunk_rule=gradients", "cms_gains=level", "cms_lr_scaling=sqrt"],
    "lr_chunk": ["cms_chunk_rule=gradients", "cms_gains=level", "cms_lr_scaling=chunk"],
    "updates": ["cms_chunk_rule=updates", "cms_gains=level"],
    "updates+fast": ["cms_chunk_rule=updates", "cms_gains=fast"],
    "updates+init": ["cms_chunk_rule=updates", "cms_gains=level"],
}
TIMING = {"gradients (today, lr scaling)": ["cms_chunk_rule=gradients", "cms_gains=level"],
          "updates (Eq. 31)": ["cms_chunk_rule=updates", "cms_gains=level"]}


class NullSink:
    def log(self, step, epoch, values):
        self.last = values if "mean_r1" in values else getattr(self, "last", {})


def trainer_for(cache, overrides: list[str], steps: int, seed: int, run_dir: Path,
                log_every: int) -> Trainer:
    cfg = resolve_config("tiny_nlmm", [*BASE, f"train_steps={steps}", f"train.seed={seed}",
                                      f"train.log_every={log_every}", *overrides])
    return Trainer(cfg, cache, torch.device("cpu"), run_dir, NullSink(), log=lambda m: None)


def watch_coherence(optimizer: LevelOptimizer, per_level: dict[str, list[float]]) -> None:
    """Record k = ‖Σ u_t‖ / mean ‖u_t‖ of every applied chunk (updates rule only)."""
    step_norms: dict[str, list[float]] = {}
    into, apply = optimizer._step_into_chunk, optimizer._apply_chunk

    def step_into_chunk(lvl, params, accum):
        before = [a.clone() if a is not None else None for a in accum]
        into(lvl, params, accum)
        sq = sum(float((a - (b if b is not None else 0)).pow(2).sum())
                 for a, b in zip(accum, before) if a is not None)
        step_norms.setdefault(lvl.name, []).append(sq ** 0.5)

    def apply_chunk(lvl, params, accum):
        total = sum(float(a.pow(2).sum()) for a in accum if a is not None) ** 0.5
        norms = step_norms.pop(lvl.name, [])
        if norms and statistics.mean(norms) > 0:
            per_level.setdefault(lvl.name, []).append(total / statistics.mean(norms))
        return apply(lvl, params, accum)

    optimizer._step_into_chunk, optimizer._apply_chunk = step_into_chunk, apply_chunk


def run_arm(cache, arm: str, args, seed: int, tmp: Path) -> dict:
    trainer = trainer_for(cache, ARMS[arm], args.steps, seed, tmp / f"{arm}-{seed}", args.window)
    chunks = {lvl.name: lvl.chunk_size for lvl in trainer.optimizer.levels}
    if arm == "updates+init":
        with torch.no_grad():
            for module in trainer.model.modules():
                for name, level in zip(getattr(module, "names", []), getattr(module, "levels", [])):
                    if chunks.get(name, 1) > 1 and getattr(level, "scale", None) is not None:
                        level.scale.gain.fill_(args.gain_init)
    coherence: dict[str, list[float]] = {}
    trainer.optimizer._stats_every = 1     # every fast update measured (timing is apart)
    if arm == "updates":
        watch_coherence(trainer.optimizer, coherence)
    windows: list[dict] = []
    ratios: dict[str, list[float]] = {}
    step_all, train_step = trainer.optimizer.step_all, trainer.train_step
    last_stepped: list[str] = []

    def recording_step_all(step):
        last_stepped[:] = step_all(step)
        return last_stepped

    def recording_train_step(batches):
        out = train_step(batches)
        step = trainer.progress.global_step
        now = trainer.optimizer.update_ratios()
        for name in last_stepped:
            if name in now:
                ratios.setdefault(name, []).append(now[name])
        if step % args.window == 0:
            gains = level_gain_means(trainer.model)
            windows.append({"step": step, "gain": gains,
                            "ratio": {k: statistics.mean(v) for k, v in ratios.items()}})
            ratios.clear()
        return out

    trainer.optimizer.step_all, trainer.train_step = recording_step_all, recording_train_step
    started = time.perf_counter()
    trainer.fit()
    return {"windows": windows, "dev": trainer.sink.last.get("mean_r1", float("nan")),
            "chunks": chunks,
            "coherence": coherence, "seconds": time.perf_counter() - started}


def time_rules(cache, steps: int, tmp: Path) -> dict[str, tuple[float, float]]:
    """Median ms per training step and in step_all for each TIMING rule, the rules' steps
    interleaved (one step of each in turn, on the same batches) so that the box's load hits
    them alike; 10 warm-up steps each."""
    trainers, step_times, opt_times = {}, {}, {}
    for i, (name, overrides) in enumerate(TIMING.items()):
        trainer = trainer_for(cache, overrides, steps + 10, 0, tmp / f"timing{i}", 10_000)
        step_times[name], opt_times[name] = [], []

        def timed_step_all(step, step_all=trainer.optimizer.step_all, out=opt_times[name]):
            t0 = time.perf_counter()
            stepped = step_all(step)
            out.append(time.perf_counter() - t0)
            return stepped

        trainer.optimizer.step_all = timed_step_all
        trainers[name] = trainer
    loader = iter(next(iter(trainers.values())).loader(0))
    for i in range(steps + 10):
        try:
            batch = next(loader)
        except StopIteration:
            loader = iter(next(iter(trainers.values())).loader(i))
            batch = next(loader)
        for name, trainer in trainers.items():
            t0 = time.perf_counter()
            trainer.train_step([batch])
            trainer.progress.global_step = i + 1
            step_times[name].append(time.perf_counter() - t0)
    return {name: (1000 * statistics.median(step_times[name][10:]),
                   1000 * statistics.median(opt_times[name][10:])) for name in trainers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=240)
    parser.add_argument("--objects", type=int, default=None,
                        help="synthetic grid corpus with this many objects per image (harder)")
    parser.add_argument("--steps", type=int, default=320)
    parser.add_argument("--window", type=int, default=80)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--gain-init", type=float, default=0.1)
    parser.add_argument("--timing-steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    arms = args.arms.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        synth_corpus(tmp / "corpus", n_images=args.images, seed=0, engine="builtin", progress=False,
                     objects=args.objects)
        cfg = resolve_config("tiny_nlmm")
        cache = prepare(tmp / "corpus", cfg.data, cfg.vocab_size, progress=False)
        corpus = f"{args.objects}-object grid" if args.objects else "1-2 object"
        print(f"# levels_bench: tiny_nlmm at d_model 64, {args.images} synthetic images ({corpus}), {args.steps} "
              f"steps, seeds {seeds}, torch threads {args.threads}\n", flush=True)

        if args.timing_steps:
            timing = time_rules(cache, args.timing_steps, tmp)
            print("## cost per step (median; same box, same batches)\n")
            print("| chunk rule | ms / step | ms in step_all |")
            print("|---|---|---|")
            for name, (step_ms, opt_ms) in timing.items():
                print(f"| {name} | {step_ms:.1f} | {opt_ms:.1f} |")
            print(flush=True)

        results = {arm: [run_arm(cache, arm, args, seed, tmp) for seed in seeds] for arm in arms}

    levels = list(results[arms[0]][0]["chunks"])
    print(f"## per window (seed {seeds[0]}): ‖Δθ‖/‖θ‖ of the updates applied in the window, "
          f"mean |gain| at its end\n")
    print("| arm | steps | " + " | ".join(f"ratio {n}" for n in levels) + " | "
          + " | ".join(f"gain {n}" for n in levels) + " |")
    print("|---|---|" + "---|" * (2 * len(levels)))
    for arm in arms:
        previous = 0
        for window in results[arm][0]["windows"]:
            ratio = " | ".join(f"{window['ratio'][n]:.2e}" if n in window["ratio"] else "–"
                               for n in levels)
            gain = " | ".join(f"{window['gain'].get(n, float('nan')):.4f}" for n in levels)
            print(f"| {arm} | {previous + 1}–{window['step']} | {ratio} | {gain} |")
            previous = window["step"]
    print()

    print("## summary (mean over seeds)\n")
    print("| arm | slow/fast update ratio | mid/fast | final gain fast / mid / slow | "
          "dev mean R@1 per seed | mean | minutes / run |")
    print("|---|---|---|---|---|---|---|")
    for arm in arms:
        runs = results[arm]
        rel = {}
        for name in levels[1:]:
            vals = [statistics.mean(w["ratio"][name] / w["ratio"][levels[0]] for w in r["windows"]
                                    if name in w["ratio"] and w["ratio"].get(levels[0]))
                    for r in runs]
            rel[name] = statistics.mean(vals)
        gains = [statistics.mean(r["windows"][-1]["gain"].get(n, float("nan")) for r in runs)
                 for n in levels]
        devs = [r["dev"] for r in runs]
        print(f"| {arm} | {rel.get(levels[-1], float('nan')):.3f} | {rel.get(levels[1], float('nan')):.3f} | "
              + " / ".join(f"{g:.4f}" for g in gains)
              + f" | {' / '.join(f'{d:.1f}' for d in devs)} | {statistics.mean(devs):.1f} | "
              + f"{sum(r['seconds'] for r in runs) / len(runs) / 60:.1f} |")
    print()
    if "updates" in results:
        print("## coherence of the slow chunks (updates arm): k = ‖Σ u_t‖ / mean ‖u_t‖\n")
        print("| level | C | √C | k mean | k min | k max | first half | second half |")
        print("|---|---|---|---|---|---|---|---|")
        chunks = results["updates"][0]["chunks"]
        for name in levels:
            ks = [k for r in results["updates"] for k in r["coherence"].get(name, [])]
            if not ks:
                continue
            half = len(results["updates"][0]["coherence"][name]) // 2
            first = results["updates"][0]["coherence"][name][:half]
            second = results["updates"][0]["coherence"][name][half:]
            c = chunks[name]
            print(f"| {name} | {c} | {c ** 0.5:.1f} | {statistics.mean(ks):.2f} | {min(ks):.2f} | "
                  f"{max(ks):.2f} | {statistics.mean(first):.2f} | {statistics.mean(second):.2f} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
