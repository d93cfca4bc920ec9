"""A pack (nlmm.data.packed) as the training loop's data source, beside a PreparedCache.

`nlmm train --data DIR_OR_S3_URL` trains from a pack without a prepared cache: batches stream
through nlmm.data.stream (decode and augmentation in loader workers, one row per group per
epoch, per-rank batches), evaluation streams the split in chunks (`evaluate_packed`), and
`last.pt` carries the loader's state so a resume serves exactly the samples an uninterrupted
run would have.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nlmm.config import DataConfig
from nlmm.data.pack_index import MANIFEST, check_features, read_manifest, read_tokenizer
from nlmm.data.tokenizer import TextTokenizer
from nlmm.errors import NlmmError


def is_pack(data: str | Path | None) -> bool:
    """Whether `data` names a pack: an s3:// URL, or a folder holding nlmm_pack.json (or the
    progress folder of an unfinished pack, whose error then says so)."""
    if data is None:
        return False
    text = str(data)
    if "://" in text:
        return True
    return (Path(text) / MANIFEST).is_file() or (Path(text) / ".pack").is_dir()


class PackedSource:
    """What the trainer reads of a pack: its URL, identity, tokenizer, counts and modalities."""

    def __init__(self, url: str | Path) -> None:
        self.path = str(url)
        self.manifest: dict[str, Any] = read_manifest(self.path)
        self.key: str = str(self.manifest["fingerprint"])[:16]
        self.tokenizer: TextTokenizer = read_tokenizer(self.path)
        self.sources = [{"path": self.manifest.get("corpus", {}).get("root", self.path),
                         "format": self.manifest.get("corpus", {}).get("format", "pack")}]

    def modalities(self) -> tuple[str, ...]:
        present = self.manifest.get("modalities") or []
        present = present.split(",") if isinstance(present, str) else list(present)
        return tuple(m for m in ("image", "text", "audio") if m in present)

    def groups(self, split: str) -> int:
        return int(self.manifest["counts"].get(split, {}).get("groups", 0))

    def check_data(self, cfg: DataConfig) -> None:
        """Refuse, in one sentence, data settings other than those the pack's images and
        log-mels were made with."""
        check_features(self.manifest, cfg, self.path)

    def check_splits(self, splits: tuple[str, ...]) -> None:
        for split in splits:
            if self.groups(split) == 0:
                raise NlmmError(f"the {split} split of the pack in {self.path} has no groups; "
                                f"repack a corpus whose {split} split has rows.")
