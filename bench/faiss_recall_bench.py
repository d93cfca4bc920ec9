"""The exact scorer (nlmm.eval.recall.recall_at_k) against faiss (nlmm.eval.faiss_recall)
on random galleries: seconds for the same Recall@K, interleaved, 3 times each.

    .venv/bin/python bench/faiss_recall_bench.py 20000 100000     # gallery sizes
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nlmm.eval.faiss_recall import faiss_recall_at_k  # noqa: E402
from nlmm.eval.recall import recall_at_k  # noqa: E402

QUERIES, DIM, POSITIVES = 2000, 256, 5


def main() -> None:
    torch.manual_seed(0)
    for n in [int(x) for x in sys.argv[1:] or ["20000", "100000"]]:
        gallery = torch.nn.functional.normalize(torch.randn(n, DIM), dim=1)
        gallery_owner = torch.arange(n) // POSITIVES
        owner = torch.randint(0, n // POSITIVES, (QUERIES,))
        query = torch.nn.functional.normalize(gallery[owner * POSITIVES]
                                              + 0.5 * torch.randn(QUERIES, DIM), dim=1)
        exact, fast, same = [], [], True
        for _ in range(3):
            start = time.perf_counter()
            a = recall_at_k(query, gallery, owner, gallery_owner)
            exact.append(time.perf_counter() - start)
            start = time.perf_counter()
            b = faiss_recall_at_k(query, gallery, owner, gallery_owner)
            fast.append(time.perf_counter() - start)
            same = same and a == b
        print(f"gallery {n}: exact median {statistics.median(exact):.2f} s, faiss median "
              f"{statistics.median(fast):.2f} s, same figures: {same}", flush=True)


if __name__ == "__main__":
    main()
