"""The detector: dual-stream encoder + FPN as a torchvision backbone, inside Faster R-CNN."""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from crossdet_ray.backbones import get_backbone
from crossdet_ray.models.encoder import DualStreamMiT, get_encoder
from crossdet_ray.models.precision import (
    Float32AnchorGenerator,
    Float32BoxCoder,
    Float32OutputPredictor,
    Float32OutputRPNHead,
)
from crossdet_ray.models.roi_pool import VectorizedMultiScaleRoIAlign

logger = logging.getLogger(__name__)

IMAGE_MEAN = (0.485, 0.456, 0.406, 0.5, 0.5)  # RGB: ImageNet's; thermal, event: centred
IMAGE_STD = (0.229, 0.224, 0.225, 0.5, 0.5)
ANCHOR_SIZES = ((32,), (64,), (128,), (256,), (512,))
FEATURE_NAMES = ["0", "1", "2", "3", "pool"]
ROI_OUTPUT_SIZE = 7


class CrossAttentionBackbone(nn.Module):
    """(B, 5, H, W) normalised frames -> FPN maps '0'..'3' and 'pool'.

    256 FPN channels are FasterRCNN's and the five real variants'; the registry's test variant
    narrows them (BackboneSpec.fpn_channels)."""

    def __init__(self, encoder: DualStreamMiT, fpn_out_channels: int = 256):
        super().__init__()
        self.encoder = encoder
        self.fpn = FeaturePyramidNetwork(list(encoder.embed_dims), fpn_out_channels,
                                         extra_blocks=LastLevelMaxPool())
        self.out_channels = fpn_out_channels

    def forward(self, images: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        fused = self.encoder.forward_5ch(images)
        return self.fpn(OrderedDict((str(i), feature) for i, feature in enumerate(fused)))


def build_detector(backbone: str, num_classes: int, pretrained: str | Path | None = None,
                   fused_attention: bool = True, activation_checkpointing: bool = False,
                   vectorized_roi_align: bool = True, **kwargs) -> FasterRCNN:
    """Faster R-CNN over the named backbone; `kwargs` reach FasterRCNN (min_size, ...).

    `num_classes` counts the background class; `pretrained` is a local SegFormer MiT file
    loaded into both streams (see `load_pretrained_mit`). `fused_attention` and
    `vectorized_roi_align` are speed switches with unchanged outputs; off, they give the plain
    eager network the performance benchmarks compare against.

    Under bf16 autocast only the encoder, FPN and heads run in bf16: anchors, proposals, RoI
    boxes, regression targets, box losses and output boxes stay float32 (models/precision.py).
    Without autocast the network is torchvision's, weight for weight and output for output.
    """
    spec = get_backbone(backbone)
    encoder = get_encoder(backbone, fused_attention=fused_attention)
    encoder.activation_checkpointing = activation_checkpointing
    if pretrained:
        load_pretrained_mit(encoder, pretrained)
    fpn_channels = spec.fpn_channels
    backbone_module = CrossAttentionBackbone(encoder, fpn_channels)
    anchors = Float32AnchorGenerator(sizes=ANCHOR_SIZES, aspect_ratios=((0.5, 1.0, 2.0),) * 5)
    roi_pool_type = VectorizedMultiScaleRoIAlign if vectorized_roi_align else MultiScaleRoIAlign
    roi_pool = roi_pool_type(featmap_names=FEATURE_NAMES, output_size=ROI_OUTPUT_SIZE,
                             sampling_ratio=2)
    # The heads FasterRCNN would make, in its order, so a seed still gives the same weights.
    rpn_head = Float32OutputRPNHead(fpn_channels, anchors.num_anchors_per_location()[0])
    box_head = TwoMLPHead(fpn_channels * ROI_OUTPUT_SIZE**2, spec.box_head_size)
    box_predictor = Float32OutputPredictor(spec.box_head_size, num_classes)
    kwargs.setdefault("image_mean", list(IMAGE_MEAN))
    kwargs.setdefault("image_std", list(IMAGE_STD))
    model = FasterRCNN(backbone_module, rpn_anchor_generator=anchors, rpn_head=rpn_head,
                       box_roi_pool=roi_pool, box_head=box_head, box_predictor=box_predictor,
                       **kwargs)
    # The box coders are plain attributes, not modules: swapping them leaves the state dict be.
    model.rpn.box_coder = Float32BoxCoder.like(model.rpn.box_coder)
    model.roi_heads.box_coder = Float32BoxCoder.like(model.roi_heads.box_coder)
    return model


def count_parameters(model: nn.Module) -> int:
    """All parameters, trainable or not (the figure the reference's guide quotes)."""
    return sum(p.numel() for p in model.parameters())


def load_pretrained_mit(encoder: DualStreamMiT, path: str | Path) -> dict[str, list[str]]:
    """Load SegFormer MiT ImageNet weights from a local file into both streams.

    The file holds one stream's names (`patch_embed1.proj.weight`, `block1.0.attn.q.weight`, ...),
    as a raw state dict or nested under 'state_dict' / 'model'; `head.*` is ignored. Each tensor
    goes to the RGB stream and to its `extra_` twin. The X stream's first conv has fewer input
    channels than the RGB kernel: it gets that kernel's mean over its input channels, repeated.
    Nothing is ever downloaded. Returns {'loaded', 'missing', 'ignored'} key lists.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"pretrained weights {path} do not exist; pass a local SegFormer MiT "
                         "file (e.g. mit_b2.pth)")
    try:
        weights = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"pretrained weights {path} cannot be read: {error}") from error
    for key in ("state_dict", "model"):
        if isinstance(weights, dict) and isinstance(weights.get(key), dict):
            weights = weights[key]
    if not isinstance(weights, dict):
        raise ValueError(f"pretrained weights {path} hold a {type(weights).__name__}, "
                         "not a state dict of MiT keys")
    own = encoder.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    for name, tensor in weights.items():
        name = name.removeprefix("module.")  # saved from DataParallel / DDP
        # Only one stream's MiT names count: the classifier head and our own fusion or X-stream
        # names (a file that is not SegFormer's) are left out.
        if (name.startswith(("head.", "extra_", "FRMs.", "FFMs."))
                or name not in own or not isinstance(tensor, torch.Tensor)):
            ignored.append(name)
            continue
        mapped[name] = tensor
        extra = f"extra_{name}"
        if extra in own:
            if name == "patch_embed1.proj.weight" and tensor.shape[1] != own[extra].shape[1]:
                in_x = own[extra].shape[1]
                tensor = tensor.mean(dim=1, keepdim=True).repeat(1, in_x, 1, 1)
            mapped[extra] = tensor
    if not mapped:
        raise ValueError(f"pretrained weights {path} hold no MiT keys (patch_embed1.proj.weight, "
                         "block1.0.attn.q.weight, ...); is it a SegFormer MiT checkpoint?")
    mismatched = [k for k, t in mapped.items() if t.shape != own[k].shape]
    if mismatched:
        raise ValueError(f"pretrained weights {path} do not fit this backbone: "
                         f"{', '.join(mismatched[:5])} differ in shape; pick the matching mit_bN")
    result = encoder.load_state_dict(mapped, strict=False)
    loaded = sorted(mapped)
    logger.info("loaded %d pretrained tensors from %s into both streams (%d encoder tensors "
                "left at init, %d file keys ignored)", len(loaded), path,
                len(result.missing_keys), len(ignored))
    return {"loaded": loaded, "missing": list(result.missing_keys), "ignored": ignored}
