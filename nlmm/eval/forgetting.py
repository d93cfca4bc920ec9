"""`nlmm runs forgetting RUN`: Recall on every corpus a run and its ancestors trained on, at the
end of each of them.

A run continued on another corpus (`nlmm train --resume PARENT --data NEW`) descends from its
parent; each run of that lineage is scored at its final checkpoint (last.pt: the weights its
training ended with, which the next run started from) on the split of every corpus of the
lineage, with `nlmm eval`'s evaluation. Down a corpus's rows, a drop after the run that trained
on it is forgetting; a row before it is the model's transfer to a corpus it has not seen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Corpus:
    data: str  # the prepared cache (or pack) a run of the lineage trained on
    sources: list[str]  # the corpus folders it was prepared from

    @property
    def label(self) -> str:
        return " + ".join(self.sources)


@dataclass
class Score:
    corpus: int  # index into Forgetting.corpora
    run: str
    checkpoint: str
    step: int
    trained_on: bool  # the run trained on this corpus itself
    metrics: dict[str, float]  # R@1 of every direction and mean_r1


@dataclass
class Forgetting:
    run: str
    split: str
    lineage: list[str]
    corpora: list[Corpus]
    scores: list[Score] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"run": self.run, "split": self.split, "lineage": self.lineage,
                "corpora": [{"data": c.data, "sources": c.sources} for c in self.corpora],
                "scores": [vars(s) for s in self.scores], "notes": self.notes}


def _open(data: str, loaded: Any) -> Any:
    """The corpus a run trained on, opened for evaluation: its prepared cache (with the
    features the model's frozen backbones need) or its pack."""
    from nlmm.data.backbone_features import ensure_features
    from nlmm.data.cache import PreparedCache
    from nlmm.data.pack_source import PackedSource, is_pack

    if is_pack(data):
        return PackedSource(data)
    return ensure_features(PreparedCache.open(Path(data), verify_sources=False),
                           loaded.cfg.encoders, loaded.device)


def _recall_at_1(loaded: Any, corpus: Any, split: str) -> dict[str, float]:
    from nlmm.data.pack_source import PackedSource
    from nlmm.eval.evaluate import evaluate_packed, evaluate_split

    if isinstance(corpus, PackedSource):
        metrics = evaluate_packed(loaded.model, corpus.path, split, loaded.device,
                                  loaded.cfg.data, loaded.tokenizer)
    else:
        metrics = evaluate_split(loaded.model, corpus, split, loaded.device)
    return {k: v for k, v in metrics.items() if k.endswith("_r1") and "_own_" not in k}


def _sources(data: str) -> list[str]:
    from nlmm.data.cache import PreparedCache
    from nlmm.data.pack_source import is_pack

    if is_pack(data):
        return [data]
    return [str(s["path"]) for s in PreparedCache.open(Path(data), verify_sources=False).sources]


def forgetting(ref: str, split: str = "test", device: str = "auto") -> Forgetting:
    """Score the final checkpoint of `ref` and of each of its ancestors on `split` of every
    corpus they trained on."""
    from nlmm import store
    from nlmm.inference.load import load_for_inference

    store.mark_lost()
    runs, missing = store.lineage(store.get_run(ref))
    corpora: list[Corpus] = []
    for r in runs:
        if r.data not in [c.data for c in corpora]:
            corpora.append(Corpus(r.data, _sources(r.data)))
    report = Forgetting(runs[-1].name, split, [r.name for r in runs], corpora)
    if missing:
        report.notes.append(f"run {runs[0].name} continues run {missing}, which is no longer in "
                            f"the store: the lineage starts at {runs[0].name}.")
    opened: dict[str, Any] = {}
    for r in runs:
        last = store.run_dir(r.name) / "checkpoints" / "last.pt"
        if not last.is_file():
            report.notes.append(f"run {r.name} has no last.pt yet, so it is not scored.")
            continue
        loaded = load_for_inference(last, device=device)
        step = int(loaded.payload["progress"]["global_step"])
        for i, c in enumerate(corpora):
            if c.data not in opened:
                opened[c.data] = _open(c.data, loaded)
            report.scores.append(Score(i, r.name, str(last), step, c.data == r.data,
                                       _recall_at_1(loaded, opened[c.data], split)))
    return report
