"""RandAR training inputs from code-cache items: per image its K codes and their representative
positions (each group's first raster position, ``models.positions.group_starts``) in a fresh random
order per sample and step. Images with fewer groups than the batch's largest K are padded at the end
of their order (the causal model never lets a real token see a pad) and masked out of the loss."""

from __future__ import annotations

import torch
from torch import Tensor

from ..models.positions import group_starts


def randar_batch(grid_codes: Tensor, groups: Tensor, keep: Tensor, generator: torch.Generator | None = None
                 ) -> dict[str, Tensor]:
    """grid_codes [B, L] (code of the group owning each position), canonical groups [B, L], keep [B]
    -> {codes [B, K], positions [B, K], valid [B, K] bool}, K = max(keep), rows in random order."""
    length = groups.shape[1]
    kmax = int(keep.max())
    starts = group_starts(groups, kmax)  # [B, K], L where k >= keep[b]
    valid = torch.arange(kmax, device=groups.device)[None, :] < keep[:, None].to(groups.device)
    if not bool((starts < length).eq(valid).all()):
        raise ValueError("groups must be canonical labels in [0, keep) (as the code cache stores them)")
    positions = starts.clamp_max(length - 1)
    codes = grid_codes.gather(1, positions)
    scores = torch.rand(valid.shape, generator=generator, device=generator.device if generator else None)
    order = (scores.to(groups.device) + (~valid).float() * 2).argsort(1)  # valid tokens first, shuffled
    positions = torch.where(valid, positions, 0).gather(1, order)
    return {"codes": codes.gather(1, order), "positions": positions, "valid": valid.gather(1, order)}
