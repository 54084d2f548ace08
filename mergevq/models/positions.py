"""Representative positions of the K merged tokens, and groups from positions (spec 7.5).

A group's representative position is its first raster position (the canonical order of ``Tokens``
sorts groups by it, so ``starts`` ascend with k and starts[:, 0] == 0). RandAR generates one token per
representative position; the groups [B, L] are then predicted by the tokenizer's Source Recovery
(``recovered_groups``: its logits constrained to a canonical partition) or, without one, assigned by
the labelled fallback ``nearest_groups``. At inference the position sets come from a sampler:

    'bank'    (default) the position set of a training image with the same K, drawn uniformly from
              the code cache: the training distribution for that K.
    'uniform' position 0 plus K - 1 distinct positions drawn uniformly from the other L - 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

POSITION_SAMPLERS = ("bank", "uniform")


def group_starts(groups: Tensor, keep: int) -> Tensor:
    """Canonical groups [B, L] with labels in [0, keep) -> starts [B, keep]: first raster position of
    each group (L for a label an image does not use, e.g. padding when K differs per image)."""
    b, length = groups.shape
    starts = torch.full((b, keep), length, dtype=torch.long, device=groups.device)
    index = torch.arange(length, device=groups.device).expand(b, length)
    return starts.scatter_reduce(1, groups.long(), index, reduce="amin")


def recovered_groups(logits: Tensor, starts: Tensor) -> Tensor:
    """Source Recovery logits [B, L, K] and ascending starts [B, K] (starts[:, 0] == 0) -> groups [B, L].

    The argmax over owners k allowed at position l: starts[k] <= l (a group cannot own a position
    before its first one), and position starts[k] is owned by k. The result is a canonical partition:
    every position has an owner and group k's first position is starts[k]."""
    b, length, keep = logits.shape
    if not bool((starts[:, 0] == 0).all()):
        raise ValueError("position sets must contain raster position 0 (the first group's start)")
    index = torch.arange(length, device=logits.device)
    allowed = starts[:, None, :] <= index[None, :, None]
    groups = logits.masked_fill(~allowed, float("-inf")).argmax(-1)
    owner = torch.arange(keep, device=logits.device).expand(b, keep)
    return groups.scatter(1, starts, owner)


def nearest_groups(starts: Tensor, grid: tuple[int, int]) -> Tensor:
    """Fallback without Source Recovery: positions [B, K] -> groups [B, L], each raster position owned
    by the nearest representative (Euclidean on the grid; ties: the lower k). Every representative
    owns itself, so all K groups are non-empty."""
    h, w = grid
    index = torch.arange(h * w, device=starts.device)
    rows, cols = (index // w).float(), (index % w).float()
    dist = (rows[None, :, None] - rows[starts][:, None, :]) ** 2 + (cols[None, :, None] - cols[starts][:, None, :]) ** 2
    return dist.argmin(-1)


def sort_by_position(codes: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
    """codes, positions [B, K] in generation order -> both in canonical (ascending position) order."""
    positions, order = positions.sort(1)
    return codes.gather(1, order), positions


def uniform_positions(batch: int, keep: int, length: int, generator: torch.Generator | None = None) -> Tensor:
    """[B, K] ascending distinct positions: 0 plus K - 1 drawn uniformly from 1 .. L - 1."""
    scores = torch.rand(batch, length - 1, generator=generator)
    rest = scores.argsort(1)[:, : keep - 1] + 1
    return torch.cat([torch.zeros(batch, 1, dtype=torch.long), rest], 1).sort(1).values


class PositionBank:
    """Position sets of training images per K: {K: [N_K, K] ascending starts}; ``draw`` picks rows."""

    def __init__(self, sets: dict[int, Tensor]):
        self.sets = {int(k): v.long() for k, v in sets.items()}

    @classmethod
    def from_cache(cls, cache, keep: int, limit: int = 4096) -> PositionBank:
        """The starts of up to ``limit`` items of a ``CodeCache`` whose K equals ``keep``."""
        from safetensors import safe_open

        rows = []
        for shard in cache.meta["shards"]:
            with safe_open(str(cache.directory / shard["file"]), framework="pt") as handle:
                keeps = handle.get_tensor("keep").long()
                take = (keeps == keep).nonzero().squeeze(1)[: limit - sum(len(r) for r in rows)]
                if len(take):
                    rows.append(group_starts(handle.get_tensor("groups").long()[take], keep))
            if sum(len(r) for r in rows) >= limit:
                break
        if not rows:
            raise ValueError(f"the code cache {cache.directory} has no image with K={keep}: choose a K it "
                             f"holds or sample.positions=uniform")
        return cls({keep: torch.cat(rows)})

    def draw(self, batch: int, keep: int, generator: torch.Generator | None = None) -> Tensor:
        if keep not in self.sets:
            raise ValueError(f"no position sets for K={keep} (have {sorted(self.sets)})")
        pool = self.sets[keep]
        return pool[torch.randint(len(pool), (batch,), generator=generator)].clone()


def parallel_schedule(keep: int, steps: int) -> list[int]:
    """Tokens decoded per forward pass: RandAR's cosine schedule (few first, many last), ``steps``
    entries >= 1 summing to K. steps == K gives one token per pass."""
    if not 1 <= steps <= keep:
        raise ValueError(f"steps must be in [1, K={keep}], got {steps}")
    done = [round(keep * (1 - math.cos(math.pi / 2 * s / steps))) for s in range(steps + 1)]
    done[-1] = keep
    for s in range(1, steps + 1):  # at least one token per step ...
        done[s] = max(done[s], done[s - 1] + 1)
    for s in range(steps - 1, -1, -1):  # ... and enough left for the remaining steps
        done[s] = min(done[s], done[s + 1] - 1)
    return [done[s + 1] - done[s] for s in range(steps)]


PAPER_STEPS = {144: 64, 256: 88}  # spec 7.5: G+R at K = 144, G (and RandAR) at K = 256


def default_steps(keep: int, table: Sequence | dict | None = None) -> int:
    """Forward passes for K tokens: the paper's 64 (K = 144) / 88 (K = 256), else RandAR's ratio
    88 / 256 of K (at least 1)."""
    table = PAPER_STEPS if table is None else {int(k): int(v) for k, v in dict(table).items()}
    return table.get(int(keep), max(1, math.ceil(keep * 88 / 256)))
