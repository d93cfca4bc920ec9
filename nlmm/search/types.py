"""The request and results of one search: plain data, free of torch and numpy.

`nlmm.search.engine` answers them in-process; `nlmm serve` answers them for the `nlmm search` client,
which must build them without paying for importing torch (see nlmm.search.protocol).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


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
    ttt: bool | None = None  # None: as the checkpoint's config says (ttt.enable)
    device: str = "auto"
    backend: str = "exact"

    @property
    def model(self) -> str | Path | None:
        """What names the model: the checkpoint file, else the run (None: latest finished)."""
        return self.checkpoint if self.checkpoint is not None else self.run


@dataclass
class SearchHit:
    rank: int
    score: float
    modality: str
    item: str  # image file, caption text or wav file
    caption: str | None  # the caption; for audio what the speaker read, for an image its first
    path: str | None  # file on disk, when the item is a file
    image_id: str | None = None  # the image file the item shows or describes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SearchResults:
    """The hits of one `nlmm search` and what they were drawn from."""
    hits: list[SearchHit]
    query: str  # the text, or the name of the image or wav file
    query_modality: str
    target: str  # modality of the gallery
    split: str
    gallery_size: int
    k: int  # results asked for; more than `gallery_size` gives the whole gallery
    checkpoint: Path
    step: int | None  # optimizer step of the checkpoint
    run: str | None  # the run whose folder holds the checkpoint
