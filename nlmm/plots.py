"""`nlmm plot`: the guide's results figure (loss curves and Recall@K per epoch) as a PNG."""

from __future__ import annotations

from pathlib import Path

from nlmm import store
from nlmm.errors import NlmmError

LOSSES = ("loss", "loss_i2t", "loss_i2a", "loss_t2a")
RECALLS = ("i2t_r1", "t2i_r1", "i2a_r1", "a2i_r1", "t2a_r1", "a2t_r1", "mean_r1")


def plot_runs(refs: list[str], out: Path, max_points: int = 2000) -> Path:
    """Losses (top row) and Recall@1 curves (bottom row) of one or several runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [store.get_run(r) for r in refs]
    fig, axes = plt.subplots(2, 2, figsize=(13, 8))
    plotted = 0
    for run in runs:
        tag = f"{run.name}: " if len(runs) > 1 else ""
        for key in LOSSES:
            series = store.metric_series(run.id, key, max_points=max_points)
            if series:
                ax = axes[0, 0] if key == "loss" else axes[0, 1]
                ax.plot([s for s, _ in series], [v for _, v in series], label=f"{tag}{key}")
                plotted += 1
        for key in RECALLS:
            series = store.metric_series(run.id, key, max_points=max_points)
            if series:
                ax = axes[1, 0] if key == "mean_r1" else axes[1, 1]
                ax.plot([s for s, _ in series], [v for _, v in series], marker="o",
                        label=f"{tag}{key}")
                plotted += 1
    if not plotted:
        plt.close(fig)
        raise NlmmError(f"no metrics recorded yet for {', '.join(refs)}; plot again once "
                        "training has logged a few steps.")
    titles = (("total loss", "per-pair contrastive loss"), ("mean Recall@1 (dev, %)",
                                                             "Recall@1 per direction (dev, %)"))
    for row in range(2):
        for col in range(2):
            ax = axes[row, col]
            ax.set_title(titles[row][col])
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
