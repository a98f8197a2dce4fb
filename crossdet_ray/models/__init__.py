"""The CrossAttentionDet network: MiT streams, FRM/FFM fusion, dual encoder, detector."""

from crossdet_ray.backbones import BACKBONE_NAMES, BACKBONE_REGISTRY, BackboneSpec, get_backbone
from crossdet_ray.models.detector import (
    CrossAttentionBackbone,
    build_detector,
    count_parameters,
    load_pretrained_mit,
)
from crossdet_ray.models.encoder import MIT_VARIANTS, DualStreamMiT, get_encoder

__all__ = [
    "BACKBONE_NAMES", "BACKBONE_REGISTRY", "MIT_VARIANTS", "BackboneSpec",
    "CrossAttentionBackbone", "DualStreamMiT", "build_detector", "count_parameters",
    "get_backbone", "get_encoder", "load_pretrained_mit",
]
