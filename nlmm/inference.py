"""Load a trained model for evaluation, search or export: by run (its best checkpoint) or file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nlmm import store
from nlmm.config import Config, config_from_dict, with_legacy_defaults
from nlmm.data.cache import PreparedCache
from nlmm.data.tokenizer import TextTokenizer
from nlmm.errors import NlmmError
from nlmm.model import NLMM
from nlmm.train.checkpoint import load_checkpoint
from nlmm.train.loop import resolve_device


@dataclass
class LoadedModel:
    model: NLMM
    cfg: Config
    tokenizer: TextTokenizer
    cache: PreparedCache | None
    device: torch.device
    checkpoint_path: Path
    payload: dict[str, Any]


def checkpoint_for(target: str | Path | None) -> Path:
    """A checkpoint file for a run name/id or path; None means the latest finished run."""
    if target is not None and (isinstance(target, Path) or Path(target).suffix == ".pt"
                               or Path(target).is_file()):
        return Path(target)
    if target is None:
        run = store.latest_run(status="finished")
        if run is None:
            raise NlmmError("no finished run in the store; train one with `nlmm train flickr8k` "
                            "or pass --run / --checkpoint.")
    else:
        run = store.get_run(str(target))
    ckpt = store.best_checkpoint(run.id) or store.last_checkpoint(run.id)
    if ckpt is None:
        raise NlmmError(f"run {run.name} has no checkpoint yet; wait for its first evaluation or "
                        "pass --checkpoint.")
    return Path(ckpt.path)


def load_for_inference(target: str | Path | None, device: str = "auto",
                       data: Path | None = None) -> LoadedModel:
    """Model in eval mode plus the tokenizer and (when available) the prepared data cache.

    With `data`, the corpus is prepared (or its cache reused) with the checkpoint's own data
    parameters, so a gallery always matches the features the model was trained on.
    """
    path = checkpoint_for(target)
    dev = resolve_device(device)
    payload = load_checkpoint(path, map_location=dev)
    try:
        cfg = config_from_dict(with_legacy_defaults(payload["config"]), f"checkpoint {path}")
        model = NLMM(cfg).to(dev)
        model.load_state_dict(payload["model"])
    except (KeyError, RuntimeError, NlmmError) as exc:
        raise NlmmError(f"checkpoint {path} does not match this version of nlmm's model "
                        f"({str(exc).splitlines()[0]}); retrain or use a matching nlmm.") from None
    model.eval()
    tokenizer = TextTokenizer.from_json(payload["tokenizer"])
    cache = None
    if data is not None:
        from nlmm.data.cache import prepare

        cache = prepare(Path(data), cfg.data, cfg.vocab_size, progress=True,
                        encoders=cfg.encoders, device=dev)
    else:
        cache_path = Path(payload.get("data", {}).get("cache", ""))
        if cache_path.is_dir():
            from nlmm.data.backbone_features import ensure_features

            cache = ensure_features(PreparedCache.open(cache_path), cfg.encoders, dev)
    return LoadedModel(model, cfg, tokenizer, cache, dev, path, payload)


def require_cache(loaded: LoadedModel) -> PreparedCache:
    if loaded.cache is None:
        where = loaded.payload.get("data", {}).get("cache", "?")
        raise NlmmError(f"the data cache this model was trained on ({where}) is gone; pass --data "
                        "with the corpus folder to rebuild it.")
    return loaded.cache
