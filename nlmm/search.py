"""Cross-modal retrieval with a trained checkpoint and cached gallery indexes.

The gallery of a (checkpoint, split, modality) is embedded once and stored under
`runs/<run>/index/`, keyed by the checkpoint's content hash and the data cache's key, so a
changed checkpoint or corpus rebuilds it. Index files are written to a temp name and renamed,
so a search running beside another never reads a half-written index.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress

from nlmm.data.cache import PreparedCache
from nlmm.data.features import BadInput, load_image, load_wav, log_mel, normalize_images
from nlmm.data.loader import iter_modality, owner_images
from nlmm.errors import NlmmError
from nlmm.inference import LoadedModel, checkpoint_for, load_for_inference, require_cache

INDEX_VERSION = 1


@dataclass
class SearchRequest:
    text: str | None = None
    image: Path | None = None
    audio: Path | None = None
    run: str | None = None
    checkpoint: Path | None = None
    target: str | None = None
    k: int = 5
    split: str = "test"
    data: Path | None = None
    ttt: bool = False
    device: str = "auto"


@dataclass
class SearchHit:
    rank: int
    score: float
    modality: str
    item: str  # image file, caption text or wav file
    caption: str | None  # the caption (for audio: what the speaker read)
    path: str | None  # file on disk, when the item is a file

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GalleryIndex:
    emb: torch.Tensor  # (N, d) L2-normalised
    rows: np.ndarray  # cache row of each item (image rows or caption rows)


def checkpoint_hash(path: Path) -> str:
    """SHA-256 of the checkpoint's bytes, memoised next to it by (size, mtime) so a search
    does not reread a large file that has not changed."""
    path = Path(path)
    st = path.stat()
    memo = path.with_name(f".{path.name}.sha256.json")
    stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    try:
        saved = json.loads(memo.read_text())
        if {k: saved.get(k) for k in stamp} == stamp:
            return saved["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    with open(path, "rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
    try:
        tmp = memo.with_name(memo.name + f".{os.getpid()}")
        tmp.write_text(json.dumps({**stamp, "sha256": digest}))
        os.replace(tmp, memo)
    except OSError:
        pass  # a read-only run folder only costs a rehash next time
    return digest


def index_dir_for(checkpoint: Path) -> Path:
    checkpoint = Path(checkpoint).resolve()
    folder = checkpoint.parent
    return (folder.parent if folder.name == "checkpoints" else folder) / "index"


class Searcher:
    """A loaded model plus its gallery indexes; keeps both in memory across queries."""

    def __init__(self, checkpoint: str | Path | None = None, device: str = "auto",
                 data: Path | None = None, console: Console | None = None):
        self.loaded: LoadedModel = load_for_inference(checkpoint, device=device, data=data)
        self.cache: PreparedCache = require_cache(self.loaded)
        self.console = console
        self.index_dir = index_dir_for(self.loaded.checkpoint_path)
        self._hash = checkpoint_hash(self.loaded.checkpoint_path)
        self._indexes: dict[tuple[str, str], GalleryIndex] = {}
        self.builds = 0  # gallery encodings done by this searcher (tests check reuse)

    # ------------------------------------------------------------------ gallery

    def index_path(self, split: str, modality: str) -> Path:
        return self.index_dir / f"{modality}-{split}-{self._hash[:16]}-{self.cache.key}.pt"

    def gallery(self, split: str, modality: str) -> GalleryIndex:
        key = (split, modality)
        if key in self._indexes:
            return self._indexes[key]
        path = self.index_path(split, modality)
        index = self._read_index(path)
        if index is None:
            index = self._build_index(split, modality)
            self._write_index(path, index)
        index.emb = index.emb.to(self.loaded.device)
        self._indexes[key] = index
        return index

    def _read_index(self, path: Path) -> GalleryIndex | None:
        if not path.is_file():
            return None
        try:
            body = torch.load(path, map_location="cpu", weights_only=False)
            if body.get("version") != INDEX_VERSION:
                return None
            return GalleryIndex(body["emb"], np.asarray(body["rows"]))
        except Exception:  # an unreadable index is only a cache miss; it is rebuilt
            return None

    def _write_index(self, path: Path, index: GalleryIndex) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        torch.save({"version": INDEX_VERSION, "emb": index.emb.cpu(), "rows": index.rows}, tmp)
        os.replace(tmp, path)

    def _build_index(self, split: str, modality: str) -> GalleryIndex:
        splits = ("train", "dev", "test") if split == "all" else (split,)
        model, device = self.loaded.model, self.loaded.device
        embs, rows = [], []
        total = sum(len(owner_images(self.cache, s, modality)) for s in splits)
        if total == 0:
            raise NlmmError(f"the {split} split has no {modality} items to search; pick another "
                            "--split or --in.")
        with Progress(console=self.console, transient=True, disable=self.console is None) as bar:
            task = bar.add_task(f"indexing {total} {modality} items ({split})", total=total)
            for s in splits:
                for x, mask, batch_rows in iter_modality(self.cache, s, modality, 256, device):
                    with torch.no_grad():
                        embs.append(model.encode(modality, x, mask).float().cpu())
                    rows.append(np.asarray(batch_rows))
                    bar.advance(task, len(batch_rows))
        self.builds += 1
        return GalleryIndex(torch.cat(embs), np.concatenate(rows))

    # ------------------------------------------------------------------ queries

    def encode_query(self, text: str | None = None, image: Path | None = None,
                     audio: Path | None = None, ttt: bool = False) -> tuple[str, torch.Tensor]:
        given = [(m, v) for m, v in (("text", text), ("image", image), ("audio", audio))
                 if v is not None]
        if len(given) != 1:
            raise NlmmError("give exactly one query: a text, --image FILE or --audio FILE.")
        modality, value = given[0]
        cfg, device = self.loaded.cfg, self.loaded.device
        if modality == "text":
            if not str(value).strip():
                raise NlmmError("the text query is empty; type a few words to search for.")
            ids, _ = self.loaded.tokenizer.encode_batch([str(value)], cfg.data.text_max_len)
            x = torch.as_tensor(ids, dtype=torch.long, device=device)
            mask = x != self.loaded.tokenizer.pad_id
        else:
            path = Path(value)
            if not path.is_file():
                raise NlmmError(f"query file {path} does not exist.")
            try:
                if modality == "image":
                    pixels = torch.as_tensor(load_image(path, cfg.data.image_size))[None]
                    x, mask = normalize_images(pixels.to(device)), None
                else:
                    mel = log_mel(load_wav(path, cfg.data.sample_rate), cfg.data)
                    x = torch.as_tensor(mel.astype(np.float32), device=device)[None, None]
                    mask = torch.ones(1, x.shape[-1], dtype=torch.bool, device=device)
            except BadInput as exc:
                raise NlmmError(f"cannot read query file {path}: {exc}.") from None
        model = self.loaded.model
        if ttt:
            emb = model.encode_ttt(modality, x, mask).detach()
        else:
            with torch.no_grad():
                emb = model.encode(modality, x, mask)
        return modality, emb.float()

    def query(self, text: str | None = None, image: Path | None = None, audio: Path | None = None,
              target: str | None = None, k: int = 5, split: str = "test",
              ttt: bool = False) -> list[SearchHit]:
        if k <= 0:
            raise NlmmError(f"-k must be a positive number of results, got {k}.")
        modality, q = self.encode_query(text, image, audio, ttt)
        target = target or ("image" if modality != "image" else "text")
        index = self.gallery(split, target)
        scores, idx = top_k(q, index.emb, min(k, len(index.rows)))
        return [self._hit(rank + 1, float(s), target, int(index.rows[int(i)]))
                for rank, (s, i) in enumerate(zip(scores[0].tolist(), idx[0].tolist()))]

    def _hit(self, rank: int, score: float, modality: str, row: int) -> SearchHit:
        cache = self.cache
        if modality == "image":
            name = cache.image_file(row)
            return SearchHit(rank, score, modality, name, None, str(cache.image_path(row)))
        text = cache.caption_text(row)
        if modality == "text":
            return SearchHit(rank, score, modality, text, text, None)
        wav = cache.wav_path(row)
        return SearchHit(rank, score, modality, wav.name if wav else "?", text,
                         str(wav) if wav else None)


def top_k(query: torch.Tensor, gallery: torch.Tensor, k: int,
          chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k by inner product, in gallery chunks so memory stays bounded."""
    best_s = best_i = None
    for start in range(0, gallery.shape[0], chunk):
        s = query @ gallery[start:start + chunk].t()
        kk = min(k, s.shape[1])
        cs, ci = s.topk(kk, dim=1)
        ci = ci + start
        if best_s is None:
            best_s, best_i = cs, ci
        else:
            both_s, both_i = torch.cat([best_s, cs], 1), torch.cat([best_i, ci], 1)
            best_s, order = both_s.topk(min(k, both_s.shape[1]), dim=1)
            best_i = both_i.gather(1, order)
    return best_s, best_i


def run_search(req: SearchRequest, console: Console | None = None) -> list[SearchHit]:
    """`nlmm search`: one query against the gallery of a run's best checkpoint."""
    if req.k <= 0:
        raise NlmmError(f"-k must be a positive number of results, got {req.k}.")
    target = req.checkpoint if req.checkpoint is not None else req.run
    searcher = Searcher(checkpoint_for(target), device=req.device, data=req.data, console=console)
    return searcher.query(text=req.text, image=req.image, audio=req.audio, target=req.target,
                          k=req.k, split=req.split, ttt=req.ttt)
