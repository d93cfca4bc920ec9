"""Test-time training: retrieval with and without TTT, after joint training with its auxiliary loss.

Writes a synthetic corpus (grid mode, `--objects` per image), prepares it, and trains NL-MM
(`--config`, default tiny_nlmm) twice for the same `--steps` optimizer steps with the real
`Trainer.train_step`:
  joint  ttt.enable true: contrastive loss + ttt.aux_weight x the self-supervised loss that TTT
         adapts on at test time (nlmm.model.ttt.ssl_loss)
  plain  ttt.enable false: the contrastive loss alone (what joint training costs or gives
         plain retrieval)
Then, on the joint model, a small sweep of (eta, max_steps) at the config's adapter rank and,
at the best of those, of the adapter rank (the adapters are not trained, so a rank is swapped
in at evaluation without retraining) is scored on the DEV split; the setting with the best dev
mean R@1 is the one selected. Every setting is then scored on the TEST split, and the plain
model is scored with the selected setting too (TTT without joint training, as it was before).

Scoring is `nlmm.eval.evaluate`'s (`evaluate_split` = `embed_split` + `score_split`; the two
halves are called here so each embedding pass is timed and reused). Two TTT protocols:
  all    every item adapted on its own loss, queries and gallery (what `nlmm eval` reports)
  query  adapted queries against the plain gallery (what `nlmm search` does), each direction
         scored by `nlmm.eval.recall.retrieval_metrics`
Every mean covers all six directions: a setting where one cannot be scored stops the bench
instead of averaging fewer.
Query-time cost, measured in this run for both: ms per item when a split is embedded in
batches of 128, and ms per query when 16 queries of each modality are embedded one at a time.
`1-cos` is the mean cosine distance between an item's plain and adapted embedding.

    .venv/bin/python bench/ttt_bench.py --images 400 --steps 200   # about 7 min on 1 CPU thread
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nlmm.config import Config, resolve_config
from nlmm.data.backbone_features import ensure_features
from nlmm.data.cache import PreparedCache, prepare
from nlmm.data.loader import iter_modality
from nlmm.data.synth import synth_corpus
from nlmm.devices import resolve_device
from nlmm.metric_names import DIRECTIONS
from nlmm.model import NLMM
from nlmm.model.ttt import LowRankAdapter
from nlmm.eval.evaluate import embed_split, score_split
from nlmm.train.loop import Trainer
from nlmm.eval.recall import retrieval_metrics

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_bench import stamp  # noqa: E402

MODALITY = {"i": "image", "t": "text", "a": "audio"}
SINGLE_QUERIES = 16  # per modality, for the one-at-a-time latency


class NullSink:
    def log(self, step: int, epoch: int, values: dict[str, float]) -> None:
        pass


@dataclass(frozen=True)
class Setting:
    eta: float
    steps: int
    rank: int

    def __str__(self) -> str:
        return f"eta={self.eta:g} steps={self.steps} rank={self.rank}"


def train(cfg: Config, cache: PreparedCache, device: torch.device, steps: int,
          folder: Path) -> tuple[NLMM, dict[str, float]]:
    """`steps` optimizer steps of the real loop; the schedule (warmup + cosine) spans them."""
    cache = ensure_features(cache, cfg.encoders, device, progress=False)
    trainer = Trainer(cfg, cache, device, folder, NullSink(), log=lambda m: None)
    trainer.model.load_pretrained_backbones(progress=False)
    trainer.total_steps = steps
    acc, window, last = cfg.train.accumulate, 20, {}
    losses: list[dict[str, float]] = []
    start = time.perf_counter()
    done = 0
    for epoch in itertools.count():
        group: list[dict[str, torch.Tensor]] = []
        for batch in trainer.loader(epoch):
            group.append(batch)
            if len(group) < acc:
                continue
            out = trainer.train_step(group)
            group = []
            losses.append({k: float(v) for k, v in out.items() if k.startswith("loss")})
            done = trainer.progress.global_step
            if done >= steps:
                break
        if done >= steps:
            break
    seconds = time.perf_counter() - start
    for key in losses[-1]:
        values = [entry[key] for entry in losses[-window:] if key in entry]
        last[key] = sum(values) / len(values)
    last["s_per_step"] = seconds / len(losses)
    return trainer.model.eval(), last


_ADAPTERS: dict[tuple[int, int], list[LowRankAdapter]] = {}  # (id(model), rank) -> adapters


def set_ttt(model: NLMM, setting: Setting, seed: int = 0) -> None:
    """Point the model's TTT at `setting`. The adapters are not trained, so another rank only
    means other (fresh, seeded) adapters; each rank's are kept, so a rank scored twice (dev,
    then test) uses the same ones, and the config's rank keeps the model's own."""
    model.cfg.ttt.eta, model.cfg.ttt.max_steps = setting.eta, setting.steps
    current = model.cfg.ttt.adapter_rank
    if current == setting.rank:
        return
    blocks = [block for encoder in model.encoders.values() for block in encoder.blocks]
    _ADAPTERS[(id(model), current)] = [block.mixer.adapter for block in blocks]
    adapters = _ADAPTERS.get((id(model), setting.rank))
    if adapters is None:
        torch.manual_seed(seed)
        d, device = model.cfg.d_model, next(model.parameters()).device
        adapters = [LowRankAdapter(d, d, setting.rank).to(device) for _ in blocks]
    for block, adapter in zip(blocks, adapters):
        block.mixer.adapter = adapter
    model.cfg.ttt.adapter_rank = setting.rank


def embed(model: NLMM, cache: PreparedCache, split: str, device: torch.device,
          ttt: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], float]:
    """embed_split, and its ms per item."""
    start = time.perf_counter()
    emb, owner = embed_split(model, cache, split, device, ttt=ttt)
    items = sum(len(e) for e in emb.values())
    return emb, owner, 1000.0 * (time.perf_counter() - start) / items


def single_query_ms(model: NLMM, cache: PreparedCache, split: str, device: torch.device,
                    ttt: bool) -> float:
    """ms per query, SINGLE_QUERIES per modality embedded one at a time (as `nlmm search`)."""
    queries = []
    for modality in ("image", "text", "audio"):
        for i, (x, mask, _rows) in enumerate(iter_modality(cache, split, modality, 1, device)):
            if i == SINGLE_QUERIES:
                break
            queries.append((modality, x, mask))

    def run(batch: list[tuple[str, torch.Tensor, torch.Tensor | None]]) -> None:
        for modality, x, mask in batch:
            if ttt:
                model.encode_ttt(modality, x, mask, mask_id=cache.tokenizer.mask_id)
            else:
                with torch.no_grad():
                    model.encode(modality, x, mask)

    run(queries[:1])  # warm-up
    start = time.perf_counter()
    run(queries)
    return 1000.0 * (time.perf_counter() - start) / len(queries)


def all_six(metrics: dict[str, float], what: str) -> dict[str, float]:
    """`metrics` when every direction was scored: a mean over fewer would not compare with
    one over six, so a TTT figure covers all six or is not reported."""
    missing = [d for d in DIRECTIONS if f"{d}_r1" not in metrics]
    if missing:
        raise RuntimeError(f"{what}: {', '.join(missing)} could not be scored; a TTT figure "
                           "averages all six directions or is not reported.")
    return metrics


def query_protocol(query: dict[str, torch.Tensor], gallery: dict[str, torch.Tensor],
                   owner: dict[str, torch.Tensor]) -> dict[str, float]:
    """R@1 per direction with `query` embeddings against `gallery` embeddings and their mean,
    each direction scored by nlmm's `retrieval_metrics` (the query side from one, the gallery
    side from the other)."""
    out: dict[str, float] = {}
    for d in DIRECTIONS:
        q, g = MODALITY[d[0]], MODALITY[d[2]]
        if q in query and g in gallery:
            scored = retrieval_metrics({q: query[q], g: gallery[g]},
                                       {q: owner[q], g: owner[g]}, ks=(1,))
            if f"{d}_r1" in scored:
                out[f"{d}_r1"] = scored[f"{d}_r1"]
    all_six(out, "query-only protocol")
    out["mean_r1"] = sum(out.values()) / len(DIRECTIONS)
    return out


def movement(plain: dict[str, torch.Tensor], adapted: dict[str, torch.Tensor]) -> float:
    """Mean 1 - cos(plain, adapted) over every item of every modality."""
    gaps = torch.cat([1.0 - (plain[m] * adapted[m]).sum(dim=1) for m in plain])
    return float(gaps.mean())


def score(model: NLMM, cache: PreparedCache, split: str, device: torch.device,
          plain: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None,
          setting: Setting | None, latency: bool) -> dict[str, Any]:
    """Metrics of `split` with TTT at `setting` (None: without TTT)."""
    if setting is not None:
        set_ttt(model, setting)
    else:
        embed_split(model, cache, split, device)  # warm-up: first reads of the split, allocations
    emb, owner, ms_item = embed(model, cache, split, device, ttt=setting is not None)
    result: dict[str, Any] = {"all": all_six(score_split(cache, split, emb, owner), split),
                              "ms_item": ms_item,
                              "emb": emb, "owner": owner}
    if latency:
        result["ms_query"] = single_query_ms(model, cache, split, device, setting is not None)
    if plain is not None:
        result["query"] = query_protocol(emb, plain[0], owner)
        result["1-cos"] = movement(plain[0], emb)
    return result


def table(rows: list[tuple[str, str, dict[str, Any], float | None]]) -> str:
    head = (f"| model | TTT | {' | '.join(DIRECTIONS)} | mean R@1 | × no TTT "
            f"| mean R@1 query-only | 1-cos | ms/item (batch 128) | ms/query (one at a time) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for model, ttt, r, base in rows:
        m = r["all"]
        cells = " | ".join(f"{m.get(f'{d}_r1', float('nan')):.1f}" for d in DIRECTIONS)
        ratio = f"{m['mean_r1'] / base:.2f}" if base else "–"
        query = f"{r['query']['mean_r1']:.1f}" if "query" in r else "–"
        cos = f"{r['1-cos']:.2g}" if "1-cos" in r else "–"
        ms_query = f"{r['ms_query']:.1f}" if "ms_query" in r else "–"
        lines.append(f"| {model} | {ttt} | {cells} | {m['mean_r1']:.1f} | {ratio} | {query} | "
                     f"{cos} | {r['ms_item']:.2f} | {ms_query} |")
    return "\n".join(lines)


def parse_settings(text: str, rank: int) -> list[Setting]:
    out = []
    for item in text.split(","):
        eta, steps = item.split(":")
        out.append(Setting(float(eta), int(steps), rank))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400, help="synthetic corpus size")
    parser.add_argument("--objects", type=int, default=3, help="objects per synthetic image")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", default="tiny_nlmm", help="NL-MM config name or YAML path")
    parser.add_argument("--set", action="append", default=[], help="extra config override")
    parser.add_argument("--settings", default="0.1:3,0.3:1,0.3:3,1:1,1:3",
                        help="eta:max_steps pairs swept at the config's adapter rank")
    parser.add_argument("--ranks", default="16", help="adapter ranks swept at the best pair")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: steady timings on a shared machine)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    device = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    began = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="nlmm-ttt-") as tmp:
        folder = Path(tmp)
        os.environ.setdefault("NLMM_RUNS_DIR", str(folder / "runs"))
        root = folder / "corpus"
        synth_corpus(root, n_images=args.images, seed=args.seed, engine="builtin",
                     progress=False, objects=args.objects)
        joint_cfg = resolve_config(args.config, args.set + ["ttt.enable=true"])
        plain_cfg = resolve_config(args.config, args.set + ["ttt.enable=false"])
        cache = prepare(root, joint_cfg.data, joint_cfg.vocab_size, progress=False)
        print(stamp(args, joint_cfg))
        print(f"device {device}, torch threads {torch.get_num_threads()}, config {args.config} "
              f"{' '.join(args.set)}; {args.images} images with {args.objects} objects, "
              f"{len(cache.split_captions('train'))} train captions, "
              f"{len(cache.split_images('dev'))} dev / {len(cache.split_images('test'))} test "
              f"images; {args.steps} steps per model, ttt.aux_weight {joint_cfg.ttt.aux_weight}",
              flush=True)

        models, train_stats = {}, {}
        for name, cfg in (("joint", joint_cfg), ("plain", plain_cfg)):
            models[name], train_stats[name] = train(cfg, cache, device, args.steps, folder / name)
            print(f"trained {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in
                                                  train_stats[name].items()), flush=True)

        joint = models["joint"]
        rank0 = joint.cfg.ttt.adapter_rank
        dev_plain = score(joint, cache, "dev", device, None, None, latency=False)
        plain_pair = (dev_plain["emb"], dev_plain["owner"])
        dev: dict[Setting, float] = {}

        def sweep(settings: list[Setting]) -> None:
            for s in settings:
                dev[s] = score(joint, cache, "dev", device, plain_pair, s, False)["all"]["mean_r1"]
                print(f"dev {s}: mean R@1 {dev[s]:.1f} (no TTT {dev_plain['all']['mean_r1']:.1f})",
                      flush=True)

        sweep(parse_settings(args.settings, rank0))
        best = max(dev, key=dev.get)
        sweep([Setting(best.eta, best.steps, int(r)) for r in args.ranks.split(",") if r
               and int(r) != rank0])
        best = max(dev, key=dev.get)
        print(f"selected on dev: {best}", flush=True)

        rows: list[tuple[str, str, dict[str, Any], float | None]] = []
        results: dict[str, Any] = {"train": train_stats, "dev": {str(s): v for s, v in dev.items()},
                                   "selected": str(best), "test": {}}
        for name, model in models.items():
            base = score(model, cache, "test", device, None, None, latency=True)
            pair = (base["emb"], base["owner"])
            rows.append((name, "off", base, None))
            settings = sorted(dev, key=lambda s: (s.rank != rank0, s.rank, s.eta, s.steps)) \
                if name == "joint" else [best]
            for s in settings:
                r = score(model, cache, "test", device, pair, s, latency=True)
                label = f"{s}" + (" (dev-selected)" if s == best else "")
                rows.append((name, label, r, base["all"]["mean_r1"]))
            results["test"][name] = {label: {k: v for k, v in r.items()
                                             if k not in ("emb", "owner")}
                                     for model_name, label, r, _ in rows if model_name == name}
        print(table(rows))
        print(f"training s/step: joint {train_stats['joint']['s_per_step']:.3f}, plain "
              f"{train_stats['plain']['s_per_step']:.3f}; "
              f"total {time.perf_counter() - began:.0f} s")
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    sys.exit(main())
