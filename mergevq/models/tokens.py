"""The token record every tokenizer returns: codes in canonical order plus the merge groups."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def square_grid(num_positions: int) -> tuple[int, int]:
    """(side, side) for a square number of positions, else ValueError asking for an explicit grid."""
    side = math.isqrt(num_positions)
    if side * side != num_positions:
        raise ValueError(f"{num_positions} positions are not a square grid: pass grid=(h, w)")
    return side, side


@dataclass
class Tokens:
    """Output of ``tokenizer.encode(x, keep=K)``.

    codes  [B, K] int64: LFQ indices of the kept tokens, in canonical order (sorted by the first
           raster position each kept token owns).
    groups [B, L] int64 in [0, K): for each raster position, the kept token that owns it.
    cls    [B, D] float or None: the encoder's CLS feature (before any alignment head).
    grid   (h, w) with h * w = L: the raster grid of positions.
    """

    codes: torch.Tensor
    groups: torch.Tensor
    cls: torch.Tensor | None
    grid: tuple[int, int]

    @property
    def keep(self) -> int:
        return self.codes.shape[1]

    @property
    def num_positions(self) -> int:
        return self.groups.shape[1]

    def code_grid(self) -> torch.Tensor:
        """Per-position codes [B, L]: the code of the kept token owning each position."""
        return self.codes.gather(1, self.groups)
