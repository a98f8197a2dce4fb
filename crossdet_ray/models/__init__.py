"""The CrossAttentionDet network: MiT streams, FRM/FFM fusion, dual encoder, detector."""

from crossdet_ray.models.detector import (
    CrossAttentionBackbone,
    build_detector,
    count_parameters,
    load_pretrained_mit,
)
from crossdet_ray.models.encoder import BACKBONE_NAMES, MIT_VARIANTS, DualStreamMiT, get_encoder

__all__ = [
    "BACKBONE_NAMES", "MIT_VARIANTS", "CrossAttentionBackbone", "DualStreamMiT",
    "build_detector", "count_parameters", "get_encoder", "load_pretrained_mit",
]
