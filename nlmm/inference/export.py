"""Self-contained inference bundles: safetensors weights, config and tokenizer in one folder
(`nlmm.inference.bundle` reads them and embeds texts, images and speech with them).

Loading a bundle needs only `nlmm` installed (no store, no run folder, no data cache):

    import nlmm
    bundle = nlmm.load_bundle("bundle/")
    emb = bundle.embed_text(["a dog runs"])
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from safetensors.torch import save_file

import nlmm
from nlmm.inference.bundle import CONFIG, META, TOKENIZER, WEIGHTS
from nlmm.config import save_config
from nlmm.errors import NlmmError


def export_bundle(target: str, out: Path, force: bool = False) -> Path:
    """Write the best checkpoint of a run (or a checkpoint file) as a bundle in `out`.

    A folder that holds anything already is refused unless `force`, which overwrites the
    bundle's files there and leaves any other file alone.
    """
    from nlmm.inference.load import load_for_inference

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

