"""2D rotary position embedding (RoPE) of the raster grid, shared by the generators (LlamaGen layout)."""

from __future__ import annotations

import torch
from torch import Tensor


def rope_2d(
    grid: tuple[int, int], head_dim: int, base: float = 10000.0, prefix: int = 1, zero_prefix: bool = True
) -> Tensor:
    """(cos, sin) table [prefix + h * w, head_dim // 2, 2] for 2D RoPE.

    Raster position l = (r, c) rotates pair i < n by r * f_i and pair n + i by c * f_i, with
    n = head_dim // 4 and f_i = base^(-i / n). Prefix rows are (0, 0) if zero_prefix else (1, 0).
    """
    h, w = grid
    n = head_dim // 4
    freqs = base ** (-torch.arange(n, dtype=torch.float64) / n)
    rows = torch.arange(h, dtype=torch.float64).repeat_interleave(w)
    cols = torch.arange(w, dtype=torch.float64).repeat(h)
    angles = torch.cat([rows[:, None] * freqs, cols[:, None] * freqs], dim=-1)  # [L, head_dim // 2]
    table = torch.stack([angles.cos(), angles.sin()], dim=-1)
    pre = torch.zeros(prefix, 2 * n, 2, dtype=torch.float64)
    if not zero_prefix:
        pre[..., 0] = 1.0
    return torch.cat([pre, table]).float()


def apply_rope(x: Tensor, rope: Tensor) -> Tensor:
    """x [B, T, H, Dh], rope [T, Dh/2, 2] (or [B, T, Dh/2, 2], one table per row: RandAR's random
    orders) -> x with pair (x_2i, x_2i+1) rotated by rope[t, i]."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    xp = x.to(dtype).unflatten(-1, (-1, 2))
    rows = rope[:, :, None] if rope.dim() == 4 else rope[None, :, None]
    cos, sin = (rows[..., i].to(dtype) for i in (0, 1))
    out = torch.stack([xp[..., 0] * cos - xp[..., 1] * sin, xp[..., 1] * cos + xp[..., 0] * sin], dim=-1)
    return out.flatten(-2).to(x.dtype)
