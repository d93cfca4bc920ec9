"""The search model the dashboard keeps loaded between queries."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nlmm.search.engine import Searcher


class SearcherCache:
    """Holds the last loaded Searcher, so only the first query of a checkpoint loads its model.

    A worker replaces best.pt / last.pt under the same name as it trains, so the held model is
    reused only while the file still holds the bytes it was loaded from (`checkpoint_key`).
    Used from worker threads; the lock keeps two queries from loading the same model twice.
    """

    def __init__(self) -> None:
        self._searcher: Searcher | None = None
        self._lock = threading.Lock()

    def get(self, checkpoint: Path | None, run: str | None) -> Searcher:
        """A Searcher for `checkpoint`, or for the best checkpoint of `run` when it is None."""
        from nlmm.inference.load import checkpoint_for
        from nlmm.search.engine import Searcher
        from nlmm.inference.weights_cache import checkpoint_key

        path = (checkpoint or checkpoint_for(run)).resolve()
        with self._lock:
            held = self._searcher
            if (held is None or held.loaded.checkpoint_path.resolve() != path
                    or held.loaded.source_key != checkpoint_key(path)):
                self._searcher = None  # let the old model go before loading the next one
                self._searcher = Searcher(path)
            return self._searcher
