"""One home for K, the number of tokens the encoder keeps: the tokenizer's nominal K, the train-time
candidates with their probabilities, the reachable range of its merge schedule, and the seeded
per-step draw. ``build_tokenizer`` attaches one ``KeepPolicy`` to every tokenizer (``tok.keep_policy``);
the trainer, the config checks and the evaluation ask it instead of re-deriving K from the config.

Following one K: ``train.keep_candidates`` / ``variant.keep*`` (config) -> ``KeepPolicy`` (here) ->
``Stage1Trainer`` draws ``policy.draw(seed, step)`` -> ``MergeVQTokenizer.schedule`` ->
``merge.merge_schedule`` (tokens merged per layer) -> ``merge.bipartite_match`` in each encoder block.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .merge import keep_candidates, merge_schedule, reachable_keeps


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes and runs."""
    digest = hashlib.blake2b(",".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def nominal_keep(num_positions: int, fraction: float) -> int:
    """Nominal K: the perfect square nearest fraction * L (L itself a square grid)."""
    side = round(math.isqrt(num_positions) * math.sqrt(fraction))
    return max(1, side * side)


@dataclass(frozen=True)
class KeepPolicy:
    """K for one tokenizer. nominal None: the tokenizer does not merge (Open-MAGVIT2); its only
    candidate is then None ("every position").

    num_positions: L, the encoder's positions; depth: its merge layers; candidates (ascending, as
    configured) and probs: the train-time distribution of K."""

    num_positions: int | None
    depth: int | None
    nominal: int | None
    candidates: tuple[int | None, ...]
    probs: tuple[float, ...]

    def __post_init__(self):
        if len(self.probs) != len(self.candidates) or abs(sum(self.probs) - 1.0) > 1e-6:
            raise ValueError(f"keep probabilities {list(self.probs)} must match {list(self.candidates)} and sum to 1")

    @classmethod
    def no_merging(cls, num_positions: int | None = None) -> KeepPolicy:
        return cls(num_positions, None, None, (None,), (1.0,))

    @classmethod
    def from_config(cls, num_positions: int, depth: int, variant: Mapping[str, Any]) -> KeepPolicy:
        """The variant's K: ``keep`` (or the square nearest ``keep_fraction`` * L) and its
        ``keep_candidates`` {count, distribution}; every one checked against the merge schedule."""
        keep = variant.get("keep") or nominal_keep(num_positions, variant["keep_fraction"])
        merge_schedule(num_positions, keep, depth)  # fail early on an unreachable K
        spec = variant.get("keep_candidates")
        if spec:
            keeps, probs = keep_candidates(num_positions, keep, spec["count"], spec["distribution"])
        else:
            keeps, probs = [keep], [1.0]
        policy = cls(num_positions, depth, keep, tuple(keeps), tuple(probs))
        for candidate in keeps:
            policy.check(candidate)
        return policy

    @property
    def merges(self) -> bool:
        return self.nominal is not None

    def for_training(self, candidates: Sequence[int] | None = None, probs: Sequence[float] | None = None) -> KeepPolicy:
        """This policy with ``train.keep_candidates`` / ``train.keep_probs`` applied: given candidates
        without probabilities are uniform; probabilities alone reweight the variant's candidates."""
        if not candidates and not probs:
            return self
        keeps = tuple(candidates) if candidates else self.candidates
        if probs is None:
            probs = [1.0 / len(keeps)] * len(keeps) if candidates else self.probs
        return KeepPolicy(self.num_positions, self.depth, self.nominal, keeps, tuple(float(p) for p in probs))

    def draw(self, seed: int, step: int) -> int | None:
        """The K of optimizer step ``step``: a pure function of (seed, step), so every rank draws the
        same K without communication and a resumed run needs no state. None: no merging."""
        rng = np.random.default_rng(mix_seed(seed, step, 7))
        keep = self.candidates[rng.choice(len(self.candidates), p=np.asarray(self.probs, dtype=float))]
        return None if keep is None else int(keep)

    def reachable(self) -> list[int]:
        """Every K the merge schedule reaches from L positions (ascending; [L] without merging)."""
        if not self.merges:
            return [self.num_positions] if self.num_positions else []
        return reachable_keeps(self.num_positions, self.depth)

    def check(self, keep: int) -> None:
        """ValueError naming the reachable range when ``keep`` cannot be reached."""
        if self.merges:
            merge_schedule(self.num_positions, keep, self.depth)
        elif keep is not None and self.num_positions is not None and keep != self.num_positions:
            raise ValueError(f"this tokenizer does not merge: keep must be null or {self.num_positions}, got {keep}")
