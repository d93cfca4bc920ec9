"""Continual learning (issue 24, item 3): train on corpus A, continue on corpus B, and measure
what B cost on A, through the feature a user runs: `nlmm train`, `nlmm train --resume A --data B`
(B prepared with A's tokenizer, the model and every level's optimizer state carried over) and
`nlmm runs forgetting`.

Corpora (`nlmm data synth`, builtin voice; espeak-ng was not installed): A = 400 images of one or
two shapes (`--seed 21`), B = 400 images of four shapes on a 3x3 grid (`--objects 4 --seed 22`)
whose colour names are moved on by one (`renamed_colours`: an object called red is drawn green,
...). Grid scenes and longer captions alone were no shift at all: training on them raised R_A
(plain, 100 + 100 steps: 78.2 -> 80.6); with the colours renamed, B's images contradict A's
words while its text and speech still agree, as when a new corpus uses words differently.
Every run: tiny_nlmm, a constant lr (10 warm-up steps on A, none on B), `--steps-a` then
`--steps-b` optimizer steps, the dev split scored once at the end.

Arms (one A run serves both plain arms):
  plain            one CMS level, no shared memory (the README's plain transformer)
  plain lr/4 on B the same A run, B at a quarter of the lr: the trivial way to forget less
  NL-MM still      tiny_nlmm with the level rule before issue 24 item 1 (one step on a chunk's
                   summed gradient, each gain in its own level): slow levels that barely move
  NL-MM            tiny_nlmm as shipped: every level moves by the sum of its per-step updates
                   (Eq. 31), the gains stepped with the fast level

Reported per arm, mean over seeds of test mean R@1: R_A after A, R_A after B, forgetting (their
difference), R_B after B, and the mean of R_A and R_B after B.

    .venv/bin/python bench/continual_bench.py                     # ~45 min on 2 busy CPU cores
    .venv/bin/python bench/continual_bench.py --seeds 0 --arms plain --steps-a 60 --steps-b 60
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from harness import stamp

PLAIN = ["--set", "cms_levels=[{name: fast, chunk_size: 1, lr: 1.0e-3, optimizer: adamw}]",
         "--set", "L_mem=0"]
STILL = ["--set", "cms_chunk_rule=gradients", "--set", "cms_gains=level"]
# arm: (A run's options, the B run's extra options)
ARMS = {
    "plain": (PLAIN, []),
    "plain lr/4 on B": (PLAIN, ["--lr", "2.5e-4"]),
    "NL-MM still": (STILL, []),
    "NL-MM": ([], []),
}
COMMON = ["--config", "tiny_nlmm", "--device", "cpu", "--epochs", "1000", "--eval-every", "1000",
          "--set", "train.schedule=constant", "--set", "train.checkpoint_minutes=0"]


def nlmm(runs: Path, *args: str) -> str:
    env = dict(os.environ, NLMM_RUNS_DIR=str(runs), COLUMNS="200")
    env.pop("NLMM_DB_URL", None)
    done = subprocess.run([sys.executable, "-m", "nlmm.cli", *args], env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"nlmm {' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return done.stdout


@contextlib.contextmanager
def renamed_colours() -> Iterator[None]:
    """Within the block, the synthetic corpus draws each chromatic colour name in the next
    one's RGB (red objects look green, ..., brown ones red); white and black, which are also
    backgrounds, stay."""
    from nlmm.data import synth

    saved = dict(synth.COLOURS)
    names = [c for c in saved if c not in synth.BACKGROUNDS]
    synth.COLOURS.update({name: saved[names[(i + 1) % len(names)]] for i, name in enumerate(names)})
    try:
        yield
    finally:
        synth.COLOURS.update(saved)


def corpora(work: Path) -> tuple[Path, Path]:
    from nlmm.data.synth import synth_corpus

    a, b = work / "A", work / "B"
    if not (a / "Flickr8k_text").is_dir():
        synth_corpus(a, n_images=400, seed=21, engine="builtin", overwrite=True, progress=False)
    if not (b / "Flickr8k_text").is_dir():
        with renamed_colours():
            synth_corpus(b, n_images=400, seed=22, engine="builtin", overwrite=True,
                         progress=False, objects=4)
    return a, b


def config_hash() -> str:
    """The trained configurations: tiny_nlmm's file and every arm's and run's options."""
    text = (Path(__file__).resolve().parents[1] / "configs" / "tiny_nlmm.yaml").read_text()
    return hashlib.sha256(json.dumps([text, ARMS, COMMON]).encode()).hexdigest()[:12]


def run_arms(work: Path, arms: list[str], seeds: list[int], steps_a: int,
             steps_b: int) -> dict[str, list[dict[str, float]]]:
    corpus_a, corpus_b = corpora(work)
    runs = work / "runs"
    results: dict[str, list[dict[str, float]]] = {arm: [] for arm in arms}
    for seed in seeds:
        trained_a: dict[str, str] = {}
        for arm in arms:
            a_opts, b_opts = ARMS[arm]
            key = json.dumps(a_opts)
            if key not in trained_a:
                name = f"a{len(trained_a)}-s{seed}-{time.time_ns() % 10**6}"
                started = time.perf_counter()
                nlmm(runs, "train", "flickr8k", "--data", str(corpus_a), "--name", name,
                     "--steps", str(steps_a), "--seed", str(seed), "--set",
                     "train.warmup_steps=10", *COMMON, *a_opts)
                print(f"seed {seed} {arm}: A in {time.perf_counter() - started:.0f} s", flush=True)
                trained_a[key] = name
            name = f"b-{arm.replace(' ', '_').replace('/', '')}-s{seed}-{time.time_ns() % 10**6}"
            started = time.perf_counter()
            nlmm(runs, "train", "--resume", trained_a[key], "--data", str(corpus_b), "--name",
                 name, "--steps", str(steps_b), "--epochs", "1000", "--set",
                 "train.warmup_steps=0", *b_opts)
            report = json.loads(nlmm(runs, "runs", "forgetting", name, "--json"))
            score = {(s["run"], s["corpus"]): s["metrics"]["mean_r1"] for s in report["scores"]}
            row = {"R_A after A": score[trained_a[key], 0], "R_B before B": score[trained_a[key], 1],
                   "R_A after B": score[name, 0], "R_B after B": score[name, 1]}
            results[arm].append(row)
            print(f"seed {seed} {arm}: B in {time.perf_counter() - started:.0f} s: "
                  + ", ".join(f"{k} {v:.1f}" for k, v in row.items()), flush=True)
    return results


def table(results: dict[str, list[dict[str, float]]]) -> str:
    lines = ["| arm | R_A after A | R_A after B | forgetting | R_B before B | R_B after B | "
             "mean after B (R_A, R_B) |", "|---|---|---|---|---|---|---|"]

    def cell(values: list[float]) -> str:
        mean = statistics.mean(values)
        spread = f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else ""
        return f"{mean:.1f}{spread}"

    for arm, rows in results.items():
        get = lambda k: [r[k] for r in rows]  # noqa: E731
        lines.append("| " + " | ".join([
            arm, cell(get("R_A after A")), cell(get("R_A after B")),
            cell([r["R_A after B"] - r["R_A after A"] for r in rows]), cell(get("R_B before B")),
            cell(get("R_B after B")),
            cell([(r["R_A after B"] + r["R_B after B"]) / 2 for r in rows])]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/nlmm_continual_bench"),
                        help="corpora and runs (kept, so a second call reuses the corpora)")
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated arm names")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps-a", type=int, default=100)
    parser.add_argument("--steps-b", type=int, default=100)
    args = parser.parse_args()
    arms = [a.strip() for a in args.arms.split(",")]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        sys.exit(f"unknown arm(s) {unknown}; pick from {list(ARMS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    started = time.perf_counter()
    results = run_arms(args.work, arms, seeds, args.steps_a, args.steps_b)
    print(f"\n{stamp()} · config {config_hash()} · {len(seeds)} seed(s), {args.steps_a} steps on "
          f"A then {args.steps_b} on B · {time.perf_counter() - started:.0f} s\n")
    print(table(results))


if __name__ == "__main__":
    main()
