"""Self-contained inference bundles: safetensors weights, config and tokenizer in one folder.

Loading a bundle needs only `nlmm` installed (no store, no run folder, no data cache):

    from nlmm.export import load_bundle
    bundle = load_bundle("bundle/")
    ids, lens = bundle.tokenizer.encode_batch(["a dog runs"], bundle.cfg.data.text_max_len)
    emb = bundle.model.encode("text", torch.as_tensor(ids).long(), torch.as_tensor(ids) != 0)
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

import nlmm
from nlmm.config import Config, config_from_dict, save_config, with_legacy_defaults
from nlmm.data.tokenizer import TextTokenizer
from nlmm.errors import NlmmError
from nlmm.model import NLMM

WEIGHTS, CONFIG, TOKENIZER, META = "model.safetensors", "config.yaml", "tokenizer.json", "bundle.json"


@dataclass
class Bundle:
    model: NLMM
    cfg: Config
    tokenizer: TextTokenizer
    meta: dict


def export_bundle(target: str, out: Path, force: bool = False) -> Path:
    """Write the best checkpoint of a run (or a checkpoint file) as a bundle in `out`.

    A folder that holds anything already is refused unless `force`, which overwrites the
    bundle's files there and leaves any other file alone.
    """
    from nlmm.inference import load_for_inference

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NlmmError(f"{out} is a file; choose a folder to export the bundle into.")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise NlmmError(f"{out} is not empty; pass --force to overwrite the bundle there, or "
                        f"choose another folder.")
    loaded = load_for_inference(target, device="cpu")
    out.mkdir(parents=True, exist_ok=True)
    save_config(loaded.cfg, out / CONFIG)
    loaded.tokenizer.save(out / TOKENIZER)
    progress = loaded.payload.get("progress", {})
    meta = {"nlmm_version": nlmm.__version__, "source": str(loaded.checkpoint_path),
            "step": progress.get("global_step"), "metrics": loaded.payload.get("metrics", {}),
            "embed_dim": loaded.cfg.embed_dim}
    (out / META).write_text(json.dumps(meta, indent=2))
    # safetensors refuses shared storage (tied weights); clone so every tensor owns its memory
    state = {k: v.detach().contiguous().clone() for k, v in loaded.model.state_dict().items()}
    save_file(state, str(out / WEIGHTS))
    # safetensors creates its file 0600 whatever the umask; give it the mode the umask gave
    # the bundle's other files, so whoever may read the config may read the weights too
    os.chmod(out / WEIGHTS, stat.S_IMODE((out / META).stat().st_mode))
    return out


def load_bundle(path: str | Path, device: str | torch.device = "cpu") -> Bundle:
    """Model (eval mode), config and tokenizer from a folder written by `export_bundle`."""
    path = Path(path)
    missing = [n for n in (WEIGHTS, CONFIG, TOKENIZER) if not (path / n).is_file()]
    if missing:
        raise NlmmError(f"{path} is not a complete nlmm bundle (missing {', '.join(missing)}); "
                        "write one with `nlmm export RUN --out DIR`.")
    raw = yaml.safe_load((path / CONFIG).read_text()) or {}
    cfg = config_from_dict(with_legacy_defaults(raw), str(path / CONFIG))
    model = NLMM(cfg)
    model.load_state_dict(load_file(str(path / WEIGHTS)))
    model.to(device).eval()
    meta = json.loads((path / META).read_text()) if (path / META).is_file() else {}
    return Bundle(model, cfg, TextTokenizer.load(path / TOKENIZER), meta)
