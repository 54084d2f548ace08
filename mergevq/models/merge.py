"""Token merging (ToMe bipartite soft matching) as pure functions, with source tracking by group index.

Shapes: B batch, T tokens including the protected CLS token at index 0, C channels, L raster
positions (T = L + 1 before any merge), K kept tokens.

Source tracking keeps, for every raster position, the index of the token that currently owns it
(``owner`` [B, L] int64, CLS excluded, values in [1, T)). A merge re-indexes it with one gather, so
tracking costs O(L) per layer instead of the dense O(T * L) source matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DEFAULT_INFLECTION = -0.5  # the "decreasing" schedule of the official configs


# --------------------------------------------------------------------------- schedule


def layer_counts(depth: int, base: int, inflection: float = DEFAULT_INFLECTION) -> list[int]:
    """Per-layer merge counts of ToMe's linear schedule for base r (before the remainder fix).

    With inflection -0.5 the counts run linearly from floor(1.5 r) down to about 0.5 r.
    """
    first = int(base * (1.0 - inflection))
    last = 2 * base - first
    if depth == 1:
        return [first]
    step = (last - first) / (depth - 1)
    return [int(first + step * layer) for layer in range(depth)]


def _best_base(depth: int, merge_total: int, inflection: float) -> int:
    """Smallest base r whose schedule sum is closest to merge_total (scan stops once it worsens)."""
    best, best_gap = 0, math.inf
    for base in range(merge_total):
        gap = abs(sum(layer_counts(depth, base, inflection)) - merge_total)
        if gap < best_gap:
            best, best_gap = base, gap
        elif gap > best_gap:
            break
    return best


def _uncapped_schedule(num_tokens: int, keep: int, depth: int, inflection: float) -> list[int]:
    merge_total = num_tokens - keep
    counts = layer_counts(depth, _best_base(depth, merge_total, inflection), inflection)
    remainder = merge_total - sum(counts)
    counts[0 if inflection < 0 else -1] += remainder
    return counts


def _kept_after(num_tokens: int, counts: list[int], protected: int = 1) -> int:
    """Tokens left after applying counts with ToMe's run-time cap r <= (T - protected) // 2."""
    tokens = num_tokens + protected
    for r in counts:
        tokens -= max(0, min(r, (tokens - protected) // 2))
    return tokens - protected


def reachable_keeps(num_tokens: int, depth: int = 12, inflection: float = DEFAULT_INFLECTION) -> list[int]:
    """All keep counts K in [1, L] that the schedule reaches exactly (the run-time caps bind for small K)."""
    return [
        keep
        for keep in range(1, num_tokens + 1)
        if _kept_after(num_tokens, _uncapped_schedule(num_tokens, keep, depth, inflection)) == keep
    ]


def merge_schedule(
    num_tokens: int, keep: int, depth: int = 12, inflection: float = DEFAULT_INFLECTION
) -> list[int]:
    """Per-layer merge counts taking L = num_tokens tokens (CLS excluded) down to K = keep.

    Identical to the official schedule: the base r is the one whose linear schedule sums closest
    to L - K, and the remainder goes to layer 0 (to the last layer for a non-negative inflection).
    Raises ValueError when the run-time cap (T - 1) // 2 would stop the merges short of K.
    """
    counts = _uncapped_schedule(num_tokens, keep, depth, inflection) if 1 <= keep <= num_tokens else None
    if counts is None or min(counts) < 0 or _kept_after(num_tokens, counts) != keep:
        reachable = reachable_keeps(num_tokens, depth, inflection)
        raise ValueError(
            f"keep={keep} is not reachable from {num_tokens} tokens in {depth} merge layers "
            f"(K must lie in [1, {num_tokens}] and each layer merges at most half of its tokens); "
            f"reachable keeps are "
            f"{reachable[0]}..{num_tokens}"
            + ("" if len(reachable) == num_tokens - reachable[0] + 1 else f" (exactly: {reachable})")
        )
    return counts


def keep_candidates(
    num_tokens: int, keep: int, count: int, distribution: str = "gaussian"
) -> tuple[list[int], list[float]]:
    """Train-time keep counts around the nominal K and their probabilities (official cand_distribution).

    Candidates are perfect squares (sqrt(K) + i)^2 with i = -1 .. count-2 (gaussian: one below K)
    or i = 0 .. count-1 (exponential, uniform). Gaussian p_j ~ exp(-(j-1)^2 / 0.5) + 0.05,
    exponential p_j ~ 2 exp(-2 j) + 0.1, uniform p_j = 1 / count; normalised over the candidates
    that fit in [1, L].
    """
    root = math.isqrt(keep)
    if root * root != keep:
        raise ValueError(f"keep={keep} must be a perfect square to build square candidates")
    offset = 1 if distribution == "gaussian" else 0
    keeps = [(root + i) ** 2 for i in range(-offset, count - offset)]
    if distribution == "gaussian":
        weights = [math.exp(-((j - 1) ** 2) / (2 * 0.5**2)) + 0.05 for j in range(count)]
    elif distribution == "exponential":
        weights = [2.0 * math.exp(-2.0 * j) + 0.1 for j in range(count)]
    elif distribution == "uniform":
        weights = [1.0] * count
    else:
        raise ValueError(f"unknown keep distribution {distribution!r}: use gaussian, exponential or uniform")
    # small grids (tiny configs): drop candidates beyond [1, L] and renormalise the rest
    kept = [(k, w) for k, w in zip(keeps, weights) if 1 <= k <= num_tokens]
    total = sum(w for _, w in kept)
    return [k for k, _ in kept], [w / total for _, w in kept]


# --------------------------------------------------------------------------- matching


@dataclass
class MergePlan:
    """One bipartite merge: A = even tokens (CLS is A[0]), B = odd tokens.

    kept_a [B, nA - r]: A tokens kept, ascending; src_a [B, r]: A tokens merged away;
    dst_b [B, r]: the B token each merged A token joins. Output order: [kept A..., all B...].
    """

    kept_a: torch.Tensor
    src_a: torch.Tensor
    dst_b: torch.Tensor

    @property
    def merged(self) -> int:
        return self.src_a.shape[1]


def bipartite_match(metric: torch.Tensor, r: int, protect_cls: bool = True) -> MergePlan | None:
    """ToMe bipartite soft matching on metric [B, T, C]; merges r tokens (capped at (T - 1) // 2).

    Cosine similarity between the alternating A/B halves; every A token picks its most similar B
    token; the r best-matched A tokens are merged. The CLS token (A[0]) never merges.
    """
    tokens = metric.shape[1]
    r = min(r, (tokens - int(protect_cls)) // 2)
    if r <= 0:
        return None
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        scores = metric[:, 0::2] @ metric[:, 1::2].transpose(1, 2)
        if protect_cls:
            scores[:, 0, :] = -math.inf
        best_score, best_b = scores.max(dim=-1)
        order = best_score.argsort(dim=-1, descending=True)
        src_a = order[:, :r]
        kept_a = order[:, r:].sort(dim=-1).values
        dst_b = best_b.gather(1, src_a)
    return MergePlan(kept_a=kept_a, src_a=src_a, dst_b=dst_b)


def apply_merge(x: torch.Tensor, plan: MergePlan, reduce: str = "sum") -> torch.Tensor:
    """x [B, T, C] -> [B, T - r, C]: A tokens reduced into their B partners, order [kept A, B]."""
    a, b = x[:, 0::2], x[:, 1::2]
    channels = x.shape[-1]
    kept = a.gather(1, plan.kept_a[..., None].expand(-1, -1, channels))
    src = a.gather(1, plan.src_a[..., None].expand(-1, -1, channels))
    b = b.scatter_reduce(1, plan.dst_b[..., None].expand(-1, -1, channels), src, reduce=reduce)
    return torch.cat([kept, b], dim=1)


def merge_weighted(
    x: torch.Tensor, size: torch.Tensor | None, plan: MergePlan
) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average merge. x [B, T, C], size [B, T, 1] (None = all ones) -> (x', size')."""
    if size is None:
        size = torch.ones_like(x[..., :1])
    x = apply_merge(x * size, plan, "sum")
    size = apply_merge(size, plan, "sum")
    return x / size, size


def reindex_owner(owner: torch.Tensor, plan: MergePlan, tokens: int) -> torch.Tensor:
    """Update owner [B, L] (token index per raster position, before the merge of T tokens)."""
    batch, kept = plan.kept_a.shape
    new_index = torch.empty(batch, tokens, dtype=torch.long, device=owner.device)
    a_new = torch.empty(batch, (tokens + 1) // 2, dtype=torch.long, device=owner.device)
    a_new.scatter_(1, plan.kept_a, torch.arange(kept, device=owner.device).expand(batch, -1))
    a_new.scatter_(1, plan.src_a, kept + plan.dst_b)
    new_index[:, 0::2] = a_new
    new_index[:, 1::2] = kept + torch.arange(tokens // 2, device=owner.device)
    return new_index.gather(1, owner)


def canonical_order(groups: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Order kept tokens by the first raster position they own.

    groups [B, L] in [0, K) -> (order [B, K]: old index of the k-th canonical token,
    relabelled groups [B, L] in canonical labels).
    """
    batch, positions = groups.shape
    first = torch.full((batch, keep), positions, dtype=torch.long, device=groups.device)
    raster = torch.arange(positions, device=groups.device).expand(batch, -1)
    first = first.scatter_reduce(1, groups, raster, reduce="amin")
    order = first.argsort(dim=1)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(keep, device=groups.device).expand(batch, -1))
    return order, rank.gather(1, groups)


def unmerge(tokens: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """tokens [B, K, C], groups [B, L] -> [B, L, C]: every position copies the token that owns it."""
    return tokens.gather(1, groups[..., None].expand(-1, -1, tokens.shape[-1]))
