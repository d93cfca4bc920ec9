"""Cross-modal retrieval with a trained checkpoint and cached gallery indexes.

The gallery of a (checkpoint, split, modality) is embedded once into an `.npy` file under
`runs/<run>/index/`, named after the checkpoint's content hash and the data cache's key, so a
changed checkpoint or corpus builds a new one. The file is written under a temporary name and
renamed, so a search running beside a build never reads a half-written index; a file that does
not read back as the expected array is a cache miss and is rebuilt.

Queries take the exact top-k by inner product (embeddings are L2-normalised). A gallery that
fits in memory is held as a tensor on the model's device; a larger one is memory-mapped and
scanned in chunks, so its size is bounded by the disk, not the RAM. The optional `faiss`
backend (`pip install 'nlmm[faiss]'`) searches the same embeddings with `faiss.IndexFlatIP`.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from rich.console import Console
from rich.progress import Progress

from nlmm.config import MODALITIES
from nlmm.data.cache import PreparedCache
from nlmm.data.corpora.base import SPLITS
from nlmm.data.loader import iter_modality, modality_rows
from nlmm.inference.embed import autocast_for, embed_input, file_input, text_input
from nlmm.errors import NlmmError
from nlmm.inference.load import (LoadedModel, checkpoint_for, load_for_inference, require_cache,
                            training_pack)
from nlmm.paths import checkpoint_home, prune_least_recent, run_folder_of
from nlmm.inference.weights_cache import read_unreplaced
from nlmm.search.types import SearchHit, SearchRequest, SearchResults  # re-exported here

INDEX_VERSION = 2
BACKENDS = ("exact", "faiss")
GALLERY_SPLITS = (*SPLITS, "all")
ENCODE_BATCH = 256
TOP_K_CHUNK = 65536
# A gallery may take this share of the free memory of its device before it is streamed instead.
IN_MEMORY_FRACTION = 0.5
# Every new best.pt gets its own indexes; the least recently used ones beyond this are deleted.
KEEP_INDEX_FILES = 24


@dataclass
class GalleryIndex:
    rows: np.ndarray  # cache row of each item (image rows or caption rows)
    emb: torch.Tensor | np.ndarray  # (N, d) unit rows: a tensor in memory, or a memmap
    faiss_index: Any = None

    @property
    def streamed(self) -> bool:
        return isinstance(self.emb, np.ndarray)

    def search(self, query: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores and positions (1, k') of the best k' = min(k, N) items for one query."""
        k = min(k, len(self.rows))
        if self.faiss_index is not None:
            scores, idx = self.faiss_index.search(query.detach().float().cpu().numpy(), k)
            return torch.from_numpy(scores), torch.from_numpy(idx)
        return top_k(query, self.emb, k)


# ---------------------------------------------------------------------------------- checks

def checked_query(text: str | None, image: Path | None,
                  audio: Path | None) -> tuple[str, str | Path]:
    """The query's modality and value; NlmmError unless exactly one usable query is given."""
    given = [(m, v) for m, v in (("text", text), ("image", image), ("audio", audio))
             if v is not None]
    if len(given) != 1:
        raise NlmmError("give exactly one query: a text, --image FILE or --audio FILE.")
    modality, value = given[0]
    if modality == "text":
        if not str(value).strip():
            raise NlmmError("the text query is empty; type a few words to search for.")
        return modality, str(value)
    path = Path(value)
    if not path.is_file():
        raise NlmmError(f"query file {path} does not exist; check the path.")
    return modality, path


def check_options(target: str | None, k: int, split: str) -> None:
    if k <= 0:
        raise NlmmError(f"-k must be a positive number of results, got {k}.")
    if target is not None and target not in MODALITIES:
        raise NlmmError(f"cannot search in {target!r}; use one of {', '.join(MODALITIES)}.")
    if split not in GALLERY_SPLITS:
        raise NlmmError(f"unknown split {split!r}; use one of {', '.join(GALLERY_SPLITS)}.")


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise NlmmError(f"unknown search backend {backend!r}; use one of {', '.join(BACKENDS)}.")


def default_target(query_modality: str, modalities: tuple[str, ...] = MODALITIES) -> str:
    """Text and speech queries look for images (or, in a model without an image tower, for
    each other); image queries look for captions."""
    if query_modality == "image":
        return "text"
    if "image" in modalities:
        return "image"
    return "audio" if query_modality == "text" else "text"


def check_towers(modalities: tuple[str, ...], *wanted: str) -> None:
    """One sentence when the model lacks a tower the request needs."""
    for modality in wanted:
        if modality not in modalities:
            raise NlmmError(f"this model has no {modality} tower: it was trained on "
                            f"{' and '.join(modalities)} only, so it neither takes {modality} "
                            f"queries nor searches {modality}; use --in "
                            f"{' or --in '.join(modalities)}.")


# ---------------------------------------------------------------------------------- files

def index_dir_for(checkpoint: Path) -> Path:
    return checkpoint_home(Path(checkpoint).resolve()) / "index"


def read_index(path: Path, n_items: int, dim: int) -> np.ndarray | None:
    """The (n_items, dim) float32 embeddings memory-mapped from `path`; None when the file is
    missing, torn, foreign or of another shape (all of which mean: build it again)."""
    try:
        # copy-on-write: never written, but torch can wrap its chunks without copying them
        emb = np.load(path, mmap_mode="c", allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    if emb.dtype != np.float32 or emb.shape != (n_items, dim):
        return None
    return emb


def prune_indexes(folder: Path, keep: int = KEEP_INDEX_FILES) -> list[Path]:
    """Delete all but the `keep` most recently used index files of `folder`; returns the deleted."""
    return prune_least_recent(folder.glob("*.npy"), keep)


def _load_consistent(path: Path, device: str,
                     data: Path | None) -> tuple[LoadedModel, str | None]:
    """The model and the checkpoint key of the very bytes it was loaded from (the key its
    gallery indexes are filed under, as the weights cache files its copies)."""
    if not path.is_file():
        raise NlmmError(f"checkpoint {path} does not exist; list checkpoints with "
                        "`nlmm runs show RUN`.")
    return read_unreplaced(path, lambda: load_for_inference(path, device=device, data=data))


def _import_faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise NlmmError("the faiss backend needs faiss-cpu; install it with "
                        "`pip install 'nlmm[faiss]'` or search with --backend exact.") from None
    return faiss


# ---------------------------------------------------------------------------------- searcher

class Searcher:
    """A loaded model plus its gallery indexes; keeps both in memory across queries.

    `max_memory_bytes` caps the size of a gallery held in memory (default: half the free
    memory of the device); larger galleries are scanned from the memory-mapped index file.
    """

    def __init__(self, checkpoint: str | Path | None = None, device: str = "auto",
                 data: Path | None = None, console: Console | None = None,
                 backend: str = "exact", max_memory_bytes: int | None = None):
        check_backend(backend)
        self.faiss = _import_faiss() if backend == "faiss" else None
        self.console = console
        self.max_memory_bytes = max_memory_bytes
        self.loaded, self.checkpoint_key = _load_consistent(checkpoint_for(checkpoint), device,
                                                               data)
        self.index_dir = index_dir_for(self.loaded.checkpoint_path)
        self.indexes: dict[tuple[str, str], GalleryIndex] = {}
        self.builds = 0  # gallery encodings done by this searcher (tests check reuse)
        # a model that streamed its data searches its pack unless --data names a corpus
        pack = training_pack(self.loaded) if self.loaded.cache is None else None
        self.pack = None
        if pack is not None:
            from nlmm.search.pack import PackGallery

            self.pack = PackGallery(pack, self.index_dir, self.loaded.cfg.data,
                                    self.loaded.tokenizer)
            self._first_caption: dict[int, int] = {}
            return
        self.cache: PreparedCache = require_cache(self.loaded)
        # image row -> its first caption row (captions are stored grouped by image)
        images, first = np.unique(self.cache.caption_image(np.arange(self.cache.n_captions)),
                                  return_index=True)
        self._first_caption = dict(zip(images.tolist(), first.tolist()))

    # ------------------------------------------------------------------ gallery

    def index_path(self, split: str, modality: str) -> Path:
        data_key = self.pack.key if self.pack is not None else self.cache.key
        return self.index_dir / (f"{modality}-{split}-{self.checkpoint_key[:16]}-"
                                 f"{data_key}-v{INDEX_VERSION}.npy")

    def gallery_rows(self, split: str, modality: str) -> np.ndarray:
        """Cache rows of the gallery, in index order (for `all`: train, dev, test); for a
        pack, its dense group or caption indices."""
        if self.pack is not None:
            return self.pack.rows(split, modality)
        splits = SPLITS if split == "all" else (split,)
        return np.concatenate([modality_rows(self.cache, s, modality) for s in splits])

    def gallery(self, split: str, modality: str) -> GalleryIndex:
        """The gallery index, from memory, else from its file, else built (and filed)."""
        key = (split, modality)
        if key in self.indexes:
            return self.indexes[key]
        rows = self.gallery_rows(split, modality)
        if len(rows) == 0:
            raise NlmmError(f"the {split} split has no {modality} items to search; pick another "
                            "--split or --in.")
        path = self.index_path(split, modality)
        emb = read_index(path, len(rows), self.loaded.cfg.embed_dim)
        if emb is None:
            emb = self._build(path, split, modality, len(rows))
        else:
            with contextlib.suppress(OSError):
                os.utime(path)  # marks it recently used for prune_indexes
        self.indexes[key] = self._place(rows, emb)
        return self.indexes[key]

    def _memory_budget(self) -> int:
        if self.max_memory_bytes is not None:
            return self.max_memory_bytes
        device = self.loaded.device
        free = (torch.cuda.mem_get_info(device)[0] if device.type == "cuda"
                else psutil.virtual_memory().available)
        return int(IN_MEMORY_FRACTION * free)

    def _place(self, rows: np.ndarray, emb: np.ndarray) -> GalleryIndex:
        fits = emb.nbytes <= self._memory_budget()
        if self.faiss is not None:
            if not fits:
                raise NlmmError(f"the gallery ({emb.nbytes / 2**30:.1f} GiB) does not fit in "
                                "memory for the faiss backend; use --backend exact, which scans "
                                "it from disk.")
            index = self.faiss.IndexFlatIP(emb.shape[1])
            for start in range(0, len(emb), TOP_K_CHUNK):
                index.add(np.array(emb[start:start + TOP_K_CHUNK]))
            return GalleryIndex(rows, emb, index)
        if fits:
            # Held as a (d, N) row-major tensor, viewed as (N, d): the query's product with it
            # runs as a plain matrix product over contiguous rows, about 3x faster on CPU than
            # the transposed product over an (N, d) row-major gallery.
            by_dim = torch.from_numpy(np.array(emb)).to(self.loaded.device).T.contiguous()
            return GalleryIndex(rows, by_dim.T)
        return GalleryIndex(rows, emb)

    def _build(self, path: Path, split: str, modality: str, n_items: int) -> np.ndarray:
        """Embed the gallery straight into a temporary .npy, then rename it into place."""
        shape = (n_items, self.loaded.cfg.embed_dim)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
        except OSError as exc:
            if self.console is not None:
                self.console.print(f"[yellow]cannot save the index in {path.parent} ({exc}); "
                                   "it is kept in memory only[/]")
            return self._embed_into(np.empty(shape, dtype=np.float32), split, modality)
        try:
            self._embed_into(out, split, modality)
            out.flush()
            del out
            # mapped before the rename, so pruning by another search cannot take it from us
            emb = np.load(tmp, mmap_mode="c")
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        prune_indexes(path.parent)
        return emb

    def _embed_into(self, out: np.ndarray, split: str, modality: str) -> np.ndarray:
        model, device = self.loaded.model, self.loaded.device
        splits = SPLITS if split == "all" else (split,)
        filled = 0
        with Progress(console=self.console, transient=True, disable=self.console is None) as bar:
            task = bar.add_task(f"indexing {len(out)} {modality} items ({split})", total=len(out))
            if self.pack is not None:
                def encode(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
                    with torch.no_grad(), self._autocast():
                        return model.encode(modality, x.to(device),
                                            None if mask is None else mask.to(device))

                self.pack.embed_into(out, split, modality, encode,
                                     lambda n: bar.advance(task, n))
            else:
                for s in splits:
                    for x, mask, rows in iter_modality(self.cache, s, modality, ENCODE_BATCH,
                                                       device):
                        with torch.no_grad(), self._autocast():
                            emb = model.encode(modality, x, mask)
                        out[filled:filled + len(rows)] = emb.float().cpu().numpy()
                        filled += len(rows)
                        bar.advance(task, len(rows))
        self.builds += 1
        return out

    def _autocast(self) -> contextlib.AbstractContextManager:
        # Gallery and queries are embedded under the autocast the model was evaluated with.
        return autocast_for(self.loaded.cfg, self.loaded.device)

    # ------------------------------------------------------------------ queries

    def encode_query(self, text: str | None = None, image: Path | None = None,
                     audio: Path | None = None,
                     ttt: bool | None = None) -> tuple[str, torch.Tensor]:
        """(modality, (1, d) unit embedding) of one query, featurised like the training data.

        `ttt` adapts the model to the query first (test-time training); None: when the
        checkpoint's config has `ttt.enable`. Gallery items are always embedded plainly."""
        if ttt is None:
            ttt = self.loaded.cfg.ttt.enable
        modality, value = checked_query(text, image, audio)
        cfg, device, tokenizer = self.loaded.cfg, self.loaded.device, self.loaded.tokenizer
        if modality == "text":
            x, mask = text_input([str(value)], cfg, tokenizer, device)
        else:
            x, mask = file_input(modality, [Path(value)], cfg, device)
        return modality, embed_input(self.loaded.model, modality, x, mask, ttt=ttt,
                                     mask_id=tokenizer.mask_id)

    def query(self, text: str | None = None, image: Path | None = None, audio: Path | None = None,
              target: str | None = None, k: int = 5, split: str = "test",
              ttt: bool | None = None) -> list[SearchHit]:
        """The k best `target` items of `split` for one text, image-file or audio-file query;
        `ttt` as for `encode_query` (None: as the checkpoint's config says)."""
        check_options(target, k, split)
        towers = self.loaded.model.modalities
        modality = checked_query(text, image, audio)[0]
        target = target or default_target(modality, towers)
        check_towers(towers, modality, target)
        modality, q = self.encode_query(text, image, audio, ttt)
        index = self.gallery(split, target)
        scores, idx = index.search(q, k)
        return [self._hit(rank + 1, float(s), target, int(index.rows[int(i)]))
                for rank, (s, i) in enumerate(zip(scores[0].tolist(), idx[0].tolist()))]

    def _hit(self, rank: int, score: float, modality: str, row: int) -> SearchHit:
        if self.pack is not None:
            return self.pack.hit(rank, score, modality, row)
        cache = self.cache
        if modality == "image":
            name = cache.image_file(row)
            first = self._first_caption.get(row)
            return SearchHit(rank, score, modality, name,
                             None if first is None else cache.caption_text(first),
                             str(cache.image_path(row)), name)
        text = cache.caption_text(row)
        image = cache.image_file(int(cache.caption_image(row)))
        if modality == "text":
            return SearchHit(rank, score, modality, text, text, None, image)
        wav = cache.wav_path(row)
        return SearchHit(rank, score, modality, wav.name if wav else "?", text,
                         str(wav) if wav else None, image)

    def answer(self, req: SearchRequest) -> SearchResults:
        """The results of a request whose model, device, data and backend are this searcher's
        (run_search and `nlmm serve` build the searcher from them)."""
        query_modality = check_request(req)
        target = req.target or default_target(query_modality, self.loaded.model.modalities)
        hits = self.query(text=req.text, image=req.image, audio=req.audio, target=target,
                          k=req.k, split=req.split, ttt=req.ttt)
        step = self.loaded.payload.get("progress", {}).get("global_step")
        query = req.text if query_modality == "text" else Path(req.image or req.audio).name
        return SearchResults(hits, query, query_modality, target, req.split,
                             len(self.gallery(req.split, target).rows), req.k,
                             self.loaded.checkpoint_path, step, self.run_name())

    def run_name(self) -> str | None:
        """The run whose folder holds the checkpoint, if any."""
        folder = run_folder_of(self.loaded.checkpoint_path.resolve())
        return folder.name if folder is not None else None


def top_k(query: torch.Tensor, gallery: torch.Tensor | np.ndarray, k: int,
          chunk: int = TOP_K_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k by inner product of (q, d) queries against (N, d) gallery rows, scanned in
    chunks so memory stays bounded; a numpy (memory-mapped) gallery is read chunk by chunk."""
    best_s = best_i = None
    for start in range(0, gallery.shape[0], chunk):
        block = gallery[start:start + chunk]
        if isinstance(block, np.ndarray):
            block = torch.from_numpy(block if block.flags.writeable else np.array(block))
            block = block.to(query.device)
        s = query @ block.T
        cs, ci = s.topk(min(k, s.shape[1]), dim=1)
        ci = ci + start
        if best_s is None:
            best_s, best_i = cs, ci
        else:
            both_s, both_i = torch.cat([best_s, cs], 1), torch.cat([best_i, ci], 1)
            best_s, order = both_s.topk(min(k, both_s.shape[1]), dim=1)
            best_i = both_i.gather(1, order)
    return best_s, best_i


def check_request(req: SearchRequest) -> str:
    """The query's modality; NlmmError for a request that cannot be answered, raised before
    any model is loaded."""
    query_modality, _ = checked_query(req.text, req.image, req.audio)
    check_options(req.target, req.k, req.split)
    check_backend(req.backend)
    if req.run is not None and req.checkpoint is not None:
        raise NlmmError("give --run or --checkpoint, not both.")
    return query_modality


def run_search(req: SearchRequest, console: Console | None = None) -> SearchResults:
    """`nlmm search` in this process: one query against the gallery of a checkpoint (default:
    the best one of the latest finished run). The request is checked before any model is
    loaded."""
    check_request(req)
    searcher = Searcher(req.model, device=req.device, data=req.data, console=console,
                        backend=req.backend)
    return searcher.answer(req)
