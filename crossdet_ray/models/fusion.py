"""The cross-modal parts: FRM rectifies each stream with the other, FFM fuses the two.

Names follow CMX (RGB-X segmentation), whose modules CrossAttentionDet uses; the math is
`../shared/reference/FACTS.md`'s.
"""

from __future__ import annotations

import torch
from torch import nn

from crossdet_ray.models.mit import head_dim


class ChannelWeights(nn.Module):
    """Per-channel gates for both streams from their pooled statistics."""

    def __init__(self, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim * 4, dim * 4), nn.ReLU(inplace=True),
                                 nn.Linear(dim * 4, dim * 2), nn.Sigmoid())

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        batch, channels = x1.shape[:2]
        both = torch.cat((x1, x2), dim=1)
        pooled = torch.cat((both.mean(dim=(2, 3)), both.amax(dim=(2, 3))), dim=1)  # (B, 4C)
        weights = self.mlp(pooled).reshape(batch, 2, channels, 1, 1)
        return weights.permute(1, 0, 2, 3, 4)  # [0]: first C gates, [1]: second C gates


class SpatialWeights(nn.Module):
    """Per-pixel gates for both streams from 1x1 convs over their concatenation."""

    def __init__(self, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Conv2d(dim * 2, dim, kernel_size=1), nn.ReLU(inplace=True),
                                 nn.Conv2d(dim, 2, kernel_size=1), nn.Sigmoid())

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x1.shape
        weights = self.mlp(torch.cat((x1, x2), dim=1)).reshape(batch, 2, 1, height, width)
        return weights.permute(1, 0, 2, 3, 4)


class FRM(nn.Module):
    """Feature Rectify Module: each stream adds the other, gated by channel and by pixel."""

    def __init__(self, dim: int, lambda_c: float = 0.5, lambda_s: float = 0.5):
        super().__init__()
        self.lambda_c, self.lambda_s = lambda_c, lambda_s
        self.channel_weights = ChannelWeights(dim)
        self.spatial_weights = SpatialWeights(dim)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        wc = self.channel_weights(x1, x2)
        ws = self.spatial_weights(x1, x2)
        out1 = x1 + self.lambda_c * wc[1] * x2 + self.lambda_s * ws[1] * x2
        out2 = x2 + self.lambda_c * wc[0] * x1 + self.lambda_s * ws[0] * x1
        return out1, out2


class CrossAttention(nn.Module):
    """Efficient cross attention: each stream's queries read the other's d x d context."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim(dim, num_heads)
        self.scale = self.head_dim ** -0.5
        self.kv1 = nn.Linear(dim, dim * 2, bias=False)
        self.kv2 = nn.Linear(dim, dim * 2, bias=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        return x.reshape(batch, tokens, self.num_heads, self.head_dim).transpose(1, 2)

    def _context(self, kv: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        k, v = (kv(x).reshape(batch, tokens, 2, self.num_heads, self.head_dim)
                .permute(2, 0, 3, 1, 4).unbind(0))
        # softmax over k's channel index (dim -2), as in the reference
        return ((k.transpose(-2, -1) @ v) * self.scale).softmax(dim=-2)  # (B, h, d, d)

    def forward(self, u1: torch.Tensor, u2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, tokens, channels = u1.shape
        context1, context2 = self._context(self.kv1, u1), self._context(self.kv2, u2)
        v1 = (self._heads(u1) @ context2).transpose(1, 2).reshape(batch, tokens, channels)
        v2 = (self._heads(u2) @ context1).transpose(1, 2).reshape(batch, tokens, channels)
        return v1, v2


class CrossPath(nn.Module):
    """Split each stream into a kept part y and a query part u; u attends across streams."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.channel_proj1 = nn.Linear(dim, dim * 2)
        self.channel_proj2 = nn.Linear(dim, dim * 2)
        self.act1 = nn.ReLU(inplace=True)
        self.act2 = nn.ReLU(inplace=True)
        self.cross_attn = CrossAttention(dim, num_heads)
        self.end_proj1 = nn.Linear(dim * 2, dim)
        self.end_proj2 = nn.Linear(dim * 2, dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y1, u1 = self.act1(self.channel_proj1(x1)).chunk(2, dim=-1)
        y2, u2 = self.act2(self.channel_proj2(x2)).chunk(2, dim=-1)
        v1, v2 = self.cross_attn(u1, u2)
        out1 = self.norm1(x1 + self.end_proj1(torch.cat((y1, v1), dim=-1)))
        out2 = self.norm2(x2 + self.end_proj2(torch.cat((y2, v2), dim=-1)))
        return out1, out2


class ChannelEmbed(nn.Module):
    """Merge the two streams' 2C channels back to C: a 1x1 residual plus a conv branch."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.residual = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.channel_embed = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=1),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, groups=out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, kernel_size=1),
            nn.BatchNorm2d(out_channels),
        )
        self.norm = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.residual(x) + self.channel_embed(x))


class FFM(nn.Module):
    """Feature Fusion Module: cross attention between the streams, then a channel merge."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.cross = CrossPath(dim, num_heads)
        self.channel_emb = ChannelEmbed(dim * 2, dim)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x1.shape
        t1, t2 = self.cross(x1.flatten(2).transpose(1, 2), x2.flatten(2).transpose(1, 2))
        merged = torch.cat((t1, t2), dim=-1).transpose(1, 2).reshape(batch, 2 * channels,
                                                                     height, width)
        return self.channel_emb(merged)
