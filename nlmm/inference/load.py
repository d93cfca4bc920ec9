"""Load a trained model for evaluation, search or export: by run (its best checkpoint) or file.

The weights come from the checkpoint's weights-only copy (`nlmm.inference.weights_cache`), derived on the
first load and memory-mapped on every later one, into a model built without random
initialisation: every weight is overwritten by the loaded state dict anyway, and initialising a
177M-parameter model takes seconds on a CPU.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from nlmm.config import Config, config_from_dict, with_legacy_defaults
from nlmm.data.tokenizer import TextTokenizer
from nlmm.errors import NlmmError
from nlmm.inference.weights_cache import (checkpoint_key, read_unreplaced, read_weights, small_payload,
                                weights_path, write_weights)

if TYPE_CHECKING:
    from nlmm.data.cache import PreparedCache
    from nlmm.model import NLMM

_init_lock = threading.Lock()


@dataclass
class LoadedModel:
    model: NLMM
    cfg: Config
    tokenizer: TextTokenizer
    cache: PreparedCache | None
    device: torch.device
    checkpoint_path: Path
    payload: dict[str, Any]  # the checkpoint's entries besides the weights (config, metrics, ...)
    source_key: str | None  # checkpoint_key of the bytes the weights came from


def checkpoint_for(target: str | Path | None) -> Path:
    """A checkpoint file for a run name/id or path; None means the latest finished run."""
    if target is not None and (isinstance(target, Path) or Path(target).suffix == ".pt"
                               or Path(target).is_file()):
        return Path(target)
    from nlmm import store  # only a run name needs the store (and SQLAlchemy's import time)

    if target is None:
        run = store.latest_run(status=store.RunStatus.FINISHED)
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


@contextlib.contextmanager
def skipped_init() -> Iterator[None]:
    """torch.nn.init's initialisers as no-ops while a model whose every weight is then loaded
    is built. The patch is process-wide while it lasts, so loads take turns; nlmm builds models
    to train only in worker processes, never beside a load."""
    names = [n for n in vars(torch.nn.init) if n.endswith("_") and not n.startswith("_")]
    with _init_lock:
        saved = {n: getattr(torch.nn.init, n) for n in names}
        try:
            for name in names:
                setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
            yield
        finally:
            for name, fn in saved.items():
                setattr(torch.nn.init, name, fn)


def build_model(cfg: Config, state: dict[str, torch.Tensor], device: torch.device,
                assign: bool) -> NLMM:
    """The model of `cfg` holding `state`, in eval mode on `device`. With `assign` the model
    takes the tensors themselves (memory-mapped ones stay mapped), else copies them in."""
    from nlmm.model import NLMM

    with skipped_init():
        model = NLMM(cfg)
    model.load_state_dict(state, assign=assign)
    return model.to(device).eval()


def _derive(path: Path, device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, Any], str | None]:
    """(weights, small payload, key) read from the checkpoint itself, and written as its
    weights-only copy, filed under the key of the very bytes read."""
    from nlmm.inference.checkpoint import load_checkpoint

    payload, key = read_unreplaced(path, lambda: load_checkpoint(path, map_location="cpu"))
    small = small_payload(payload)
    with _matching(path):
        model = build_model(_config(small, path), payload["model"], torch.device("cpu"), False)
    state = model.state_dict()  # the model's own dtypes, as every later load gets them
    del model, payload
    if key is not None:
        copy = weights_path(path, key)
        if write_weights(copy, key, state, small):
            # read back like every later load, so all loads share one memory layout
            mapped = read_weights(copy, key, device)
            if mapped is not None:
                return mapped[0], mapped[1], key
    return state, small, key


def _config(payload: dict[str, Any], path: Path) -> Config:
    return config_from_dict(with_legacy_defaults(payload["config"]), f"checkpoint {path}")


@contextlib.contextmanager
def _matching(path: Path) -> Iterator[None]:
    """A checkpoint whose config or weights this nlmm cannot build: one sentence saying so."""
    try:
        yield
    except (KeyError, RuntimeError, NlmmError) as exc:
        raise NlmmError(f"checkpoint {path} does not match this version of nlmm's model "
                        f"({str(exc).splitlines()[0]}); retrain or use a matching nlmm.") from None


def load_for_inference(target: str | Path | None, device: str = "auto",
                       data: Any = None) -> LoadedModel:
    """Model in eval mode plus the tokenizer and (when available) the prepared data cache.

    With `data` (a corpus folder or manifest, a CorpusSpec, or a list of them), the corpus is
    prepared (or its cache reused) with the checkpoint's own data parameters, so a gallery
    always matches the features the model was trained on.
    """
    from nlmm.data.cache import PreparedCache
    from nlmm.devices import resolve_device

    path = checkpoint_for(target)
    dev = resolve_device(device)
    key = checkpoint_key(path)
    mapped = read_weights(weights_path(path, key), key, dev) if key is not None else None
    if mapped is None:
        state, payload, key = _derive(path, dev)
    else:
        state, payload = mapped
    with _matching(path):
        cfg = _config(payload, path)
        model = build_model(cfg, state, dev, True)
    tokenizer = TextTokenizer.from_json(payload["tokenizer"])
    cache = None
    if data is not None:
        from nlmm.data.cache import prepare

        # the model's own tokenizer: one trained on another corpus would give other token ids
        cache = prepare(data, cfg.data, cfg.vocab_size, progress=True,
                        encoders=cfg.encoders, device=dev, tokenizer=tokenizer)
    else:
        from nlmm.data.pack_source import is_pack

        source = str(payload.get("data", {}).get("cache", ""))
        cache_path = Path(source)
        if source and is_pack(source):
            pass  # a streamed run: evaluation reads its pack (evaluate_target), search needs --data
        elif cache_path.is_dir():
            from nlmm.data.backbone_features import ensure_features

            cache = ensure_features(PreparedCache.open(cache_path), cfg.encoders, dev)
    return LoadedModel(model, cfg, tokenizer, cache, dev, path, payload, key)


def training_pack(loaded: LoadedModel) -> str | None:
    """The pack a model was trained from when it streamed its data, else None."""
    from nlmm.data.pack_source import is_pack

    source = str(loaded.payload.get("data", {}).get("cache", ""))
    return source if source and is_pack(source) else None


def require_cache(loaded: LoadedModel) -> PreparedCache:
    if loaded.cache is None:
        # (a model that streamed from a pack never gets here: search and eval read the pack)
        where = loaded.payload.get("data", {}).get("cache", "?")
        raise NlmmError(f"the data cache this model was trained on ({where}) is gone; pass --data "
                        "with the corpus folder to rebuild it.")
    return loaded.cache
