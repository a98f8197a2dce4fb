"""The evaluation's pictures, as PNG bytes: PR curves, mAP vs speed, training curves.

Matplotlib's object API (no pyplot state), so it runs in any thread of any process.
"""

from __future__ import annotations

import io
from typing import Sequence

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def _png(figure: Figure, crop: bool = True) -> bytes:
    """PNG bytes at 100 dpi: cropped to what is drawn, or (crop=False) the figure's size."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight" if crop else None)
    return buffer.getvalue()


def pr_curves_png(curves: dict[str, tuple[Sequence[float], Sequence[float]]]) -> bytes:
    """One precision-recall curve per trial at IoU 0.5: {trial: (recall, precision)}; an
    empty curve (nothing detected) is named in a note instead."""
    figure = Figure(figsize=(6.5, 4.5))
    axes = figure.add_subplot()
    for name, (recall, precision) in curves.items():
        if len(recall):
            axes.plot(recall, precision, label=name, linewidth=1.6)
    empty = [name for name, (recall, _) in curves.items() if not len(recall)]
    if empty:
        axes.text(0.5, 0.5, "nothing detected: " + ", ".join(empty), ha="center",
                  va="center", transform=axes.transAxes, fontsize=9, color="#a00")
    axes.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02),
             title="Precision-recall at IoU 0.5 (COCO's interpolated precision, all classes)")
    axes.title.set_fontsize(10)
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=8, loc="lower left")
    return _png(figure)


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Trials no other trial beats on both: at most its ms per image and at least its mAP,
    better on one. `points`: {trial: (ms per image, mAP)}; returned fastest first."""
    front = []
    for name, (ms, value) in points.items():
        dominated = any(other_ms <= ms and other_value >= value
                        and (other_ms < ms or other_value > value)
                        for other, (other_ms, other_value) in points.items() if other != name)
        if not dominated:
            front.append(name)
    return sorted(front, key=lambda n: (points[n][0], -points[n][1]))


def pareto_png(points: dict[str, tuple[float, float]]) -> bytes:
    """mAP against ms per image, one point per trial, the Pareto front drawn and named."""
    front = pareto_front(points)
    figure = Figure(figsize=(6.5, 4.5))
    axes = figure.add_subplot()
    for name, (ms, value) in points.items():
        on_front = name in front
        axes.scatter([ms], [value], s=50 if on_front else 30,
                     color="#d62728" if on_front else "#7f7f7f", zorder=3, clip_on=False)
        axes.annotate(name, (ms, value), textcoords="offset points", xytext=(6, 4),
                      fontsize=8, color="black" if on_front else "#7f7f7f")
    if len(front) > 1:
        axes.step([points[n][0] for n in front], [points[n][1] for n in front], where="post",
                  color="#d62728", linewidth=1.2, label="Pareto front")
        axes.legend(fontsize=8, loc="lower right")
    axes.set(xlabel="inference ms per image (lower is better)",
             ylabel="mAP@[.5:.95] (higher is better)", title="Accuracy vs speed")
    axes.title.set_fontsize(10)
    axes.grid(alpha=0.3)
    axes.margins(x=0.25, y=0.2)
    axes.set_ylim(bottom=max(0.0, axes.get_ylim()[0]))  # mAP is never negative
    return _png(figure)


def training_curves_png(curves: dict[str, dict[str, list]], title: str | None = None,
                        size: tuple[float, float] | None = None) -> bytes:
    """Every trial's test mAP and mean loss per epoch, overlaid: the one training-curves
    picture (the run's training_curves.png, the evaluation's curves.png).
    `curves`: {trial: {"epoch": [...], "map": [...], "loss": [...]}} (None where missing).
    `size`: inches at 100 dpi, exactly (else a tight crop of 11 x 4)."""
    figure = Figure(figsize=size or (11, 4))
    if title:
        figure.suptitle(title, fontsize=12)
    map_axes, loss_axes = figure.subplots(1, 2)
    for name, values in curves.items():
        epochs = values.get("epoch", [])
        for axes, key in ((map_axes, "map"), (loss_axes, "loss")):
            pairs = [(e, v) for e, v in zip(epochs, values.get(key, [])) if v is not None]
            if pairs:
                axes.plot(*zip(*pairs), marker="o", markersize=3, linewidth=1.4, label=name)
    map_axes.set(xlabel="epoch", ylabel="test mAP@[.5:.95]", title="Test mAP per epoch")
    loss_axes.set(xlabel="epoch", ylabel="mean training loss", title="Loss per epoch")
    # mAP lives in [0, 1]: from 0, with room above the best, also when every value is 0.
    best = max((v for values in curves.values() for v in values.get("map", []) if v is not None),
               default=0.0)
    map_axes.set_ylim(0.0, min(1.0, max(0.05, best * 1.15)))
    for axes in (map_axes, loss_axes):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.title.set_fontsize(10)
        axes.grid(alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize=8)
    if size is not None:
        figure.tight_layout()
    return _png(figure, crop=size is None)
