"""A frame's detections drawn on its three modalities: RGB | thermal | event, side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

PANELS = (("RGB", slice(0, 3), None), ("thermal", slice(3, 4), "inferno"),
          ("event", slice(4, 5), "gray"))


def draw_frame(frame: torch.Tensor, predicted: dict[str, torch.Tensor], path: str | Path,
               truth: dict[str, torch.Tensor] | None = None, title: str = "") -> Path:
    """Save a PNG of `frame` ((5, H, W) in [0, 1]) with `predicted` boxes (xyxy pixels) and
    their scores in red, and `truth`'s boxes, when given, dashed in green, on every panel."""
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    height, width = frame.shape[-2:]
    figure, axes = plt.subplots(1, 3, figsize=(3 * 4, 4 * height / width + 0.6), squeeze=False)
    pixels = frame.detach().float().clamp(0, 1).cpu()
    for axis, (name, channels, colour_map) in zip(axes[0], PANELS):
        panel = pixels[channels].permute(1, 2, 0).numpy()
        axis.imshow(panel if panel.shape[-1] == 3 else panel[..., 0], cmap=colour_map,
                    vmin=0, vmax=1)
        axis.set_title(name, fontsize=9)
        axis.axis("off")
        for box in _boxes(truth):
            axis.add_patch(Rectangle((box[0], box[1]), box[2] - box[0], box[3] - box[1],
                                     fill=False, edgecolor="lime", linewidth=1.2,
                                     linestyle="--"))
        scores = predicted.get("scores", torch.ones(len(_boxes(predicted)))).tolist()
        for box, score in zip(_boxes(predicted), scores):
            axis.add_patch(Rectangle((box[0], box[1]), box[2] - box[0], box[3] - box[1],
                                     fill=False, edgecolor="red", linewidth=1.2))
            axis.text(box[0], box[1], f"{score:.2f}", color="white", fontsize=7,
                      verticalalignment="bottom",
                      bbox={"facecolor": "red", "alpha": 0.7, "pad": 1, "linewidth": 0})
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp.png")
    figure.savefig(temporary, dpi=100)
    plt.close(figure)
    temporary.replace(path)
    return path


def _boxes(detections: dict[str, Any] | None) -> list[list[float]]:
    if not detections or "boxes" not in detections:
        return []
    return torch.as_tensor(detections["boxes"]).reshape(-1, 4).tolist()
