"""Multi-scale RoIAlign as one weighted gather: torchvision's math, vectorised for the CPU.

torchvision's CPU `roi_align` walks RoIs, channels and samples one at a time in a single thread;
in a mit_b0 training step its backward alone took a quarter of the time. With `aligned=False`
and a fixed sampling ratio, every output cell is a fixed weighted sum of at most
(2 * ratio)^2 feature-map pixels: bilinear weights of ratio x ratio sample points, averaged.
Those pixel indices and weights are computed for all RoIs and levels at once, and
`embedding_bag(mode="sum")` gathers them from the levels stacked as channels-last rows, using
every core, vectorised over channels; autograd gives the backward as a scatter-add.
Outputs equal torchvision's within float rounding (tests/models/test_roi_pool.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.poolers import _filter_input, _setup_scales


def _axis_samples(start: Tensor, end: Tensor, size: Tensor, pooled: int,
                  ratio: int) -> tuple[Tensor, Tensor]:
    """Pixel indices and bilinear weights along one axis, as torchvision's kernel takes them.

    start/end: (N,) RoI bounds in feature-map units; size: (N,) the map's length on this axis.
    Returns (N, pooled, 2 * ratio) indices and weights (2 neighbours per sample point); a sample
    outside [-1, size] weighs 0, as in torchvision.
    """
    roi_length = torch.clamp(end - start, min=1.0)  # aligned=False: at least one cell
    bin_length = roi_length / pooled
    cells = torch.arange(pooled, dtype=start.dtype, device=start.device)
    offsets = torch.arange(ratio, dtype=start.dtype, device=start.device) + 0.5
    coords = (start[:, None, None] + cells[None, :, None] * bin_length[:, None, None]
              + offsets[None, None, :] * bin_length[:, None, None] / ratio)
    length = size[:, None, None].to(start.dtype)
    inside = (coords >= -1.0) & (coords <= length)
    coords = coords.clamp(min=0.0)
    low = coords.floor()
    at_edge = low >= length - 1
    low = torch.where(at_edge, length - 1, low)
    high = torch.where(at_edge, length - 1, low + 1)
    coords = torch.where(at_edge, low, coords)
    upper_weight = coords - low
    weights = torch.stack([1 - upper_weight, upper_weight], dim=-1) * inside[..., None]
    indices = torch.stack([low, high], dim=-1).long()
    return indices.flatten(2), weights.flatten(2)


def multiscale_roi_align(features: list[Tensor], boxes: list[Tensor], levels: Tensor,
                         scales: list[float], output_size: tuple[int, int],
                         sampling_ratio: int) -> Tensor:
    """(sum of RoIs, C, *output_size): RoIAlign (aligned=False) of each box on its level."""
    channels = features[0].shape[1]
    pooled_h, pooled_w = output_size
    rois = torch.cat(boxes)
    count = len(rois)
    if count == 0:
        return features[0].new_zeros((0, channels, pooled_h, pooled_w))
    device = rois.device
    image_index = torch.cat([torch.full((len(b),), i, dtype=torch.long, device=device)
                             for i, b in enumerate(boxes)])
    heights = torch.tensor([f.shape[2] for f in features], device=device)
    widths = torch.tensor([f.shape[3] for f in features], device=device)
    rows_per_level = torch.tensor([f.shape[0] * f.shape[2] * f.shape[3] for f in features],
                                  device=device)
    first_row = torch.cumsum(rows_per_level, 0) - rows_per_level
    scale = torch.tensor(scales, dtype=rois.dtype, device=device)[levels]
    height, width = heights[levels], widths[levels]
    y_index, y_weight = _axis_samples(rois[:, 1] * scale, rois[:, 3] * scale, height,
                                      pooled_h, sampling_ratio)
    x_index, x_weight = _axis_samples(rois[:, 0] * scale, rois[:, 2] * scale, width,
                                      pooled_w, sampling_ratio)
    # (N, ph, pw, taps_y, taps_x): row of each tap in the stacked table, and its weight.
    base = (first_row[levels] + image_index * height * width)[:, None, None, None, None]
    rows = (base + y_index[:, :, None, :, None] * width[:, None, None, None, None]
            + x_index[:, None, :, None, :])
    weights = (y_weight[:, :, None, :, None] * x_weight[:, None, :, None, :]
               / (sampling_ratio * sampling_ratio))
    taps = rows.shape[-1] * rows.shape[-2]
    table = torch.cat([f.permute(0, 2, 3, 1).reshape(-1, channels) for f in features])
    pooled = F.embedding_bag(rows.reshape(-1, taps), table,
                             per_sample_weights=weights.reshape(-1, taps).to(table.dtype),
                             mode="sum")
    return pooled.view(count, pooled_h, pooled_w, channels).permute(0, 3, 1, 2)


class VectorizedMultiScaleRoIAlign(MultiScaleRoIAlign):
    """torchvision's MultiScaleRoIAlign (same levels, scales and outputs), gathered at once on CPU.

    On CUDA, or with an adaptive sampling ratio (<= 0), torchvision's own kernels run.
    """

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor],
                image_shapes: list[tuple[int, int]]) -> Tensor:
        features = _filter_input(x, self.featmap_names)
        if features[0].is_cuda or self.sampling_ratio <= 0 or len(features) == 1:
            return super().forward(x, boxes, image_shapes)
        if self.scales is None or self.map_levels is None:
            # torchvision's own level set-up, so the level of each box is the reference's.
            self.scales, self.map_levels = _setup_scales(
                features, image_shapes, self.canonical_scale, self.canonical_level)
        levels = self.map_levels(boxes)
        return multiscale_roi_align(features, boxes, levels, self.scales, self.output_size,
                                    self.sampling_ratio)
