"""Convolutional building blocks shared by the MergeVQ and Open-MAGVIT2 encoders and decoders.

Parameter names follow the taming/Open-MAGVIT2 layout (norm1, conv1, nin_shortcut, ...) so that
released checkpoints map onto these modules one to one.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class Recomputable(nn.Module):
    """A block whose activations can be recomputed in backward instead of stored (activation
    checkpointing): less memory for one more forward pass. Off until ``set_activation_checkpointing``."""

    activation_checkpointing = False

    def recompute(self, fn, *args):
        """fn(*args), checkpointed when enabled and gradients are being recorded (RNG state replayed)."""
        if self.activation_checkpointing and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)


def set_activation_checkpointing(model: nn.Module, enabled: bool = True) -> int:
    """Turn activation checkpointing of every ``Recomputable`` block of ``model`` on or off -> their number."""
    blocks = [m for m in model.modules() if isinstance(m, Recomputable)]
    for block in blocks:
        block.activation_checkpointing = enabled
    return len(blocks)


def group_norm(channels: int, eps: float = 1e-6, affine: bool = True) -> nn.GroupNorm:
    """GroupNorm with 32 groups, the normalisation used throughout both tokenizers."""
    return nn.GroupNorm(32, channels, eps=eps, affine=affine)


class ResBlock(Recomputable):
    """GN -> SiLU -> conv3x3 -> GN -> SiLU -> conv3x3 plus a (1x1) shortcut; convs without bias.

    x [B, c_in, H, W] -> [B, c_out, H, W]
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.act = nn.SiLU()
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        else:
            self.nin_shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.recompute(self._forward, x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        h = self.conv2(self.act(self.norm2(h)))
        return h + self.nin_shortcut(x)


def depth_to_space(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """DCR depth-to-space: [B, C*s*s, H, W] -> [B, C, H*s, W*s] (channel index = (i*s + j)*C + c)."""
    b, c, h, w = x.shape
    s = block_size
    x = x.view(b, s, s, c // (s * s), h, w)
    x = x.permute(0, 3, 4, 1, 5, 2)
    return x.reshape(b, c // (s * s), h * s, w * s)


class Upsampler(nn.Module):
    """conv3x3 C -> 4C, then depth-to-space x2: [B, C, H, W] -> [B, C, 2H, 2W]."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels * 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return depth_to_space(self.conv1(x), 2)


class AdaptiveGroupNorm(nn.Module):
    """MAGVIT-v2 AdaGN: GroupNorm without affine, then a scale and shift predicted from global
    statistics of the latent grid.

    x [B, C, H, W], z [B, Cz, h, w] -> [B, C, H, W]. scale = gamma(std_hw(z)), shift = beta(mean_hw(z)),
    std = sqrt(var + eps) with torch's default unbiased variance (as the official module computes it).
    """

    def __init__(self, z_channels: int, channels: int, eps: float = 1e-6):
        super().__init__()
        self.gn = group_norm(channels, eps=eps, affine=False)
        self.gamma = nn.Linear(z_channels, channels)
        self.beta = nn.Linear(z_channels, channels)
        self.eps = eps

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        flat = z.flatten(2)
        scale = self.gamma((flat.var(dim=-1) + self.eps).sqrt())[..., None, None]
        shift = self.beta(flat.mean(dim=-1))[..., None, None]
        return scale * self.gn(x) + shift
