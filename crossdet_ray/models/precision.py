"""bf16 where it is fast, float32 where it is geometry: the detector's parts for autocast.

Under `torch.autocast(dtype=torch.bfloat16)` the convs and matmuls of the encoder, FPN and heads
return bfloat16, and torchvision's detection code takes its box dtype from them: anchors follow
the feature maps, decoded boxes follow the deltas. bf16 keeps 8 bits of mantissa, so a
coordinate between 512 and 1024 px lands on a 4 px step, and proposals, RoIs, regression
targets and output boxes all inherit it.

The parts below draw the line at the heads' outputs: the RPN head and the box predictor still
run under autocast, then hand their scores and deltas on as float32; anchors are made in float32
whatever the feature dtype; the box coder encodes and decodes in float32 with autocast off.
Downstream geometry (top-k, sigmoid/softmax, clipping, NMS, IoU matching, RoI levels,
smooth-L1) is elementwise or reduction work that autocast leaves in its inputs' dtype, so float32
inputs keep it float32. Each part only widens half-precision tensors: float32 passes through
untouched, so outputs without autocast are bit-identical to torchvision's own parts. None adds
a parameter or a submodule: state-dict keys and shapes are torchvision's.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.rpn import RPNHead


def at_least_float32(tensor: Tensor) -> Tensor:
    """float16/bfloat16 widened to float32; float32 and float64 returned as they are."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


class Float32AnchorGenerator(AnchorGenerator):
    """AnchorGenerator whose anchors are at least float32, even over bf16 feature maps.

    torchvision casts its cell anchors to the feature maps' dtype in place, so one bf16 pass
    would also leave the rounded anchors behind for later float32 passes.
    """

    def set_cell_anchors(self, dtype: torch.dtype, device: torch.device) -> None:
        super().set_cell_anchors(torch.promote_types(dtype, torch.float32), device)


class Float32OutputRPNHead(RPNHead):
    """RPNHead (its convs under autocast as usual) returning float32 objectness and deltas."""

    def forward(self, x: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        objectness, deltas = super().forward(x)
        return ([at_least_float32(level) for level in objectness],
                [at_least_float32(level) for level in deltas])


class Float32OutputPredictor(FastRCNNPredictor):
    """FastRCNNPredictor (its linears under autocast) returning float32 class logits and deltas."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        class_logits, deltas = super().forward(x)
        return at_least_float32(class_logits), at_least_float32(deltas)


class Float32BoxCoder(BoxCoder):
    """BoxCoder that encodes and decodes in at least float32 with autocast off.

    torchvision's decode casts the boxes to the deltas' dtype, so bf16 deltas alone would round
    every proposal; widening both sides here keeps that from depending on the callers.
    """

    @classmethod
    def like(cls, coder: BoxCoder) -> Float32BoxCoder:
        return cls(coder.weights, coder.bbox_xform_clip)

    def encode(self, reference_boxes: list[Tensor], proposals: list[Tensor]) -> list[Tensor]:
        with torch.autocast(_device_type(reference_boxes), enabled=False):
            return super().encode([at_least_float32(boxes) for boxes in reference_boxes],
                                  [at_least_float32(boxes) for boxes in proposals])

    def decode(self, rel_codes: Tensor, boxes: list[Tensor]) -> Tensor:
        with torch.autocast(rel_codes.device.type, enabled=False):
            return super().decode(at_least_float32(rel_codes),
                                  [at_least_float32(per_image) for per_image in boxes])


def _device_type(tensors: list[Tensor]) -> str:
    return tensors[0].device.type if tensors else "cpu"
