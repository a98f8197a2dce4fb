"""The dual-stream MiT encoder of CrossAttentionDet, built from the backbone registry.

Two MiT streams that share no weights (RGB: 3 channels; X: thermal + event), rectified (FRM)
and fused (FFM) after each of four stages. Attribute names are SegFormer's for the RGB stream
and `extra_*` for the X stream, as in CMX, so pretrained MiT weights load by name. The five
variants' depths, widths, heads and reduction ratios live in crossdet_ray/backbones.py.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from crossdet_ray.backbones import BACKBONE_NAMES, BACKBONE_REGISTRY, BackboneSpec, get_backbone
from crossdet_ray.models.fusion import FFM, FRM
from crossdet_ray.models.mit import Block, OverlapPatchEmbed, tokens_to_map

MLP_RATIO = 4.0
DROP_PATH_RATE = 0.1

# This module's names from before the registry, for the code and tests that import them.
MIT_VARIANTS = BACKBONE_REGISTRY
__all__ = ["BACKBONE_NAMES", "MIT_VARIANTS", "DualStreamMiT", "get_encoder"]


def _init_weights(module: nn.Module) -> None:
    """SegFormer's (and CMX's) initialisation, so training from scratch starts where theirs does."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
        fan_out //= module.groups
        nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class DualStreamMiT(nn.Module):
    """Two MiT streams (RGB, X) that meet after every stage: FRM rectifies, FFM fuses."""

    def __init__(self, variant: BackboneSpec, in_chans_rgb: int = 3, in_chans_x: int = 2,
                 fused_attention: bool = True):
        super().__init__()
        self.in_chans_rgb, self.in_chans_x = in_chans_rgb, in_chans_x
        self.activation_checkpointing = False  # set by build_detector; trades compute for memory
        self.embed_dims = variant.embed_dims
        self.depths = variant.depths
        # Stochastic depth rises linearly over all blocks of a stream.
        rates = torch.linspace(0, DROP_PATH_RATE, sum(variant.depths)).tolist()
        first = 0
        for stage, (depth, dim) in enumerate(zip(variant.depths, variant.embed_dims), start=1):
            previous_rgb = in_chans_rgb if stage == 1 else variant.embed_dims[stage - 2]
            previous_x = in_chans_x if stage == 1 else variant.embed_dims[stage - 2]
            patch, stride = (7, 4) if stage == 1 else (3, 2)
            heads, reduction = variant.num_heads[stage - 1], variant.sr_ratios[stage - 1]
            for prefix, in_chans in (("", previous_rgb), ("extra_", previous_x)):
                setattr(self, f"{prefix}patch_embed{stage}",
                        OverlapPatchEmbed(in_chans, dim, patch, stride))
                setattr(self, f"{prefix}block{stage}", nn.ModuleList(
                    Block(dim, heads, MLP_RATIO, reduction, rates[first + i],
                          fused_attention=fused_attention)
                    for i in range(depth)))
                setattr(self, f"{prefix}norm{stage}", nn.LayerNorm(dim, eps=1e-6))
            first += depth
        self.FRMs = nn.ModuleList(FRM(dim) for dim in variant.embed_dims)
        self.FFMs = nn.ModuleList(FFM(dim, heads) for dim, heads in
                                  zip(variant.embed_dims, variant.num_heads))
        self.apply(_init_weights)

    def _stream_stage(self, prefix: str, stage: int, x: torch.Tensor) -> torch.Tensor:
        tokens, height, width = getattr(self, f"{prefix}patch_embed{stage}")(x)
        for block in getattr(self, f"{prefix}block{stage}"):
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                # Keep only block inputs and recompute the inside in backward: mit_b4/b5 at
                # 800 px then fit where they did not. The RNG state is replayed, so drop-path
                # masks (and the gradients) are the same as without it.
                tokens = checkpoint(block, tokens, height, width, use_reentrant=False)
            else:
                tokens = block(tokens, height, width)
        return tokens_to_map(getattr(self, f"{prefix}norm{stage}")(tokens), height, width)

    def forward(self, rgb: torch.Tensor, x: torch.Tensor) -> list[torch.Tensor]:
        """Four fused maps, strides 4, 8, 16, 32."""
        fused = []
        for stage in range(1, 5):
            rgb = self._stream_stage("", stage, rgb)
            x = self._stream_stage("extra_", stage, x)
            rgb, x = self.FRMs[stage - 1](rgb, x)  # the rectified maps feed the next stage
            fused.append(self.FFMs[stage - 1](rgb, x))
        return fused

    def forward_5ch(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Same as `forward` on one stacked (B, rgb + x, H, W) tensor (RGB channels first)."""
        expected = self.in_chans_rgb + self.in_chans_x
        if images.ndim != 4 or images.shape[1] != expected:
            raise ValueError(f"expected frames of shape (B, {expected}, H, W) "
                             f"({self.in_chans_rgb} RGB + {self.in_chans_x} X channels), "
                             f"got {tuple(images.shape)}")
        return self(images[:, :self.in_chans_rgb], images[:, self.in_chans_rgb:])


def get_encoder(name: str, in_chans_rgb: int = 3, in_chans_x: int = 2,
                fused_attention: bool = True) -> DualStreamMiT:
    """The dual-stream encoder of a named variant; unknown names raise ValueError."""
    return DualStreamMiT(get_backbone(name), in_chans_rgb, in_chans_x, fused_attention)
