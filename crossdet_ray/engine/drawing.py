"""Drawings of one frame: RGB | thermal | event panels with ground truth and predictions.

Matplotlib's object API with the Agg canvas (no pyplot state), so drawings can be made in
any thread or Ray worker.
"""

from __future__ import annotations

import io

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

TRUTH_COLOUR = "#00e000"
PREDICTION_COLOUR = "#ff2020"
PANELS = (("RGB", None), ("thermal", "inferno"), ("event", "gray"))
MAX_DRAWN = 20  # predictions drawn per frame, highest scores first: more hide the frame
HEADER_INCHES = 0.6  # the title and the panel names


def frame_panels(frame: np.ndarray) -> list[np.ndarray]:
    """(5, H, W) or (H, W, 5) pixels in [0, 1] -> [RGB (H, W, 3), thermal (H, W), event (H, W)]."""
    frame = np.asarray(frame, dtype=np.float32)
    if frame.shape[0] == 5 and frame.shape[-1] != 5:
        frame = frame.transpose(1, 2, 0)
    frame = np.clip(frame, 0.0, 1.0)
    return [frame[..., :3], frame[..., 3], frame[..., 4]]


def draw_detections(frame: np.ndarray, truth: dict, predicted: dict, title: str = "",
                    score_threshold: float = 0.5, dpi: int = 100) -> bytes:
    """PNG bytes: the frame's three panels side by side, ground truth in green, predictions
    scoring at least `score_threshold` in red with their score (and class when there are
    several); at most MAX_DRAWN predictions, the highest scoring."""
    panels = frame_panels(frame)
    height, width = panels[1].shape
    # Each panel at least 260 px wide so the score labels stay readable on tiny frames, and
    # at most 640 px so a report of full-size frames stays light.
    scale = min(max(1.0, 260.0 / width), 640.0 / width)
    figure_height = height * scale / dpi + HEADER_INCHES
    figure = Figure(figsize=(3 * width * scale / dpi, figure_height), dpi=dpi)
    truth_labels = np.asarray(truth.get("labels", [])).reshape(-1)
    predicted_labels = np.asarray(predicted.get("labels", [])).reshape(-1)
    several_classes = len(set(truth_labels.tolist()) | set(predicted_labels.tolist())) > 1
    scores = np.asarray(predicted.get("scores", [])).reshape(-1)
    above = np.flatnonzero(scores >= score_threshold)
    shown = above[np.argsort(-scores[above], kind="stable")][:MAX_DRAWN]
    for position, ((name, colour_map), pixels) in enumerate(zip(PANELS, panels)):
        axes = figure.add_axes((position / 3, 0, 1 / 3, 1 - HEADER_INCHES / figure_height))
        axes.imshow(pixels, cmap=colour_map, vmin=0.0, vmax=1.0, interpolation="nearest")
        axes.set_axis_off()
        axes.set_title(name, fontsize=9, pad=2)
        for box, label in zip(np.asarray(truth.get("boxes", [])).reshape(-1, 4), truth_labels):
            axes.add_patch(_rectangle(box, TRUTH_COLOUR, "-"))
        for box, label, score in zip(np.asarray(predicted.get("boxes", [])).reshape(-1, 4)[shown],
                                     predicted_labels[shown], scores[shown]):
            axes.add_patch(_rectangle(box, PREDICTION_COLOUR, "--"))
            text = f"{label - 1}: {score:.2f}" if several_classes else f"{score:.2f}"
            axes.text(box[0], box[1], text, color="white", fontsize=7, va="bottom",
                      clip_on=True,
                      bbox={"facecolor": PREDICTION_COLOUR, "pad": 1, "linewidth": 0})
    drawn = f"the {MAX_DRAWN} highest of {len(above)}" if len(above) > MAX_DRAWN else "all"
    figure.text(0.5, 1 - 0.05 / figure_height, title, fontsize=8, ha="center", va="top")
    figure.text(0.5, 1 - 0.22 / figure_height,
                f"green: ground truth; red dashed: predictions with score >= "
                f"{score_threshold:g} ({drawn})", fontsize=7, ha="center", va="top",
                color="#444")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def _rectangle(box, colour: str, style: str) -> Rectangle:
    x1, y1, x2, y2 = (float(v) for v in box)
    return Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, linewidth=1.5,
                     linestyle=style)
