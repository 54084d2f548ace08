"""Pre-norm ViT block split at the point where ToMe merges (after attention, before the MLP).

Parameter names follow timm's ViT block (norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1,
mlp.fc2, ls2.gamma), so DINOv2 weights and official checkpoints map onto it by name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerScale, Mlp
from torch import nn

from .blocks import Recomputable


class Attention(nn.Module):
    """Multi-head self-attention (fused SDPA) with an optional additive key bias.

    x [B, T, C], key_bias [B, T] or None -> (out [B, T, C], keys averaged over heads [B, T, C/H]).
    With key_bias = log(size) this is ToMe's proportional attention.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor | None = None):
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).view(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        mask = None if key_bias is None else key_bias[:, None, None, :].to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))
        return out, k.mean(dim=1)


class MixMlp(nn.Module):
    """fc1 -> depthwise 3x3 conv on the token grid -> GELU -> fc2 (the decoder's MLP).

    x [B, L, C] with L = h * w (a square grid) -> [B, L, C].
    """

    def __init__(self, in_features: int, hidden_features: int, **_):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.dwconv = nn.Conv2d(hidden_features, hidden_features, 3, padding=1, groups=hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        batch, tokens, channels = x.shape
        side = int(tokens**0.5)
        grid = x.transpose(1, 2).reshape(batch, channels, side, side)
        x = self.dwconv(grid).flatten(2).transpose(1, 2)
        return self.fc2(self.act(x))


class Block(Recomputable):
    """x + ls1(attn(norm1(x))), [merge], x + ls2(mlp(norm2(x))); LayerScale init 1e-5."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        init_values: float = 1e-5,
        drop_path: float = 0.0,
        mix_mlp: bool = False,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim, init_values=init_values)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = MixMlp(dim, hidden) if mix_mlp else Mlp(dim, hidden, act_layer=nn.GELU)
        self.ls2 = LayerScale(dim, init_values=init_values)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def attend(self, x: torch.Tensor, size: torch.Tensor | None = None):
        """x [B, T, C], size [B, T, 1] or None -> (x, key metric [B, T, C/H])."""
        bias = None if size is None else size[..., 0].log()
        out, metric = self.recompute(self.attn, self.norm1(x), bias)
        return x + self.drop_path(self.ls1(out)), metric

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.ls2(self.recompute(self._mlp, x)))

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm2(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.feed_forward(self.attend(x)[0])


def init_transformer_weights(module: nn.Module) -> None:
    """trunc-normal(0.02) Linear/Conv weights with zero bias (the official ViT init)."""
    for sub in module.modules():
        if isinstance(sub, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(sub.weight, std=0.02)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)


def drop_path_rates(drop_path: float, depth: int) -> list[float]:
    """Stochastic depth decreasing linearly from drop_path to 0 over the blocks (official order)."""
    if depth == 1:
        return [drop_path]
    return [drop_path * (1 - i / (depth - 1)) for i in range(depth)]
