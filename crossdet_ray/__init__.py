"""crossdet_ray: train the CrossAttentionDet family of RGB-X detectors at once with Ray Tune.

Layers, top to bottom (each imports only those below it; nothing below `tune` imports Ray):
    cli -> tune (trials, resources, reporter, summary) -> engine (one backbone) -> models, data
"""

from crossdet_ray.config import BACKBONES, TrainConfig

__all__ = ["BACKBONES", "TrainConfig"]
__version__ = "0.1.0"
