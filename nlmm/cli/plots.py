"""`nlmm plot`: the guide's results figure (loss curves and Recall@K per step) as a PNG.

Several runs stay readable side by side: each run keeps one colour in every panel, each loss
or direction keeps one line style (and marker) whatever the run, and the legends sit beside
the panels, never over the curves: the run legend above the figure, each panel's style legend
to its right. Three runs draw 18 curves in the direction panel; a legend of every curve inside
the axes would cover them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from nlmm import store
from nlmm.errors import NlmmError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Per panel: (title, {metric key: (legend label, line style, marker)}).
PANELS: tuple[tuple[str, dict[str, tuple[str, Any, str | None]]], ...] = (
    ("training loss", {"loss": ("total", "-", None),
                       "loss_ttt": ("TTT self-supervised (loss_ttt)", "--", None)}),
    ("contrastive loss per pair", {"loss_i2t": ("image–text", "-", None),
                                   "loss_i2a": ("image–audio", "--", None),
                                   "loss_t2a": ("text–audio", ":", None)}),
    ("mean Recall@1 (dev, %)", {"mean_r1": ("mean R@1", "-", "o")}),
    ("Recall@1 per direction (dev, %)", {"i2t_r1": ("image→text", "-", "o"),
                                         "t2i_r1": ("text→image", "--", "s"),
                                         "i2a_r1": ("image→audio", ":", "^"),
                                         "a2i_r1": ("audio→image", "-.", "v"),
                                         "t2a_r1": ("text→audio", (0, (5, 1)), "D"),
                                         "a2t_r1": ("audio→text", (0, (3, 1, 1, 1)), "x")}),
)


def run_colours(n: int) -> list[Any]:
    """`n` distinct colours: the 10 of tab10, else evenly spaced hues."""
    from matplotlib import colormaps

    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    return [colormaps["hsv"](i / n) for i in range(n)]


def build_figure(refs: list[str], max_points: int = 2000) -> Figure:
    """The 2 x 2 figure of losses (top) and Recall@1 (bottom) of the runs `refs`."""
    # a Figure of its own, not pyplot's: no global state, no GUI backend
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    runs = [store.get_run(r) for r in refs]
    colours = run_colours(len(runs))
    fig = Figure(figsize=(14, 8.5), layout="constrained")
    axes = fig.subplots(2, 2).ravel()
    plotted = 0
    for ax, (title, styles) in zip(axes, PANELS):
        shown: set[str] = set()
        for run, colour in zip(runs, colours):
            for key, (_, linestyle, marker) in styles.items():
                series = store.metric_series(run.id, key, max_points=max_points)
                if not series:
                    continue
                ax.plot([s for s, _ in series], [v for _, v in series], color=colour,
                        linestyle=linestyle, marker=marker, markersize=4,
                        label=f"{run.name} {key}")
                shown.add(key)
                plotted += 1
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(styles) > 1 and shown:
            handles = [Line2D([], [], color="0.3", linestyle=ls, marker=mk, label=label)
                       for key, (label, ls, mk) in styles.items() if key in shown]
            ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                      borderaxespad=0.0, fontsize=8)
    if not plotted:
        raise NlmmError(f"no metrics recorded yet for {', '.join(refs)}; plot again once "
                        "training has logged a few steps.")
    fig.legend(handles=[Line2D([], [], color=c, linewidth=3, label=run.name)
                        for run, c in zip(runs, colours)],
               loc="outside upper center", ncols=min(len(runs), 5), fontsize=9)
    return fig


def plot_runs(refs: list[str], out: Path, max_points: int = 2000) -> Path:
    """Write the figure of `build_figure` to the PNG file `out`."""
    fig = build_figure(refs, max_points)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out
