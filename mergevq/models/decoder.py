"""MergeVQ decoder: transformer front (depthwise-conv position encoding, MixMlp blocks), then per level
AdaGN conditioned on the unmerged latent, ResBlocks and depth-to-space upsampling.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .blocks import AdaptiveGroupNorm, ResBlock, Upsampler, group_norm
from .transformer import Block, init_transformer_weights


class ConvPosTransformer(nn.Module):
    """x + DWConv3x3(x) once (conditional position encoding), then ViT blocks with MixMlp.

    x [B, C, h, w] -> [B, C, h, w].
    """

    def __init__(self, width: int, depth: int, num_heads: int):
        super().__init__()
        self.pos_embed = nn.Conv2d(width, width, 3, padding=1, groups=width)
        self.blocks = nn.ModuleList(Block(width, num_heads, mix_mlp=True) for _ in range(depth))
        init_transformer_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        x = (x + self.pos_embed(x)).flatten(2).transpose(1, 2)
        for block in self.blocks:
            x = block(x)
        return x.transpose(1, 2).reshape(batch, channels, height, width)


class MergeVQDecoder(nn.Module):
    """Unmerged latent grid [B, z, h, w] -> image [B, out_channels, h * 2^(n-1), w * 2^(n-1)].

    Level i (from n-1 down to 0) has num_res_blocks + num_res_extra ResBlocks, except level 0
    which has num_res_blocks.
    """

    def __init__(
        self,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        depth: int = 12,
        num_heads: int = 8,
        head_dim: int | None = None,
        z_channels: int = 18,
        num_res_extra: int = 1,
        out_channels: int = 3,
    ):
        super().__init__()
        width = ch * ch_mult[-1]
        if head_dim is not None:
            num_heads = max(width // head_dim, num_heads)
        self.conv_in = nn.Conv2d(z_channels, width, 3, padding=1)
        self.transformer = ConvPosTransformer(width, depth, num_heads)
        levels = len(ch_mult)
        self.adaptive = nn.ModuleList([None] * levels)
        self.up = nn.ModuleList([None] * levels)
        for level in reversed(range(levels)):
            self.adaptive[level] = AdaptiveGroupNorm(z_channels, width)
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(num_res_blocks + (num_res_extra if level > 0 else 0)):
                stage.block.append(ResBlock(width, ch * ch_mult[level]))
                width = ch * ch_mult[level]
            if level > 0:
                stage.upsample = Upsampler(width)
            self.up[level] = stage
        self.norm_out = group_norm(width)
        self.act_out = nn.SiLU()
        self.conv_out = nn.Conv2d(width, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.transformer(self.conv_in(z))
        for level in reversed(range(len(self.up))):
            x = self.adaptive[level](x, z)
            stage = self.up[level]
            for block in stage.block:
                x = block(x)
            if hasattr(stage, "upsample"):
                x = stage.upsample(x)
        return self.conv_out(self.act_out(self.norm_out(x)))
