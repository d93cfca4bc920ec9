"""Which stored sample every row of every batch of a streamed epoch is: the order of
nlmm.data.stream, a pure function of the pack's chunk sizes, the seed, the epoch and the global
batch, never of the number of ranks or loader workers.

Training (EpochOrder). The epoch's stream is the split's chunks in an order shuffled by
(seed, epoch), each chunk's samples in an order shuffled by (seed, epoch, chunk); a pack's
chunks are already random samples of the corpus (nlmm.data.pack_plan cuts blocks in hash
order). The first steps x B samples of the stream make the epoch (B the global batch, steps =
min(samples, samples_per_epoch) // B), cut into B lanes of `steps` consecutive samples: row l
of global step k is sample l * steps + k. A rank of W takes lanes [r B/W, (r+1) B/W): its rows of
every step, and so a contiguous 1/W of the stream, its own chunks. The global batch of a step
is the same for any W (its rows, rank after rank), so a run stopped after k steps resumes on
any number of ranks and workers from k alone; each lane reads its chunk front to back, and a
batch draws on B places of the epoch's stream.

Evaluation (SplitOrder): every sample once in pack order, `batch` at a time.

Shuffles and augmentation draws come from splitmix64 over (salt, index): the same on every
machine and numpy version, and vectorised.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def mix(*values: int) -> int:
    """A stable 63-bit hash of integers (Python's hash() is salted per process)."""
    digest = hashlib.blake2b(np.asarray(values, dtype=np.int64).tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _splitmix(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x + _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def keys(salt: int, index: np.ndarray) -> np.ndarray:
    """uint64 pseudo-random keys of `index` under `salt`."""
    with np.errstate(over="ignore"):
        base = _splitmix(np.array([salt], dtype=np.uint64))
        return _splitmix(np.asarray(index, dtype=np.uint64) * _GOLDEN + base)


def permutation(salt: int, n: int) -> np.ndarray:
    """A permutation of range(n) fixed by `salt`."""
    return np.argsort(keys(salt, np.arange(n)), kind="stable")


def uniforms(salt: int, index: np.ndarray, draws: int) -> np.ndarray:
    """(draws, len(index)) float64 in [0, 1): per index its own `draws` numbers, whatever else
    is drawn beside it."""
    index = np.asarray(index, dtype=np.uint64)
    grid = index[None, :] * np.uint64(draws) + np.arange(draws, dtype=np.uint64)[:, None]
    return (keys(salt, grid.ravel()) >> np.uint64(11)).reshape(grid.shape) * 2.0**-53


class EpochOrder:
    """The training order of one epoch (module docstring)."""

    PERMS_KEPT = 256  # chunk permutations a process keeps (a lane needs one at a time)

    def __init__(self, sizes: list[int], *, seed: int, epoch: int, global_batch: int,
                 samples_per_epoch: int | None = None) -> None:
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.seed, self.epoch, self.batch = seed, epoch, global_batch
        self.chunks = permutation(mix(seed, epoch, -1), len(sizes))
        self.starts = np.concatenate([[0], np.cumsum(self.sizes[self.chunks])])
        total = int(self.sizes.sum())
        self.steps = min(total, samples_per_epoch or total) // global_batch
        self._perms: OrderedDict[int, np.ndarray] = OrderedDict()

    def _perm(self, chunk: int) -> np.ndarray:
        if chunk not in self._perms:
            self._perms[chunk] = permutation(mix(self.seed, self.epoch, chunk),
                                             int(self.sizes[chunk]))
            if len(self._perms) > self.PERMS_KEPT:
                self._perms.popitem(last=False)
        self._perms.move_to_end(chunk)
        return self._perms[chunk]

    def lanes(self, rank: int, world_size: int) -> range:
        share = self.batch // world_size
        return range(rank * share, (rank + 1) * share)

    def rows(self, step: int, lanes: range) -> list[tuple[int, int]]:
        """(chunk, item) of the lanes' rows of global step `step`, in lane order."""
        positions = np.arange(lanes.start, lanes.stop, dtype=np.int64) * self.steps + step
        slots = np.searchsorted(self.starts, positions, side="right") - 1
        return [(int(self.chunks[s]), int(self._perm(int(self.chunks[s]))[p - self.starts[s]]))
                for s, p in zip(slots, positions, strict=True)]

    def spans(self, lanes: range) -> dict[int, tuple[int, int]]:
        """For every chunk the lanes read: the first and last step that reads from it."""
        out: dict[int, tuple[int, int]] = {}
        for lane in lanes:
            begin, end = lane * self.steps, (lane + 1) * self.steps  # the lane's stream part
            first = np.searchsorted(self.starts, begin, side="right") - 1
            last = np.searchsorted(self.starts, end - 1, side="right") - 1
            for slot in range(first, last + 1):
                lo = max(begin, int(self.starts[slot])) - begin
                hi = min(end, int(self.starts[slot + 1])) - 1 - begin
                chunk = int(self.chunks[slot])
                a, b = out.get(chunk, (lo, hi))
                out[chunk] = (min(a, lo), max(b, hi))
        return out


class SplitOrder:
    """Every sample of a split once, in pack order, `batch` samples per step."""

    def __init__(self, sizes: list[int], batch: int) -> None:
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)])
        self.batch = batch
        self.steps = -(-int(self.starts[-1]) // batch)

    def rows(self, step: int) -> list[tuple[int, int]]:
        positions = np.arange(step * self.batch, min((step + 1) * self.batch, self.starts[-1]))
        chunks = np.searchsorted(self.starts, positions, side="right") - 1
        return [(int(c), int(p - self.starts[c])) for c, p in zip(chunks, positions, strict=True)]

    def spans(self) -> dict[int, tuple[int, int]]:
        return {c: (int(self.starts[c]) // self.batch, (int(self.starts[c + 1]) - 1) // self.batch)
                for c in range(len(self.sizes)) if self.sizes[c]}
