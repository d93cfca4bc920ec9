"""Learning quality at equal compute: NL-MM against a plain dual encoder given the same tuning.

Nothing is chosen on the test split:
1. Search (`--search`), the same for both models, the plain reference of
   `bench/reference_model.py` and the NL-MM of `--config`: `grid` trains every `--lrs` x
   `--beta2s` x `--schedules` at the first of `--batches`, then the other batch sizes at the
   best; `coordinate` trains every lr at the best setting so far (at the start: the first β2,
   schedule and batch), then varies one thing at a time from the best so far (every β2, then
   every schedule, then every batch size).
   Every arm is scored on dev and test; a model's pick is its setting with the best dev mean
   R@1, and the test figures reported are the pick's.
2. At NL-MM's pick: the ablations (`--ablations`) and the optimizer arms (`--optimizer-lrs
   sgd=1e-2,3e-2`: every level on that optimizer, over its own lr grid, picked on dev; without
   an NL-MM search in the same process, at the config's own lr schedule and batch).
3. `--seeds 0,1`: the picks and the ablations again at every further seed (the search runs at
   the first); the tables give the mean and each seed's figure.
`--picks-from FILE...` (`--json` files of earlier runs) skips the search and trains the picks
recorded there, with the ablations: a corpus that took no part in choosing anything.
`--models` splits the work over processes, `--reuse` keeps arms measured before, and
`--report FILE...` prints the tables of several `--json` files together (picks on dev over all
of their arms) and, with `--json`, writes them as one file, an arm per line: `bench/results/`
holds those behind the tables of RESULTS.md.

Budget: every arm trains for `--cpu-seconds` of this process's CPU time (`time.process_time`:
data loading included, evaluation excluded) on `--threads` torch threads, default 1. Unlike wall
time, CPU time does not stretch when other processes share the cores, so arms that ran under
different load still got the same compute. The schedule is sized to the budget: linear warmup
over the config's `train.warmup_steps`, then constant, or cosine to 0 at the step where the
budget is expected to run out (re-estimated from the measured step time at steps 8, 16, 32, ...).

Arms: reference; nlmm (the config as written); one_level (its fastest CMS level alone);
no_memory (L_mem 0); plain (one level, no memory: a plain pre-norm transformer of the same
widths); adamw, sgd, dmgd, muon, universal_anderson (every level on that optimizer).

    .venv/bin/python bench/quality_bench.py --corpus B --models reference --search coordinate \
        --ablations "" --json B-ref.json
    .venv/bin/python bench/quality_bench.py --corpus B --models nlmm --search coordinate \
        --json B-nlmm.json
    .venv/bin/python bench/quality_bench.py --report B-ref.json B-nlmm.json
    .venv/bin/python bench/quality_bench.py --corpus C --picks-from B-ref.json B-nlmm.json
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
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
import harness  # noqa: E402
from reference_model import REFERENCE_LOSS, ReferenceEncoder  # noqa: E402

from nlmm.config import OPTIMIZERS, Config, resolve_config  # noqa: E402
from nlmm.data.backbone_features import ensure_features  # noqa: E402
from nlmm.data.cache import PreparedCache, prepare  # noqa: E402
from nlmm.data.loader import TrainLoader  # noqa: E402
from nlmm.data.synth import synth_corpus  # noqa: E402
from nlmm.devices import resolve_device  # noqa: E402
from nlmm.metric_names import DIRECTIONS  # noqa: E402
from nlmm.eval.evaluate import evaluate_split  # noqa: E402
from nlmm.train.loop import Trainer, lr_factor  # noqa: E402

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


@dataclasses.dataclass(frozen=True)
class Setting:
    """What the grid varies; `lr` is the fastest CMS level's for NL-MM (the others keep their
    ratio to it, as `train.lr` does)."""

    lr: float
    beta2: float
    schedule: str
    batch: int

    def __str__(self) -> str:
        return f"lr {self.lr:g}, β2 {self.beta2:g}, {self.schedule}, batch {self.batch}"

    def overrides(self) -> list[str]:
        return [f"train.lr={self.lr}", f"train.schedule={self.schedule}",
                f"train.batch_size={self.batch}"]


class NullSink:
    def log(self, step: int, epoch: int, values: dict[str, float]) -> None:
        pass


def timed_training(batches: Iterator[Any], step: Callable[[Any], None], budgets_s: list[float],
                   score: Callable[[], dict[str, float]],
                   on_calibrated: Callable[[float], None] | None = None,
                   clock: Callable[[], float] = time.perf_counter
                   ) -> dict[float, dict[str, float]]:
    """Run `step` over `batches` until the largest budget of `clock` seconds; score at each
    budget (untimed). `on_calibrated` gets the mean seconds per step so far at steps 8, 16,
    32, ... (the first steps are slower, so later estimates are better)."""
    results: dict[float, dict[str, float]] = {}
    pending = sorted(budgets_s)
    elapsed, steps = 0.0, 0
    tick = clock()
    for batch in batches:
        step(batch)
        now = clock()
        elapsed, tick = elapsed + now - tick, now
        steps += 1
        if on_calibrated is not None and steps >= CALIBRATION_STEPS and steps & (steps - 1) == 0:
            on_calibrated(elapsed / steps)
        if elapsed >= pending[0]:
            metrics = score()
            metrics["steps"] = steps
            results[pending.pop(0)] = metrics
            if not pending:
                return results
            tick = clock()
    raise RuntimeError("the batch stream ended before the budget")


def splits_score(model: torch.nn.Module, cache: PreparedCache, device: torch.device,
                 dev: bool) -> Callable[[], dict[str, float]]:
    """Test metrics, and with `dev` the dev split's as `dev_<key>`."""
    def score() -> dict[str, float]:
        out = evaluate_split(model, cache, "test", device)
        if dev:
            out.update({f"dev_{k}": v for k, v in evaluate_split(model, cache, "dev",
                                                                 device).items()})
        return out
    return score


def run_nlmm(cfg: Config, cache: PreparedCache, device: torch.device, budgets_s: list[float],
             folder: Path, *, beta2: float | None = None, dev: bool = False,
             clock: Callable[[], float] = time.perf_counter) -> dict[float, dict[str, float]]:
    """NL-MM as `cfg` says, its schedule (warmup, then `train.schedule`) sized to the largest
    budget; `beta2` replaces the Adam β2 nlmm ships."""
    cache = ensure_features(cache, cfg.encoders, device, progress=False)
    if beta2 is not None:
        cfg = dataclasses.replace(cfg, cms_levels=[dataclasses.replace(lvl, beta2=beta2)
                                                   for lvl in cfg.cms_levels])
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
        trainer.total_steps = max(int(max(budgets_s) / step_s), cfg.train.warmup_steps + 1)

    return timed_training(batches(), trainer.train_step, budgets_s,
                          splits_score(trainer.model, cache, device, dev), calibrated, clock)


def run_reference(cfg: Config, cache: PreparedCache, device: torch.device,
                  budgets_s: list[float], batch_size: int = 128,
                  build: Callable[[], torch.nn.Module] | None = None, *,
                  lr: float = 1e-3, beta2: float = 0.999, schedule: str = "constant",
                  warmup: int = 0, dev: bool = False,
                  clock: Callable[[], float] = time.perf_counter
                  ) -> dict[float, dict[str, float]]:
    """The reference trained for the budgets with AdamW (`lr`, `beta2`), linear warmup over
    `warmup` steps, then `schedule` sized to the largest budget as NL-MM's is. `build` makes
    another reference model (e.g. one cut to a corpus's two modalities), default the
    three-tower ReferenceEncoder. The defaults are the untuned setting of the first benches."""
    torch.manual_seed(cfg.train.seed)
    model = (build() if build else
             ReferenceEncoder(cache.tokenizer.vocab_size, cfg.data.n_mels)).to(device)
    opt = model.optimizer(lr=lr, betas=(0.9, beta2))
    max_frames = int(cfg.data.max_audio_seconds * cfg.data.sample_rate / cfg.data.hop_length) + 1
    plan = {"done": 0, "total": warmup + 1}

    def batches() -> Iterator[dict[str, torch.Tensor]]:
        for epoch in itertools.count():
            yield from TrainLoader(cache, "train", batch_size, seed=cfg.train.seed, epoch=epoch,
                                   device=device, max_audio_frames=max_frames)

    def step(batch: dict[str, torch.Tensor]) -> None:
        plan["done"] += 1
        for group in opt.param_groups:
            group["lr"] = lr * lr_factor(plan["done"], plan["total"], warmup, schedule)
        model.train()
        loss = REFERENCE_LOSS(model(batch))["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def calibrated(step_s: float) -> None:
        plan["total"] = max(int(max(budgets_s) / step_s), warmup + 1)

    return timed_training(batches(), step, budgets_s, splits_score(model, cache, device, dev),
                          calibrated, clock)


@dataclasses.dataclass(frozen=True)
class Arm:
    name: str  # "reference" or a key of ABLATIONS
    setting: Setting
    seed: int


def train_arm(arm: Arm, base_name: str, base_sets: list[str], cache: PreparedCache,
              device: torch.device, budget_s: float, folder: Path) -> dict[str, Any]:
    """One arm for `budget_s` CPU seconds: test and dev metrics, steps, CPU and wall seconds."""
    s, seed = arm.setting, arm.seed
    sets = base_sets + [f"train.seed={seed}"]
    base = resolve_config(base_name, sets)
    wall, cpu = time.perf_counter(), time.process_time()
    if arm.name == "reference":
        metrics = run_reference(base, cache, device, [budget_s], s.batch, lr=s.lr, beta2=s.beta2,
                                schedule=s.schedule, warmup=base.train.warmup_steps, dev=True,
                                clock=time.process_time)[budget_s]
    else:
        cfg = resolve_config(base_name, sets + ABLATIONS[arm.name](base) + s.overrides())
        metrics = run_nlmm(cfg, cache, device, [budget_s], folder / f"{arm.name}-{seed}",
                           beta2=s.beta2, dev=True, clock=time.process_time)[budget_s]
    metrics.update(cpu_s=time.process_time() - cpu, wall_s=time.perf_counter() - wall,
                   load=os.getloadavg()[0])
    return metrics


ORCHESTRATION = ("json", "reuse", "report", "models", "ablations", "optimizer_lrs")


def stamp(args: argparse.Namespace, base: Config) -> str:
    """The harness's stamp (date, commit, machine) and a hash of everything else that decides
    the figures: the resolved config and this bench's arguments (less those that only share
    the work out or name files, so the processes of one split run hash alike)."""
    what = {"config": dataclasses.asdict(base),
            "args": {k: v for k, v in sorted(vars(args).items()) if k not in ORCHESTRATION}}
    digest = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()
    return (f"{harness.stamp()} · config hash {digest[:12]} "
            f"({args.config}{' ' + ' '.join(args.set) if args.set else ''})")


def corpus(args: argparse.Namespace, folder: Path) -> Path:
    if args.corpus:
        return Path(args.corpus)
    root = folder / "corpus"
    start = time.perf_counter()
    synth_corpus(root, n_images=args.images, seed=args.seed, engine="builtin", progress=False,
                 objects=args.objects)
    print(f"corpus: {args.images} synthetic images, "
          f"{f'{args.objects} objects each' if args.objects else '1-2 objects (free mode)'}, "
          f"seed {args.seed}, written in {time.perf_counter() - start:.0f} s", flush=True)
    return root


# ------------------------------------------------------------------ tables

def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def grid_table(runs: list[dict[str, Any]], picks: dict[str, Setting]) -> str:
    """Dev mean R@1 (and steps) of every grid arm, both models side by side; picks in bold."""
    models = ("reference", "nlmm")
    cells: dict[Setting, dict[str, dict[str, Any]]] = {}
    for run in runs:
        if run["grid"] and run["arm"].name in models:
            cells.setdefault(run["arm"].setting, {})[run["arm"].name] = run
    lines = ["| lr | β2 | schedule | batch | " + " | ".join(
        f"{m} steps | {m} dev mean R@1" for m in models) + " |", "|---" * 8 + "|"]
    for s in sorted(cells, key=lambda s: (s.batch, s.lr, s.beta2, s.schedule)):
        row = f"| {s.lr:g} | {s.beta2:g} | {s.schedule} | {s.batch} |"
        for m in models:
            run = cells[s].get(m)
            if run is None:
                row += " – | – |"
                continue
            dev = f"{run['metrics']['dev_mean_r1']:.1f}"
            row += f" {run['metrics']['steps']} | {f'**{dev}**' if picks.get(m) == s else dev} |"
        lines.append(row)
    return "\n".join(lines)


def result_table(runs: list[dict[str, Any]]) -> str:
    """One row per arm: test R@1 per direction (mean over seeds), test and dev mean R@1 (each
    seed's after the mean), and the ratio of the test mean to the reference's."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault(run["arm"].name, []).append(run)
    ref = groups.get("reference")
    ref_mean = _mean([r["metrics"]["mean_r1"] for r in ref]) if ref else None
    lines = [f"| arm | setting | seeds | steps | {' | '.join(DIRECTIONS)} | test mean R@1 | "
             "dev mean R@1 | × reference |", "|---" * (7 + len(DIRECTIONS)) + "|"]
    for name, group in groups.items():
        ms = [r["metrics"] for r in group]
        dirs = " | ".join(f"{_mean([m.get(f'{d}_r1', float('nan')) for m in ms]):.1f}"
                          for d in DIRECTIONS)

        def figure(key: str) -> str:
            values = [m[key] for m in ms]
            each = " / ".join(f"{v:.1f}" for v in values)
            return f"{_mean(values):.1f}" + (f" ({each})" if len(values) > 1 else "")
        ratio = f"{_mean([m['mean_r1'] for m in ms]) / ref_mean:.2f}" if ref_mean else "–"
        steps = " / ".join(str(m["steps"]) for m in ms)
        seeds = ",".join(str(r["arm"].seed) for r in group)
        lines.append(f"| {name} | {group[0]['arm'].setting} | {seeds} | {steps} | {dirs} | "
                     f"{figure('mean_r1')} | {figure('dev_mean_r1')} | {ratio} |")
    return "\n".join(lines)


# ------------------------------------------------------------------ the run

def best(runs: list[dict[str, Any]], name: str) -> Setting:
    """The setting of `name`'s search arms with the best dev mean R@1."""
    mine = [r for r in runs if r["arm"].name == name and r["grid"]]
    return max(mine, key=lambda r: r["metrics"]["dev_mean_r1"])["arm"].setting


def parse_floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def parse_optimizer_lrs(items: list[str]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for item in items:
        name, _, lrs = item.partition("=")
        if name not in OPTIMIZERS or not lrs:
            sys.exit(f"--optimizer-lrs {item!r} must look like sgd=1e-2,3e-2 with one of "
                     f"{', '.join(OPTIMIZERS)}")
        out[name] = parse_floats(lrs)
    return out


def shipped_setting(cfg: Config) -> Setting:
    """The config's own lr, schedule, batch and β2 (its fastest level's)."""
    fastest = min(cfg.cms_levels, key=lambda lvl: lvl.chunk_size)
    return Setting(cfg.train.lr or fastest.lr, fastest.beta2, cfg.train.schedule,
                   cfg.train.batch_size)


def to_json(run: dict[str, Any]) -> dict[str, Any]:
    return {"arm": run["arm"].name, "setting": dataclasses.asdict(run["arm"].setting),
            "seed": run["arm"].seed, "grid": run["grid"], "metrics": run["metrics"]}


def from_json(item: dict[str, Any]) -> dict[str, Any]:
    return {"arm": Arm(item["arm"], Setting(**item["setting"]), item["seed"]),
            "grid": item["grid"], "metrics": item["metrics"]}


def read_results(paths: list[Path]) -> tuple[list[str], list[dict[str, Any]],
                                             dict[str, Setting]]:
    """Stamps, runs and picks of earlier `--json` files (later files' picks win)."""
    stamps, runs, picks = [], [], {}
    for path in paths:
        data = json.loads(path.read_text())
        stamps.append(data["stamp"])
        seen = {r["arm"] for r in runs}
        runs += [r for r in map(from_json, data["runs"]) if r["arm"] not in seen]
        picks.update({k: Setting(**v) for k, v in data["picks"].items()})
    return stamps, runs, picks


def report(stamps: list[str], runs: list[dict[str, Any]], picks: dict[str, Setting],
           ablations: list[str], tuned_here: bool) -> str:
    """The tables: the grid on dev (when the picks were made on these runs), each optimizer's
    lr grid, and the test figures of every arm at its pick."""
    out = ["\n".join(dict.fromkeys(stamps))]
    if tuned_here and any(r["grid"] and r["arm"].name in ("reference", "nlmm") for r in runs):
        out.append(f"grid, dev split (picks in bold):\n{grid_table(runs, picks)}")
    for opt in (k for k in picks if k in OPTIMIZERS):
        grid = sorted((r for r in runs if r["arm"].name == opt and r["grid"]),
                      key=lambda r: r["arm"].setting.lr)
        if tuned_here and grid:
            out.append(f"{opt}, its own lr grid ({grid[0]['arm'].setting.schedule}, batch "
                       f"{grid[0]['arm'].setting.batch}), dev mean R@1: " + ", ".join(
                           f"lr {r['arm'].setting.lr:g}: {r['metrics']['dev_mean_r1']:.1f}"
                           for r in grid))
    headline = ["reference", "nlmm", *ablations, *(k for k in picks if k in OPTIMIZERS)]
    final = [r for r in runs if r["arm"].name in headline
             and r["arm"].setting == picks.get(r["arm"].name, picks.get("nlmm"))]
    final.sort(key=lambda r: (headline.index(r["arm"].name), r["arm"].seed))
    out.append(f"test split, each arm at its dev pick:\n{result_table(final)}")
    return "\n\n".join(out)


Stage = Callable[[Setting | None], list[Setting]]


def search_stages(search: str, lrs: list[float], beta2s: list[float], schedules: list[str],
                  batches: list[int]) -> list[Stage]:
    """What each model trains, stage by stage; a stage gets the model's best setting so far
    (None before any), and arms already measured are not trained again.
    grid: every lr x β2 x schedule at the first batch size, then the other batch sizes at the
    best. coordinate: every lr at the best setting so far (at the start: the first β2, schedule
    and batch), then every β2 at the best, then every schedule, then every batch size."""
    first = Setting(lrs[0], beta2s[0], schedules[0], batches[0])

    def vary(field: str, values: list[Any]) -> Stage:
        return lambda at: [dataclasses.replace(at or first, **{field: v}) for v in values]

    def every(at: Setting | None) -> list[Setting]:
        return [Setting(lr, b2, sched, batches[0])
                for lr, b2, sched in itertools.product(lrs, beta2s, schedules)]

    if search == "grid":
        return [every, vary("batch", batches[1:])]
    return [vary("lr", lrs), vary("beta2", beta2s), vary("schedule", schedules),
            vary("batch", batches)]


SAME_RUN = ("corpus", "images", "objects", "seed", "config", "set", "cpu_seconds", "threads")


def reused(paths: list[Path], args: argparse.Namespace) -> list[dict[str, Any]]:
    """The runs of earlier --json files made with the same corpus, config and budget."""
    runs: list[dict[str, Any]] = []
    for path in paths:
        data = json.loads(path.read_text())
        differ = [k for k in SAME_RUN if data["args"].get(k) != str(getattr(args, k))]
        if differ:
            sys.exit(f"{path} was made with another {differ[0]}; reuse only runs of the same "
                     "corpus, config and budget.")
        runs += [from_json(item) for item in data["runs"]]
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", help="a prepared-or-not corpus in the Flickr8k layout "
                                         "(default: write a synthetic one)")
    parser.add_argument("--images", type=int, default=1200, help="synthetic corpus size")
    parser.add_argument("--objects", type=int, default=None,
                        help="objects per synthetic image on a 3x3 grid (default: 1-2, free)")
    parser.add_argument("--seed", type=int, default=0, help="synthetic corpus seed")
    parser.add_argument("--config", default="tiny_nlmm", help="NL-MM config name or YAML path")
    parser.add_argument("--set", action="append", default=[], help="extra NL-MM config override")
    parser.add_argument("--cpu-seconds", type=float, default=45.0, help="budget of every arm")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--models", default="reference,nlmm", help="the models whose grid runs")
    parser.add_argument("--search", choices=("grid", "coordinate"), default="grid",
                        help="every combination, or one setting at a time from the best")
    parser.add_argument("--reuse", type=Path, nargs="+", default=[],
                        help="--json files of earlier runs on the same corpus and budget: their "
                             "arms are not trained again")
    parser.add_argument("--lrs", default="3e-4,1e-3,3e-3")
    parser.add_argument("--beta2s", default="0.98,0.999")
    parser.add_argument("--schedules", default="constant,cosine")
    parser.add_argument("--batches", default="32,128",
                        help="the grid runs at the first; the others at each model's best")
    parser.add_argument("--ablations", default="one_level,no_memory,plain")
    parser.add_argument("--optimizer-lrs", action="append", default=[],
                        help="an optimizer arm and its lr grid, e.g. sgd=1e-2,3e-2,1e-1, at "
                             "NL-MM's pick (without an NL-MM grid: at the config's setting)")
    parser.add_argument("--seeds", default="0", help="training seeds; the grid runs at the first")
    parser.add_argument("--picks-from", type=Path, nargs="+", default=[],
                        help="--json files of earlier runs: train (or report) their picks")
    parser.add_argument("--report", type=Path, nargs="+", default=[],
                        help="train nothing: the tables of these --json files together")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    ablations = [a for a in args.ablations.split(",") if a]
    unknown = sorted(set(ablations) - set(ABLATIONS))
    if unknown:
        sys.exit(f"unknown ablation {unknown[0]!r}; pick from {', '.join(ABLATIONS)}")
    if args.report:
        stamps, runs, picks = read_results(args.report)
        if args.picks_from:
            picks = read_results(args.picks_from)[2]
        else:  # picks recorded by a --picks-from run stand; searched ones are re-made
            picks.update({name: best(runs, name) for name in picks
                          if any(r["arm"].name == name and r["grid"] for r in runs)})
        tuned_here = not args.picks_from and any(r["grid"] for r in runs)
        print(report(stamps, runs, picks, ablations, tuned_here))
        if args.json:
            # one file for the record: every arm's dev and test figures, one arm per line,
            # with the first file's arguments (corpus, config and budget, which all share)
            lines = ",\n".join(json.dumps(to_json(r)) for r in runs)
            Path(args.json).write_text(
                f'{{"stamp": {json.dumps(chr(10).join(dict.fromkeys(stamps)))},\n'
                f'"args": {json.dumps(json.loads(args.report[0].read_text())["args"])},\n'
                f'"picks": {json.dumps({k: dataclasses.asdict(v) for k, v in picks.items()})},\n'
                f'"runs": [\n{lines}\n]}}\n')
        return
    optimizer_lrs = parse_optimizer_lrs(args.optimizer_lrs)
    models = [m for m in args.models.split(",") if m]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    batches = [int(b) for b in args.batches.split(",") if b]
    device = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    began = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="nlmm-quality-") as tmp:
        folder = Path(tmp)
        os.environ.setdefault("NLMM_RUNS_DIR", str(folder / "runs"))
        root = corpus(args, folder)
        base = resolve_config(args.config, args.set)
        cache = prepare(root, base.data, base.vocab_size, progress=False)
        head = stamp(args, base)
        print(f"{head}\ndevice {device}, torch threads {torch.get_num_threads()}, "
              f"{args.cpu_seconds:g} CPU s per arm; {len(cache.split_captions('train'))} train "
              f"captions, {len(cache.split_images('dev'))} dev / "
              f"{len(cache.split_images('test'))} test images", flush=True)
        runs: list[dict[str, Any]] = reused(args.reuse, args)

        def run(arm: Arm, grid: bool) -> None:
            if any(r["arm"] == arm for r in runs):
                return
            metrics = train_arm(arm, args.config, args.set, cache, device, args.cpu_seconds,
                                folder)
            runs.append({"arm": arm, "grid": grid, "metrics": metrics})
            print(f"{arm.name} [{arm.setting}] seed {arm.seed}: dev {metrics['dev_mean_r1']:.1f}"
                  f", test {metrics['mean_r1']:.1f} after {metrics['steps']} steps "
                  f"({metrics['cpu_s']:.0f} CPU s and {metrics['wall_s']:.0f} s with "
                  f"evaluation, load {metrics['load']:.1f})", flush=True)
            save()

        def save() -> None:
            """After every arm, so a run cut short still leaves its figures."""
            if args.json:
                Path(args.json).write_text(json.dumps(
                    {"stamp": head, "args": {k: str(v) for k, v in vars(args).items()},
                     "picks": {k: dataclasses.asdict(v) for k, v in picks.items()},
                     "runs": [to_json(r) for r in runs]}, indent=1))

        picks: dict[str, Setting] = read_results(args.picks_from)[2] if args.picks_from else {}
        if not args.picks_from:
            for stage in search_stages(args.search, parse_floats(args.lrs),
                                       parse_floats(args.beta2s),
                                       [s for s in args.schedules.split(",") if s], batches):
                for name in models:
                    current = best(runs, name) if any(r["arm"].name == name for r in runs) \
                        else None
                    for setting in stage(current):
                        run(Arm(name, setting, seeds[0]), grid=True)
            picks.update({name: best(runs, name) for name in models})
            at = picks.get("nlmm", shipped_setting(base))
            for opt, lrs in optimizer_lrs.items():
                for lr in lrs:
                    run(Arm(opt, dataclasses.replace(at, lr=lr), seeds[0]), grid=True)
                picks[opt] = best(runs, opt)
        print("picks (best dev mean R@1): " + "; ".join(f"{k}: {v}" for k, v in picks.items()),
              flush=True)

        for seed in seeds:
            for name in [*picks, *(ablations if "nlmm" in picks else [])]:
                run(Arm(name, picks[name] if name in picks else picks["nlmm"], seed), grid=False)
        save()
        print(f"\n{report([head], runs, picks, ablations, tuned_here=not args.picks_from)}")
        print(f"\ntotal {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
