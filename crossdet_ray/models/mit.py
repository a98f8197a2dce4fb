"""One stream of SegFormer's Mix Transformer (MiT): patch embedding, attention, Mix-FFN, block.

Module and parameter names follow SegFormer's, so ImageNet MiT weights and CrossAttentionDet
checkpoints load by name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DropPath(nn.Module):
    """Stochastic depth: drop a sample's whole residual branch with probability `drop_prob`."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


def tokens_to_map(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, N, C) tokens -> (B, C, H, W) map."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], height, width)


class OverlapPatchEmbed(nn.Module):
    """Overlapping strided conv, then LayerNorm over the tokens."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int, stride: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride,
                              padding=patch_size // 2)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.proj(x)
        height, width = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), height, width


def head_dim(dim: int, num_heads: int) -> int:
    """Channels per attention head; the channels must split evenly over the heads."""
    if dim % num_heads:
        raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
    return dim // num_heads


class Attention(nn.Module):
    """Efficient self-attention: keys and values from a spatially reduced map (ratio r)."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, qkv_bias: bool = True,
                 fused_attention: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim(dim, num_heads)
        self.scale = self.head_dim ** -0.5
        # False keeps the eager softmax(q k^T * scale) v reachable for benchmarks and tests.
        self.fused_attention = fused_attention
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        batch, tokens, channels = x.shape
        q = self.q(x).reshape(batch, tokens, self.num_heads, self.head_dim).transpose(1, 2)
        if self.sr_ratio > 1:
            reduced = self.sr(tokens_to_map(x, height, width)).flatten(2).transpose(1, 2)
            x = self.norm(reduced)
        k, v = (self.kv(x).reshape(batch, -1, 2, self.num_heads, self.head_dim)
                .permute(2, 0, 3, 1, 4).unbind(0))
        if self.fused_attention:  # same math, in a fused kernel where the device has one
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            attn = (q @ k.transpose(-2, -1)) * self.scale
            out = attn.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, channels))


class DWConv(nn.Module):
    """Depthwise 3x3 conv on the token map: Mix-FFN's positional information."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=3, stride=1, padding=1, groups=dim)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return self.dwconv(tokens_to_map(x, height, width)).flatten(2).transpose(1, 2)


class MixFFN(nn.Module):
    """Linear -> depthwise conv -> GELU -> Linear."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.dwconv = DWConv(hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x), height, width)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + ffn(LN(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, sr_ratio: int,
                 drop_path: float, fused_attention: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, sr_ratio, fused_attention=fused_attention)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MixFFN(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), height, width))
        return x + self.drop_path(self.mlp(self.norm2(x), height, width))
