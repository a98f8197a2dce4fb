"""The dual-stream MiT encoder of CrossAttentionDet, and the table of its five variants.

Two MiT streams that share no weights (RGB: 3 channels; X: thermal + event), rectified (FRM)
and fused (FFM) after each of four stages. Attribute names are SegFormer's for the RGB stream
and `extra_*` for the X stream, as in CMX, so pretrained MiT weights load by name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from crossdet_ray.models.fusion import FFM, FRM
from crossdet_ray.models.mit import Block, OverlapPatchEmbed, tokens_to_map

NUM_HEADS = (1, 2, 5, 8)
SR_RATIOS = (8, 4, 2, 1)
MLP_RATIO = 4.0
DROP_PATH_RATE = 0.1


@dataclass(frozen=True)
class MitVariant:
    depths: tuple[int, int, int, int]
    embed_dims: tuple[int, int, int, int]


MIT_VARIANTS: dict[str, MitVariant] = {
    "mit_b0": MitVariant(depths=(2, 2, 2, 2), embed_dims=(32, 64, 160, 256)),
    "mit_b1": MitVariant(depths=(2, 2, 2, 2), embed_dims=(64, 128, 320, 512)),
    "mit_b2": MitVariant(depths=(3, 4, 6, 3), embed_dims=(64, 128, 320, 512)),
    "mit_b4": MitVariant(depths=(3, 8, 27, 3), embed_dims=(64, 128, 320, 512)),
    "mit_b5": MitVariant(depths=(3, 6, 40, 3), embed_dims=(64, 128, 320, 512)),
}
BACKBONE_NAMES: tuple[str, ...] = tuple(MIT_VARIANTS)


def get_variant(name: str) -> MitVariant:
    if name not in MIT_VARIANTS:
        raise ValueError(f"unknown backbone '{name}'; choose one of {', '.join(BACKBONE_NAMES)}")
    return MIT_VARIANTS[name]


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

    def __init__(self, variant: MitVariant, in_chans_rgb: int = 3, in_chans_x: int = 2,
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
            for prefix, in_chans in (("", previous_rgb), ("extra_", previous_x)):
                setattr(self, f"{prefix}patch_embed{stage}",
                        OverlapPatchEmbed(in_chans, dim, patch, stride))
                setattr(self, f"{prefix}block{stage}", nn.ModuleList(
                    Block(dim, NUM_HEADS[stage - 1], MLP_RATIO, SR_RATIOS[stage - 1],
                          rates[first + i], fused_attention=fused_attention)
                    for i in range(depth)))
                setattr(self, f"{prefix}norm{stage}", nn.LayerNorm(dim, eps=1e-6))
            first += depth
        self.FRMs = nn.ModuleList(FRM(dim) for dim in variant.embed_dims)
        self.FFMs = nn.ModuleList(FFM(dim, heads) for dim, heads in
                                  zip(variant.embed_dims, NUM_HEADS))
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
    return DualStreamMiT(get_variant(name), in_chans_rgb, in_chans_x, fused_attention)
