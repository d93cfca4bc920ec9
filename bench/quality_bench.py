"""Learning quality at equal wall time: NL-MM (shipped config and ablations) against a plain encoder.

Every arm trains on the same prepared corpus, on the same device, for the same training wall
time (data loading included, evaluation excluded), and is scored on the test split with nlmm's
own evaluation at each budget (default 3 and 8 minutes). The reference is the plain dual
encoder of `bench/reference_model.py` (conv / BiGRU / conv towers, AdamW, batch 128, no
augmentation). The table gives test R@1 per direction, the mean, and the ratio of the mean to
the reference's at the same budget.

Arms (`--arms`, comma-separated):
  reference    the plain encoder
  nlmm         the shipped config as written (`--config`, default tiny_cpu)
  one_level    one CMS level (the fastest) instead of the config's chain
  no_memory    no shared multimodal memory (L_mem 0)
  plain        no NL parts: one level, no memory (a plain pre-norm transformer of the same widths)
  adamw, sgd, dmgd, muon, universal_anderson   the shipped config with every level on that optimizer

NL-MM arms keep the config's schedule shape (warmup, cosine) stretched over the largest budget:
after a few steps the step rate is measured and the run's total steps set to what fits.

    .venv/bin/python bench/quality_bench.py --minutes 3 8
    .venv/bin/python bench/quality_bench.py --corpus data/heldout --arms reference,nlmm --minutes 3
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_model import REFERENCE_LOSS, ReferenceEncoder  # noqa: E402

from nlmm.config import OPTIMIZERS, Config, resolve_config  # noqa: E402
from nlmm.data.backbone_features import ensure_features  # noqa: E402
from nlmm.data.cache import PreparedCache, prepare  # noqa: E402
from nlmm.data.loader import TrainLoader  # noqa: E402
from nlmm.data.synth import synth_corpus  # noqa: E402
from nlmm.devices import resolve_device  # noqa: E402
from nlmm.metric_names import DIRECTIONS  # noqa: E402
from nlmm.train.evaluate import evaluate_split  # noqa: E402
from nlmm.train.loop import Trainer  # noqa: E402

ABLATIONS: dict[str, Callable[[Config], list[str]]] = {
    "nlmm": lambda cfg: [],
    "one_level": lambda cfg: [f"cms_levels=[{_fastest(cfg)}]"],
    "no_memory": lambda cfg: ["L_mem=0"],
    "plain": lambda cfg: [f"cms_levels=[{_fastest(cfg)}]", "L_mem=0"],
    **{name: (lambda cfg, name=name: [f"train.optimizer={name}"]) for name in OPTIMIZERS},
}
ARMS = ("reference", *ABLATIONS)
CALIBRATION_STEPS = 8


def _fastest(cfg: Config) -> str:
    level = min(cfg.cms_levels, key=lambda lvl: lvl.chunk_size)
    return (f"{{name: {level.name}, chunk_size: 1, lr: {level.lr}, optimizer: {level.optimizer}, "
            f"weight_decay: {level.weight_decay}}}")


class NullSink:
    def log(self, step: int, epoch: int, values: dict[str, float]) -> None:
        pass


def timed_training(batches: Iterator[Any], step: Callable[[Any], None], budgets_s: list[float],
                   score: Callable[[], dict[str, float]],
                   on_calibrated: Callable[[float], None] | None = None
                   ) -> dict[float, dict[str, float]]:
    """Run `step` over `batches` until the largest budget; score at each budget (untimed)."""
    results: dict[float, dict[str, float]] = {}
    pending = sorted(budgets_s)
    elapsed, steps = 0.0, 0
    tick = time.perf_counter()
    for batch in batches:
        step(batch)
        now = time.perf_counter()
        elapsed, tick = elapsed + now - tick, now
        steps += 1
        if steps == CALIBRATION_STEPS and on_calibrated is not None:
            on_calibrated(elapsed / steps)
        if elapsed >= pending[0]:
            metrics = score()
            metrics["steps"] = steps
            results[pending.pop(0)] = metrics
            if not pending:
                return results
            tick = time.perf_counter()
    raise RuntimeError("the batch stream ended before the budget")


def run_nlmm(cfg: Config, cache: PreparedCache, device: torch.device, budgets_s: list[float],
             folder: Path) -> dict[float, dict[str, float]]:
    cache = ensure_features(cache, cfg.encoders, device, progress=False)
    trainer = Trainer(cfg, cache, device, folder, NullSink(), log=lambda m: None)
    trainer.model.load_pretrained_backbones(progress=False)
    acc = cfg.train.accumulate

    def batches() -> Iterator[list[dict[str, torch.Tensor]]]:
        for epoch in itertools.count():
            group: list[dict[str, torch.Tensor]] = []
            for batch in trainer.loader(epoch):
                group.append(batch)
                if len(group) == acc:
                    yield group
                    group = []

    def calibrated(step_s: float) -> None:
        # the schedule (warmup + cosine) spans the largest budget, as a user sizing epochs would
        trainer.total_steps = max(int(max(budgets_s) / step_s), cfg.train.warmup_steps + 1)

    return timed_training(batches(), trainer.train_step, budgets_s,
                          lambda: evaluate_split(trainer.model, cache, "test", device), calibrated)


def run_reference(cfg: Config, cache: PreparedCache, device: torch.device,
                  budgets_s: list[float], batch_size: int = 128,
                  build: Callable[[], torch.nn.Module] | None = None
                  ) -> dict[float, dict[str, float]]:
    """The reference trained for the budgets; `build` makes another reference model (e.g. one
    cut to a corpus's two modalities), default the three-tower ReferenceEncoder."""
    torch.manual_seed(cfg.train.seed)
    model = (build() if build else
             ReferenceEncoder(cache.tokenizer.vocab_size, cfg.data.n_mels)).to(device)
    opt = model.optimizer()
    max_frames = int(cfg.data.max_audio_seconds * cfg.data.sample_rate / cfg.data.hop_length) + 1

    def batches() -> Iterator[dict[str, torch.Tensor]]:
        for epoch in itertools.count():
            yield from TrainLoader(cache, "train", batch_size, seed=cfg.train.seed, epoch=epoch,
                                   device=device, max_audio_frames=max_frames)

    def step(batch: dict[str, torch.Tensor]) -> None:
        model.train()
        loss = REFERENCE_LOSS(model(batch))["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return timed_training(batches(), step, budgets_s,
                          lambda: evaluate_split(model, cache, "test", device))


def corpus(args: argparse.Namespace, folder: Path) -> Path:
    if args.corpus:
        return Path(args.corpus)
    root = folder / "corpus"
    start = time.perf_counter()
    synth_corpus(root, n_images=args.images, seed=args.seed, engine="builtin", progress=False,
                 objects=args.objects)
    print(f"corpus: {args.images} synthetic images with {args.objects} objects each, written in "
          f"{time.perf_counter() - start:.0f} s")
    return root


def table(results: dict[str, dict[float, dict[str, float]]], budgets_s: list[float]) -> str:
    head = f"| arm | budget | steps | {' | '.join(DIRECTIONS)} | mean R@1 | × reference |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for budget in budgets_s:
        ref = results.get("reference", {}).get(budget, {}).get("mean_r1")
        for arm, by_budget in results.items():
            m = by_budget.get(budget)
            if m is None:
                continue
            ratio = f"{m['mean_r1'] / ref:.2f}" if ref else "–"
            cells = " | ".join(f"{m.get(f'{d}_r1', float('nan')):.1f}" for d in DIRECTIONS)
            lines.append(f"| {arm} | {budget / 60:g} min | {m['steps']} | {cells} | "
                         f"{m['mean_r1']:.1f} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", help="a prepared-or-not corpus in the Flickr8k layout "
                                         "(default: write a synthetic one)")
    parser.add_argument("--images", type=int, default=1200, help="synthetic corpus size")
    parser.add_argument("--objects", type=int, default=3, help="objects per synthetic image")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", default="tiny_cpu", help="NL-MM config name or YAML path")
    parser.add_argument("--set", action="append", default=[], help="extra NL-MM config override")
    parser.add_argument("--minutes", type=float, nargs="+", default=[3.0, 8.0])
    parser.add_argument("--arms", default="reference,nlmm", help=f"subset of {','.join(ARMS)}")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    arms = [a for a in args.arms.split(",") if a]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        sys.exit(f"unknown arm {unknown[0]!r}; pick from {', '.join(ARMS)}")
    budgets = [60.0 * m for m in args.minutes]
    device = resolve_device(args.device)

    with tempfile.TemporaryDirectory(prefix="nlmm-quality-") as tmp:
        folder = Path(tmp)
        os.environ.setdefault("NLMM_RUNS_DIR", str(folder / "runs"))
        root = corpus(args, folder)
        base = resolve_config(args.config, args.set)
        cache = prepare(root, base.data, base.vocab_size, progress=False)
        print(f"device {device}, torch threads {torch.get_num_threads()}, config {args.config} "
              f"{' '.join(args.set)}; {len(cache.split_captions('train'))} train captions, "
              f"{len(cache.split_images('test'))} test images")
        results: dict[str, dict[float, dict[str, float]]] = {}
        for arm in arms:
            start = time.perf_counter()
            if arm == "reference":
                results[arm] = run_reference(base, cache, device, budgets)
            else:
                cfg = resolve_config(args.config, args.set + ABLATIONS[arm](base))
                results[arm] = run_nlmm(cfg, cache, device, budgets, folder / arm)
            last = results[arm][max(budgets)]
            print(f"{arm}: mean R@1 {last['mean_r1']:.1f} after {last['steps']} steps "
                  f"({time.perf_counter() - start:.0f} s with evaluation)", flush=True)
        print(table(results, budgets))
        if args.json:
            Path(args.json).write_text(json.dumps({a: {str(b): m for b, m in r.items()}
                                                   for a, r in results.items()}, indent=1))


if __name__ == "__main__":
    main()
